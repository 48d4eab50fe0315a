#!/usr/bin/env python3
"""bench_search.py on a machine with many cores: every (task, variant, seed) of bench_search as a
process of its own, `--jobs` at a time, each with one torch thread and its own local Ray, until
`--seconds` have passed; then every finished run's row is gathered into one results.jsonl in
--out (a row per run, as bench_search writes them, plus the job's variant). Runs still going at
the deadline are stopped and counted as missing.

A variant is NAME=ARGS: the bench_search arguments that make it, e.g.
    'truncation=--strategies evolution --set evolution.selection=truncation'
    'baselines=--strategies pbt,pb2,random,grid'

    PYTHONPATH=. python experiments/bench/bench_search_parallel.py --jobs 14 --seeds 5 --seconds 540 \\
        --variant 'tournament=--strategies evolution' --variant 'baselines=--strategies pbt,pb2,random,grid'
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=ARGS")
    parser.add_argument("--tasks", default="demo,stdlib")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=42)
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--seconds", type=float, default=540, help="stop whatever still runs after this long")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/p"), help="the runs' folders and logs (a short path: "
                        "Ray's socket paths inside must stay under 108 bytes)")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant)
    jobs = [(name, task, seed) for seed in range(args.first_seed, args.first_seed + args.seeds)
            for name in variants for task in args.tasks.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
                   "PYTHONUNBUFFERED": "1"}
    deadline, running, finished = time.monotonic() + args.seconds, {}, []
    started = 0
    while (jobs or running) and time.monotonic() < deadline:
        while jobs and len(running) < args.jobs:
            name, task, seed = jobs.pop(0)
            work, started = args.work / str(started), started + 1
            work.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, str(HERE / "bench_search.py"), "--tasks", task, "--seeds", "1", "--first-seed",
                       str(seed), "--work", str(work), "--out", str(work / "out"), *shlex.split(variants[name])]
            log = open(work / "log", "w")
            running[(name, task, seed)] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                            env=environment, start_new_session=True), work)
        time.sleep(1)
        for key, (process, work) in list(running.items()):
            if process.poll() is not None:
                finished.append((key, work, process.returncode))
                del running[key]
    for key, (process, work) in running.items():
        os.killpg(process.pid, 9)
        finished.append((key, work, "stopped"))
    rows, missing = [], [key for key in jobs]
    for (name, task, seed), work, code in finished:
        path = work / task / "results.jsonl"
        found = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        rows += [{"variant": name, "task": task, "args": variants[name], **row} for row in found]
        if code != 0:
            missing.append((name, task, seed, code))
    with open(args.out / "results.jsonl", "a") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{len(rows)} runs gathered into {args.out / 'results.jsonl'}; not finished: {missing}")


if __name__ == "__main__":
    main()
