#!/usr/bin/env python3
"""The copy of an actor's members for a checkpoint, taken apart: k member states (float32
tensors of the shapes of a 3B LoRA-r16 adapter on q,k,v,o with its AdamW moments, 88 MB and 864
tensors a member) copied off the GPU the way `storage.cpu_copy` does it (the baseline: fresh
pageable CPU memory, one copy per tensor), into CPU buffers reused from the last copy
(pageable, then pinned with one sync), and cloned on the GPU. With `--processes 1,2` it runs in
1 and then 2 processes at once, one per GPU, as Ray actors on one host would; each row gives the
slowest process's time, median over the repeats. With `--device cpu` the members are in CPU
memory and only the first two ways run (pinned memory and the GPU need CUDA).

    python experiments/bench/bench_member_copy.py --processes 1,2     # needs CUDA
    python experiments/bench/bench_member_copy.py --tiny --device cpu  # smoke run: 2 layers, 1 process

The rows are appended to results.jsonl in --out (see common.output_folder).
"""
import argparse
import os
import statistics
import time

import torch
import torch.multiprocessing as mp
from common import append_results, output_folder, sync, utc_stamp

from evo_sft.io.storage import cpu_copy

WAYS = ["storage.cpu_copy (baseline)", "reused pageable buffers", "reused pinned buffers", "clone on the GPU"]
CPU_WAYS = WAYS[:2]


def member_state(device, layers: int) -> dict[str, torch.Tensor]:
    shapes = {"q": (2048, 2048), "k": (2048, 256), "v": (2048, 256), "o": (2048, 2048)}
    state = {}
    for layer in range(layers):
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
    sync(next(iter(members[0].values())).device)
    return buffers


def worker(rank: int, device_type: str, layers: int, members: int, repeats: int, barrier, results) -> None:
    if device_type == "cuda":
        device, ways = torch.device("cuda", rank % torch.cuda.device_count()), WAYS
        torch.cuda.set_device(device)
    else:
        device, ways = torch.device("cpu"), CPU_WAYS
    state = [member_state(device, layers) for _ in range(members)]
    buffers = {WAYS[1]: [{k: torch.empty_like(t, device="cpu") for k, t in m.items()} for m in state]}
    if device.type == "cuda":
        buffers[WAYS[2]] = [{k: torch.empty_like(t, device="cpu").pin_memory() for k, t in m.items()} for m in state]
    times = {way: [] for way in ways}
    for repeat in range(repeats + 1):
        for way in ways:
            sync(device)
            barrier.wait()
            start = time.perf_counter()
            copies = copy_members(way, state, buffers.get(way, []))
            sync(device)
            if repeat:
                times[way].append(time.perf_counter() - start)
            del copies
    results[rank] = times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--processes", help="process counts, one after another (default: 1,2; 1 with --tiny)")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--repeats", type=int, help="copies of each way, median reported (default: 5; 1 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="members of 2 layers (4.9 MB): a smoke run")
    parser.add_argument("--out", help="folder for results.jsonl; default $OUT/bench_member_copy, else "
                                      "experiments/results/bench_member_copy (a new temporary folder with --tiny)")
    args = parser.parse_args()
    processes_list = [int(p) for p in (args.processes or ("1" if args.tiny else "1,2")).split(",")]
    repeats = args.repeats or (1 if args.tiny else 5)
    layers = 2 if args.tiny else 36
    ways = WAYS if args.device == "cuda" else CPU_WAYS
    device = torch.device(args.device)
    out = output_folder("bench_member_copy", args.out, args.tiny)
    member_gb = sum(t.numel() * t.element_size() for t in member_state("meta", layers).values()) / 1e9
    stamp = utc_stamp()
    where = (f"{torch.cuda.get_device_name()}, {torch.cuda.device_count()} GPUs" if device.type == "cuda"
             else "CPU memory")
    print(f"{stamp}, {where}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{args.members} members x {member_gb * 1e3:.1f} MB")
    print("| processes | copy | s (slowest process, median) | GB/s per process | x baseline |")
    print("|---:|---|---:|---:|---:|")
    rows = []
    for processes in processes_list:
        ctx = mp.get_context("spawn")
        manager = ctx.Manager()
        barrier, results = manager.Barrier(processes), manager.dict()
        workers = [ctx.Process(target=worker, args=(rank, args.device, layers, args.members, repeats, barrier, results))
                   for rank in range(processes)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        slowest = {way: statistics.median(max(results[r][way][i] for r in range(processes))
                                          for i in range(repeats)) for way in ways}
        for way in ways:
            gb = args.members * member_gb
            rows.append(dict(processes=processes, copy=way, members=args.members, member_gb=member_gb,
                             s=slowest[way], gb_per_s=gb / slowest[way], x_baseline=slowest[ways[0]] / slowest[way]))
            print(f"| {processes} | {way} | {slowest[way]:.3f} | {gb / slowest[way]:.1f} | "
                  f"{slowest[ways[0]] / slowest[way]:.2f} |", flush=True)
    append_results(out, rows, stamp, device)
    print(f"results: {out / 'results.jsonl'}")


if __name__ == "__main__":
    main()
