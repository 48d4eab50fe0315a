#!/usr/bin/env python3
"""The frozen output head's chunked cross-entropy (`evo_sft.kernels.loss`, the loss of
every packed step): this tree, eager and compiled, against the same function at a named git
revision, in the same run. Forward and backward of `rows` loss rows through the Qwen2.5-0.5B /
-3B head shapes (151,936-token vocabulary), bf16 on a GPU. Each row: median time of `--repeats`
calls, peak memory above the inputs, and the largest difference of the losses (relative) and of
the hidden-state gradient (relative L2) from the baseline.

    python experiments/bench/bench_loss.py --baseline-rev a479275            # GPU
    python experiments/bench/bench_loss.py --baseline-rev a479275 --tiny     # CPU smoke run

The rows are appended to results.jsonl in --out (see --help).
"""
import argparse
import inspect
import time

import torch
from common import LOSS_PATHS, SHAPES, about, append_results, module_at, output_folder, sync, utc_stamp

from evo_sft.kernels import loss


def timed(fn, hidden, device, repeats: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Median seconds of one forward + backward, peak bytes above what was allocated before,
    and the last call's losses and hidden-state gradient."""
    times = []
    for _ in range(repeats + 2):
        leaf = hidden.detach().requires_grad_()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        start = time.perf_counter()
        losses = fn(leaf)
        losses.sum().backward()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
    return sorted(times[2:])[repeats // 2], peak, losses.detach(), leaf.grad


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-rev", required=True)
    parser.add_argument("--baseline-file", help="that revision's loss module (evo_sft/kernels/loss.py, earlier "
                                                "evo_sft/packing.py), where there is no git")
    parser.add_argument("--models", default="0.5b,3b")
    parser.add_argument("--rows", type=int, default=28_000, help="loss rows: ~8 members x 3,500 supervised tokens")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compiled-chunks", default="",
                        help="powers of two: also the compiled loss with chunks of 2^N logits, e.g. 25,26,27")
    parser.add_argument("--device", help="cuda or cpu (default: cuda where there is one, cpu with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape and 500 rows, on the CPU")
    parser.add_argument("--out", help="folder for results.jsonl; default $OUT/bench_loss, else "
                                      "experiments/results/bench_loss (a new temporary folder with --tiny)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    baseline = module_at(LOSS_PATHS, args.baseline_rev, args.baseline_file)
    out = output_folder("bench_loss", args.out, args.tiny)
    models, rows = (["tiny"], 500) if args.tiny else (args.models.split(","), args.rows)
    impls = {
        f"baseline {args.baseline_rev}": lambda h, head, t: baseline.linear_cross_entropy(
            h, head.weight, head.bias, t, max(1, baseline.LOSS_CHUNK_ELEMENTS // head.out_features)),
        "this tree, eager": lambda h, head, t: loss.frozen_head_losses(h, head, t, compiled=False),
        "this tree, compiled": lambda h, head, t: loss.frozen_head_losses(h, head, t, compiled=True),
    }
    if "compiled" in inspect.signature(baseline.frozen_head_losses).parameters:
        impls[f"baseline {args.baseline_rev}, compiled"] = lambda h, head, t: baseline.frozen_head_losses(
            h, head, t, compiled=True)
    for power in filter(None, args.compiled_chunks.split(",")):
        impls[f"this tree, compiled, 2^{power} logits a chunk"] = (
            lambda h, head, t, elements=2 ** int(power): loss.linear_cross_entropy(
                h, head.weight, head.bias, t, max(1, elements // head.out_features), compiled=True))
    stamp = utc_stamp()
    print(about(device, stamp))
    print("| model | rows | implementation | ms | x baseline | peak MiB | loss rel diff | grad rel diff |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    results = []
    for model in models:
        shape = SHAPES[model]
        torch.manual_seed(0)
        head = torch.nn.Linear(shape["hidden_size"], shape["vocab_size"], bias=False, device=device, dtype=dtype)
        head.weight.requires_grad_(False).normal_(0, 0.02)
        hidden = torch.randn(rows, shape["hidden_size"], device=device, dtype=dtype)
        targets = torch.randint(0, shape["vocab_size"], (rows,), device=device)
        reference = None
        for name, impl in impls.items():
            seconds, peak, losses, grad = timed(lambda h: impl(h, head, targets), hidden, device, args.repeats)
            if reference is None:
                reference = (seconds, losses.float(), grad.float())
            loss_diff = ((losses.float() - reference[1]).abs() / reference[1].abs()).max().item()
            grad_diff = ((grad.float() - reference[2]).norm() / reference[2].norm()).item()
            row = dict(model=model, rows=rows, impl=name, ms=seconds * 1e3, x_baseline=reference[0] / seconds,
                       peak_mib=peak / 2**20, loss_rel_diff=loss_diff, grad_rel_diff=grad_diff)
            results.append(row)
            print(f"| {model} | {rows} | {name} | {row['ms']:.1f} | {row['x_baseline']:.2f} | {row['peak_mib']:.0f} | "
                  f"{loss_diff:.1e} | {grad_diff:.1e} |", flush=True)
    append_results(out, results, stamp, device)
    print(f"results: {out / 'results.jsonl'}")


if __name__ == "__main__":
    main()
