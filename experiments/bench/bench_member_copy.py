#!/usr/bin/env python3
"""The copy of an actor's members for a checkpoint, taken apart: k member states (float32
tensors of the shapes of a 3B LoRA-r16 adapter on q,k,v,o with its AdamW moments, 88 MB and 864
tensors a member) copied off the GPU the way `storage.cpu_copy` does it (the baseline: fresh
pageable CPU memory, one copy per tensor), into CPU buffers reused from the last copy
(pageable, then pinned with one sync), and cloned on the GPU. With `--processes 1,2` it runs in
1 and then 2 processes at once, one per GPU, as Ray actors on one host would; each row gives the
slowest process's time, median over the repeats.

    python experiments/bench/bench_member_copy.py --processes 1,2     # needs CUDA
"""
import argparse
import os
import statistics
import time

import torch
import torch.multiprocessing as mp
from common import utc_stamp

from evo_sft.io.storage import cpu_copy

WAYS = ["storage.cpu_copy (baseline)", "reused pageable buffers", "reused pinned buffers", "clone on the GPU"]


def member_state(device) -> dict[str, torch.Tensor]:
    shapes = {"q": (2048, 2048), "k": (2048, 256), "v": (2048, 256), "o": (2048, 2048)}
    state = {}
    for layer in range(36):
        for name, (fan_in, fan_out) in shapes.items():
            for kind in ("weight", "exp_avg", "exp_avg_sq"):
                state[f"{layer}.{name}.lora_A.{kind}"] = torch.randn(16, fan_in, device=device)
                state[f"{layer}.{name}.lora_B.{kind}"] = torch.randn(fan_out, 16, device=device)
    return state


def copy_members(way: str, members: list[dict], buffers: list[dict]) -> list[dict]:
    if way == WAYS[0]:
        return [cpu_copy(member) for member in members]
    if way == WAYS[3]:
        return [{k: t.clone() for k, t in member.items()} for member in members]
    for member, buffer in zip(members, buffers):
        for name, t in member.items():
            buffer[name].copy_(t, non_blocking=way == WAYS[2])
    torch.cuda.synchronize()
    return buffers


def worker(rank: int, members: int, repeats: int, barrier, results) -> None:
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    state = [member_state(device) for _ in range(members)]
    buffers = {WAYS[1]: [{k: torch.empty_like(t, device="cpu") for k, t in m.items()} for m in state],
               WAYS[2]: [{k: torch.empty_like(t, device="cpu").pin_memory() for k, t in m.items()} for m in state]}
    times = {way: [] for way in WAYS}
    for repeat in range(repeats + 1):
        for way in WAYS:
            torch.cuda.synchronize()
            barrier.wait()
            start = time.perf_counter()
            copies = copy_members(way, state, buffers.get(way, []))
            torch.cuda.synchronize()
            if repeat:
                times[way].append(time.perf_counter() - start)
            del copies
    results[rank] = times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{utc_stamp()}, {torch.cuda.get_device_name()}, "
          f"{torch.cuda.device_count()} GPUs, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{args.members} members x 88 MB")
    print("| processes | copy | s (slowest process, median) | GB/s per process | x baseline |")
    print("|---:|---|---:|---:|---:|")
    for processes in map(int, args.processes.split(",")):
        ctx = mp.get_context("spawn")
        manager = ctx.Manager()
        barrier, results = manager.Barrier(processes), manager.dict()
        workers = [ctx.Process(target=worker, args=(rank, args.members, args.repeats, barrier, results))
                   for rank in range(processes)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        slowest = {way: statistics.median(max(results[r][way][i] for r in range(processes))
                                          for i in range(args.repeats)) for way in WAYS}
        for way in WAYS:
            gb = args.members * 88e6 / 1e9
            print(f"| {processes} | {way} | {slowest[way]:.3f} | {gb / slowest[way]:.1f} | "
                  f"{slowest[WAYS[0]] / slowest[way]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
