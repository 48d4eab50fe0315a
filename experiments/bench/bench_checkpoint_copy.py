#!/usr/bin/env python3
"""The checkpoint's copy of a population's members, on the real path: k members on one base model
(`build.local_hosts`, as one Ray actor hosts them), after a few joint steps so that the AdamW
moments exist, saved with `LocalPopulation.save` (each member's `snapshot()`, written on threads).
"copy s" is the time until `save` returns, which the evolution step waits for; "written s" the
time until every file is written. Each row is the median of `--repeats` saves; this tree's
`evo_sft.io.storage` against the one at a named git revision, in the same run and on the same
members. Every saved file of both is compared byte for byte. `--profile` prints where one save's
copy time goes (cProfile, this tree).

    python experiments/bench/bench_checkpoint_copy.py --baseline-rev 733250f --models 0.5b,3b
    python experiments/bench/bench_checkpoint_copy.py --baseline-rev 733250f --tiny      # CPU smoke run

The rows are appended to results.jsonl in --out (see --help).
"""
import argparse
import contextlib
import cProfile
import filecmp
import io
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import (
    STORAGE_PATHS, about, append_results, module_at, output_folder, population_data, population_experiment, save_base,
    sync, utc_stamp,
)

import evo_sft.population.local
import evo_sft.population.member
import evo_sft.sft.state
from evo_sft import build
from evo_sft.config import config_from_dict
from evo_sft.data.demo import build_tokenizer
from evo_sft.data.sources import load_tokenizer
from evo_sft.io import storage
from evo_sft.population.local import LocalPopulation

# The modules whose `storage` a save goes through: the member's snapshot (`sft.state`), its
# stream and generator state (`population.member`) and the writes (`population.local`).
USERS_OF_STORAGE = (evo_sft.sft.state, evo_sft.population.member, evo_sft.population.local)


@contextlib.contextmanager
def storage_module(replacement):
    """The population's snapshots and writes through `replacement` instead of this tree's storage."""
    saved = [user.storage for user in USERS_OF_STORAGE]
    for user in USERS_OF_STORAGE:
        user.storage = replacement
    try:
        yield
    finally:
        for user, module in zip(USERS_OF_STORAGE, saved):
            user.storage = module


def timed_save(population, directory: Path, device) -> tuple[float, float]:
    sync(device)
    start = time.perf_counter()
    writes = population.save(directory)
    copied = time.perf_counter() - start
    writes.wait()
    return copied, time.perf_counter() - start


def same_files(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-rev", required=True)
    parser.add_argument("--baseline-file", help="that revision's storage module (evo_sft/io/storage.py, earlier "
                                                "evo_sft/storage.py), where there is no git")
    parser.add_argument("--models", default="0.5b,3b")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--device", help="cuda or cpu (default: cuda where there is one, cpu with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU")
    parser.add_argument("--out", help="folder for results.jsonl; default $OUT/bench_checkpoint_copy, else "
                                      "experiments/results/bench_checkpoint_copy (a new temporary folder with --tiny)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    impls = {f"baseline {args.baseline_rev}": module_at(STORAGE_PATHS, args.baseline_rev, args.baseline_file),
             "this tree": storage}
    out = output_folder("bench_checkpoint_copy", args.out, args.tiny)
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-copy-"))
    tokenizer = work / "tokenizer"
    build_tokenizer().save_pretrained(tokenizer)
    stamp = utc_stamp()
    print(about(device, stamp))
    rows, profiles = [], []
    for model in ["tiny"] if args.tiny else args.models.split(","):
        config = config_from_dict(population_experiment(
            args.members, args.members, True, "local",
            save_base(model, work, torch.bfloat16 if device.type == "cuda" else torch.float32), tokenizer,
            population_data(work, args.tiny), work / f"run-{model}", device, 1))
        prepared = build.prepare_data(config, load_tokenizer(str(tokenizer)))
        population = LocalPopulation(build.local_hosts(config, config.model.name, prepared,
                                                       build.founder_hyperparameters(config)))
        population.train(2)
        times = {name: [] for name in impls}
        for repeat in range(args.repeats + 1):  # the first of each is a warm-up
            for name, module in impls.items():
                with storage_module(module):
                    copied, written = timed_save(population, work / f"{model}-{repeat}-{name}", device)
                if repeat:
                    times[name].append((copied, written))
        identical = same_files(work / f"{model}-0-{list(impls)[0]}", work / f"{model}-0-this tree")
        baseline = None
        for name, pairs in times.items():
            copied, written = (statistics.median(p[i] for p in pairs) for i in (0, 1))
            baseline = baseline or copied
            rows.append(dict(model=model, members=args.members, storage=name, copy_s=copied, written_s=written,
                             x_baseline=baseline / copied, files_identical=identical))
            print(json.dumps(rows[-1]), flush=True)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            timed_save(population, work / f"{model}-profile", device)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
            profiles.append(f"## {model}, {args.members} members, this tree\n{text.getvalue()}")
        del population
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n| model | members | storage | copy s | written s | x baseline (copy) | files identical |")
    print("|---|---:|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {r['members']} | {r['storage']} | {r['copy_s']:.3f} | {r['written_s']:.3f} | "
              f"{r['x_baseline']:.2f} | {r['files_identical']} |")
    for text in profiles:
        print(text)
    append_results(out, rows, stamp, device)
    print(f"results: {out / 'results.jsonl'}")


if __name__ == "__main__":
    main()
