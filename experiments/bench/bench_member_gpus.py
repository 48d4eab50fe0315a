#!/usr/bin/env python3
"""One member over several GPUs (issue 26, `population.gpus_per_member`): the data-parallel SFT
step of `evo_sft.sft.data_parallel` on 1, 2 and 4 processes. NOT RUN YET: no machine with
several GPUs was lent when it was written; only the CPU smoke run (`--tiny --device cpu`, gloo)
has run, and its numbers mean nothing.

For each model shape (Qwen2.5-3B / -7B, random bf16 weights saved with `save_pretrained`) and
each process count k, it starts k processes (one GPU each, NCCL; gloo on the CPU), each an SFT
agent of the saved model with LoRA as `common.LORA` (dropout off) and gradient checkpointing,
joined as `Replicas`, its decoder sharded over the processes (`shard_base`, as a gang does); each optimizer step is 16 sequences (`common.make_rows`) in micro-batches
of `--micro`, every process taking every k-th micro-batch and the gradients summed in one
all-reduce. After `--warmup` steps it times `--steps` steps and prints, per row: supervised
tokens/s of the member, its scaling against k = 1 of the same shape, the peak GPU memory of
each process, and MFU (useful FLOPs of `common.useful_flops` over k times a bf16 matmul
measured on rank 0's card). The output head and the adapter are whole on every process.

    python experiments/bench/bench_member_gpus.py --gpus 1,2,4               # a 4-GPU machine
    python experiments/bench/bench_member_gpus.py --tiny --device cpu   # CPU smoke run: 2 processes, gloo

Each row is appended to results.jsonl in --out (see common.output_folder), with the run's header.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import (
    SHAPES, about, append_results, free, lora_config, make_rows, matmul_tflops, output_folder, save_base,
    step_stats, sync, useful_flops, utc_stamp,
)

from evo_sft.data import collate
from evo_sft.sft import SFT
from evo_sft.sft.data_parallel import join, shard_base

BATCH = 16


def member(rank: int, world: int, args, shape_name: str, model_path: str, port: int, results) -> None:
    """One process of the member: train, time, and (rank 0) put the row on `results`."""
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    replicas = join(rank, world, f"tcp://127.0.0.1:{port}", use_gpu=device.type == "cuda")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    agent = SFT(0, "<pad>", model_name=model_path, model_config={"dtype": dtype}, lora_config=lora_config(),
                batch_size=BATCH, micro_batch_size_per_gpu=args.micro, lr=1e-4, device=str(device),
                gradient_checkpointing=True)
    agent.replicas = replicas
    if world > 1:
        shard_base(agent, replicas)
    shape = SHAPES[shape_name]
    rows = make_rows(BATCH * (args.warmup + args.steps), shape["vocab_size"], args.tiny)
    batches = [collate(rows, range(i * BATCH, (i + 1) * BATCH), 0) for i in range(args.warmup + args.steps)]
    free(device)
    for batch in batches[:args.warmup]:
        agent.learn(batch)
    sync(device)
    dist.barrier()
    start = time.perf_counter()
    for batch in batches[args.warmup:]:
        agent.learn(batch)
    sync(device)
    dist.barrier()
    seconds = time.perf_counter() - start
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0])
    peaks = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        stats = [step_stats(batch) for batch in batches[args.warmup:]]
        tokens = sum(s["supervised"] for s in stats)
        flops = sum(useful_flops(shape, s) for s in stats)
        results.put({"processes": world, "tokens_per_s": tokens / seconds, "seconds_per_step": seconds / args.steps,
                     "peak_gib_per_process": [round(float(p), 2) for p in peaks],
                     "mfu": flops / seconds / (world * matmul_tflops(device, args.tiny) * 1e12)})
    dist.barrier()  # no rank tears gloo down while another still talks to it (a rank aborted there once)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="3b,7b", help="model shapes of common.SHAPES (default: 3b,7b)")
    parser.add_argument("--gpus", help="process counts, one GPU each (default: 1,2,4; 2 with --tiny)")
    parser.add_argument("--micro", type=int, default=4, help="micro-batch rows (default: 4)")
    parser.add_argument("--warmup", type=int, help="untimed steps (default: 3; 1 with --tiny)")
    parser.add_argument("--steps", type=int, help="timed steps (default: 10; 2 with --tiny)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="the tiny shape, short rows: a smoke run")
    parser.add_argument("--out", default=None, help="results folder (default: see common.output_folder)")
    args = parser.parse_args()
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    for name, full, tiny in (("gpus", "1,2,4", "2"), ("warmup", 3, 1), ("steps", 10, 2)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    folder = output_folder("bench_member_gpus", args.out, args.tiny)
    stamp = utc_stamp()
    print(about(device, stamp))
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as models:
        paths = {shape: str(save_base(shape, Path(models), torch.bfloat16 if device.type == "cuda" else torch.float32))
                 for shape in shapes}
        rows = []
        for shape in shapes:
            alone = None
            for world in [int(k) for k in args.gpus.split(",")]:
                results = context.SimpleQueue()
                mp.start_processes(member, args=(world, args, shape, paths[shape], 29500 + world, results), nprocs=world,
                                   start_method="spawn")
                row = {"shape": shape, "micro": args.micro, "batch": BATCH, **results.get()}
                alone = alone or row["tokens_per_s"]
                row["scaling"] = row["tokens_per_s"] / alone
                rows.append(row)
                print(f"{shape:>5} x{world}: {row['tokens_per_s']:9.0f} tok/s  scaling {row['scaling']:.2f}  "
                      f"peak GiB {row['peak_gib_per_process']}  MFU {row['mfu']:.1%}")
    print("| shape | processes | tokens/s | scaling | peak GiB per process | MFU |")
    print("|---|---:|---:|---:|---|---:|")
    for row in rows:
        print(f"| {row['shape']} | {row['processes']} | {row['tokens_per_s']:.0f} | {row['scaling']:.2f} | "
              f"{row['peak_gib_per_process']} | {row['mfu']:.1%} |")
    append_results(folder, rows, stamp, device)
    print(f"appended {len(rows)} rows to {folder / 'results.jsonl'}")


if __name__ == "__main__":
    main()
