#!/usr/bin/env python3
"""Issue 32's baseline on one card, in one device call: the SFT step and the population step.

  bench_sft_step    0.5B and 3B shapes, gradient checkpointing off and on: evo (compiled layers)
                    against evo_eager, and TRL's default where trl is installed (else left out)
  bench_population  0.5B one member alone and 8 stepped together, 3B alone and 8 together, each
                    followed by a generation trained while its checkpoint is written (writes in
                    flight: `train_with_writes_x`)

Each benchmark runs as its own process under a time limit (`--limits`, seconds; killed with its
children past it, its rows so far kept), writing into `<out>/<benchmark>/` (results.jsonl, its
log); this driver appends one row per benchmark (return code, seconds, whether it was cut) to
`<out>/gpu_session/results.jsonl` and prints their table. `<out>` is --out, else $OUT (the
folder that comes back from a device machine), else a new temporary folder with --tiny, else
experiments/results/.

Expected on an H100 (not yet measured with these sizes): bench_sft_step 3-4.5 min (each compiled
cell compiles its layers for tens of seconds; 2 warm-up and 5 timed steps each), bench_population
3-4 min (the 3B base is initialised and saved once, ~6 GB; 2 warm-up steps, then 2 timed
generations of 5 steps per row); the default limits (270 s + 300 s) keep the call under 10 minutes.

    python experiments/bench/gpu_session.py                       # on the GPU machine, one call
    python experiments/bench/gpu_session.py --only bench_sft_step  # one of them (e.g. a second call)
    python experiments/bench/gpu_session.py --tiny                 # dry run on the CPU
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, append_results, output_folder, utc_stamp

BENCH = Path(__file__).resolve().parent


def steps(tiny: bool) -> dict[str, list[str]]:
    """Each benchmark's arguments; with `tiny`, the same on the CPU at its tiny size."""
    if tiny:
        return {"bench_sft_step": ["--tiny", "--device", "cpu", "--methods", "evo,evo_eager,trl_default"],
                "bench_population": ["--tiny", "--device", "cpu", "--members", "1,2", "--layouts", "together"]}
    return {
        "bench_sft_step": ["--models", "0.5b,3b", "--gc", "off,on", "--methods", "evo,evo_eager,trl_default",
                           "--warmup", "2", "--steps", "5"],
        "bench_population": ["--models", "0.5b,3b", "--members", "1,8", "--layouts", "together", "--compile", "on",
                             "--warmup", "2", "--steps", "5", "--generations", "2"],
    }


def run_step(name: str, arguments: list[str], folder: Path, limit: float) -> dict:
    """The benchmark as its own process group, its output shown and kept in `folder`/log.txt;
    past `limit` seconds the whole group is killed."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(BENCH / f"{name}.py"), *arguments, "--out", str(folder)]
    print(f"\n=== {name}: {' '.join(command[1:])} (limit {limit:.0f} s)", flush=True)
    started, cut = time.perf_counter(), threading.Event()
    with open(folder / "log.txt", "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   cwd=ROOT, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def kill():
            cut.set()
            os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(limit, kill)
        timer.start()
        for line in process.stdout:
            print(line, end="", flush=True)
            log.write(line)
        process.wait()
        timer.cancel()
    return {"benchmark": name, "arguments": arguments, "returncode": process.returncode,
            "seconds": time.perf_counter() - started, "cut_at_limit": cut.is_set(), "limit_s": limit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="dry run on the CPU: each benchmark at its tiny size")
    parser.add_argument("--only", help="comma-separated benchmarks to run (default: all, in order)")
    parser.add_argument("--limits", default="270,300", help="seconds for each benchmark, in order (default: 270,300)")
    parser.add_argument("--out", help="the root of every benchmark's folder (default: $OUT, see the description)")
    args = parser.parse_args()
    plan = steps(args.tiny)
    limits = dict(zip(plan, (float(s) for s in args.limits.split(","))))
    chosen = args.only.split(",") if args.only else list(plan)
    unknown = sorted(set(chosen) - set(plan))
    if unknown or len(limits) != len(plan):
        raise SystemExit(f"--only: unknown {', '.join(unknown)}; known: {', '.join(plan)}" if unknown
                         else f"--limits: {len(plan)} numbers, one for each of {', '.join(plan)}")
    if args.out or os.environ.get("OUT"):
        root = Path(args.out or os.environ["OUT"])
    else:
        root = Path(tempfile.mkdtemp(prefix="gpu-session-")) if args.tiny else RESULTS
    stamp = utc_stamp()
    rows = [run_step(name, plan[name], root / name, limits[name]) for name in chosen]
    print(f"\n{stamp}: issue 32's baseline{' (tiny dry run)' if args.tiny else ''}")
    print("| benchmark | return code | seconds | cut at its limit |")
    print("|---|---:|---:|---|")
    for row in rows:
        print(f"| {row['benchmark']} | {row['returncode']} | {row['seconds']:.0f} | {row['cut_at_limit']} |")
    folder = output_folder("gpu_session", str(root / "gpu_session"))
    append_results(folder, rows, stamp, torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    print(f"results: {folder / 'results.jsonl'}; each benchmark's rows and log under {root}")


if __name__ == "__main__":
    main()
