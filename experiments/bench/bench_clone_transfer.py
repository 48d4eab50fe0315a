#!/usr/bin/env python3
"""A clone between two Ray actors: a member state (float32 tensors of the size of a 3B LoRA-r16
member with its AdamW moments, 88 MB) exported by one actor into the object store and imported by
another, as torch tensors (how clones travelled before `ray_backend.portable`, the baseline) and
as `portable` numpy byte arrays, in the same run. Real local Ray, actors on this machine's CPUs.

    python experiments/bench/bench_clone_transfer.py
    python experiments/bench/bench_clone_transfer.py --repeats 1     # quick
"""
import argparse
import os
import platform
import statistics
import tempfile
import time

import ray
import torch
from common import utc_stamp

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
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(_temp_dir=tempfile.mkdtemp(prefix="bench-clone-"), include_dashboard=False, log_to_driver=False)
    tensors, numel = 22, 1_000_000
    donor, receiver = Holder.remote(tensors, numel), Holder.remote(tensors, numel)
    ways = ["torch tensors (baseline)", "portable numpy arrays"]
    seconds = {way: [] for way in ways}
    for repeat in range(args.repeats + 1):
        for way in ways:
            start = time.perf_counter()
            assert ray.get(receiver.receive.remote(way, donor.export.remote(way))) == tensors * numel
            if repeat:  # the first round warms both paths up
                seconds[way].append(time.perf_counter() - start)
    ray.shutdown()
    mb = tensors * numel * 4 / 1e6
    print(f"{utc_stamp()}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"ray {ray.__version__}, torch {torch.__version__}")
    print(f"| member state of {mb:.0f} MB, actor to actor | s (median of {args.repeats}) | MB/s | x baseline |")
    print("|---|---:|---:|---:|")
    base = statistics.median(seconds[ways[0]])
    for way in ways:
        median = statistics.median(seconds[way])
        print(f"| {way} | {median:.3f} | {mb / median:.0f} | {base / median:.2f} |")


if __name__ == "__main__":
    main()
