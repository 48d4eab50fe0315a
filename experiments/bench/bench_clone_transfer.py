#!/usr/bin/env python3
"""A clone between two Ray actors: a member state (float32 tensors of the size of a 3B LoRA-r16
member with its AdamW moments, 88 MB) exported by one actor into the object store and imported by
another, as torch tensors (how clones travelled before `ray_backend.portable`, the baseline) and
as `portable` numpy byte arrays, in the same run. Real local Ray, actors on this machine's CPUs.

    python experiments/bench/bench_clone_transfer.py
    python experiments/bench/bench_clone_transfer.py --tiny     # smoke run: a 0.9 MB state, one repeat

The rows are appended to results.jsonl in --out (see common.output_folder).
"""
import argparse
import os
import platform
import statistics
import tempfile
import time

import ray
import torch
from common import append_results, output_folder, utc_stamp

from evo_sft.population.ray_backend import from_portable, portable


@ray.remote(num_cpus=0)
class Holder:
    def __init__(self, tensors: int, numel: int):
        self.state = ({f"optimizer/state.{i}.exp_avg": torch.randn(numel) for i in range(tensors)},
                      {"attributes": {"lr": 1e-4}})

    def export(self, way: str):
        tensors, meta = self.state
        copied = ({name: t.clone() for name, t in tensors.items()}, meta)
        return copied if way == "torch tensors (baseline)" else portable(copied)

    def receive(self, way: str, payload) -> int:
        tensors, _ = payload if way == "torch tensors (baseline)" else from_portable(payload)
        return sum(t.numel() for t in tensors.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, help="transfers of each way, median reported (default: 5; 1 with "
                                                    "--tiny)")
    parser.add_argument("--tiny", action="store_true", help="a 0.9 MB member state: a smoke run")
    parser.add_argument("--out", help="folder for results.jsonl; default $OUT/bench_clone_transfer, else "
                                      "experiments/results/bench_clone_transfer (a new temporary folder with --tiny)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.tiny else 5)
    out = output_folder("bench_clone_transfer", args.out, args.tiny)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(_temp_dir=tempfile.mkdtemp(prefix="bench-clone-"), include_dashboard=False, log_to_driver=False)
    tensors, numel = 22, 10_000 if args.tiny else 1_000_000
    donor, receiver = Holder.remote(tensors, numel), Holder.remote(tensors, numel)
    ways = ["torch tensors (baseline)", "portable numpy arrays"]
    seconds = {way: [] for way in ways}
    for repeat in range(repeats + 1):
        for way in ways:
            start = time.perf_counter()
            assert ray.get(receiver.receive.remote(way, donor.export.remote(way))) == tensors * numel
            if repeat:  # the first round warms both paths up
                seconds[way].append(time.perf_counter() - start)
    ray.shutdown()
    mb = tensors * numel * 4 / 1e6
    stamp = utc_stamp()
    print(f"{stamp}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"ray {ray.__version__}, torch {torch.__version__}")
    print(f"| member state of {mb:.1f} MB, actor to actor | s (median of {repeats}) | MB/s | x baseline |")
    print("|---|---:|---:|---:|")
    base = statistics.median(seconds[ways[0]])
    rows = []
    for way in ways:
        median = statistics.median(seconds[way])
        rows.append(dict(way=way, state_mb=mb, s=median, mb_per_s=mb / median, x_baseline=base / median,
                         repeats=repeats))
        print(f"| {way} | {median:.3f} | {mb / median:.0f} | {base / median:.2f} |")
    append_results(out, rows, stamp, torch.device("cpu"))
    print(f"results: {out / 'results.jsonl'}")


if __name__ == "__main__":
    main()
