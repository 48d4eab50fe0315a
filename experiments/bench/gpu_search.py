#!/usr/bin/env python3
"""The search at equal GPU time (issue 32): `evo-sft compare --budget-seconds` of the evolution
against Ray Tune's PBT, 8 members sharing one card, on a Qwen2.5-0.5B-shaped base.

Users pay for GPU hours. The evolution steps its 8 members together on one copy of the base in one
Ray actor; PBT runs 8 trials at once, each its own process with its own copy, on a fractional
GPU each (`population.num_gpus` 1/8: together the one card). Each (strategy, seed) gets the same
wall-clock budget, start-up included (`evo_sft.time_budget`). The base is random-initialised (no
pretrained 0.5B base exists offline; the ranking is what is measured), the task is the demo's
(reverse a word: learnable, short rows), fitness the test loss; LoRA r 16 on the attention and
MLP projections, not the output head (an adapter there stops members from stepping together).
Compiled layers are off unless `--compile`: at a one-minute budget, compiling (tens of seconds,
in every trial's process) would be most of it.

Per seed it reports each strategy's best final test loss, tokens and wall time, and the target of
issue 32: the seconds the evolution took to reach PBT's best final fitness, as a share of PBT's
wall time (target <= 0.4, mean over seeds). Rows: every run's (`evo_sft.compare` figures, curve
and each point's seconds) and every seed's, appended to results.jsonl in --out (see
common.output_folder), with the comparison's table and plot copied beside it.

Sized for one device call of at most 10 minutes: 3 seeds x 2 strategies x (60 s + ~10 s to stop
and record) + ~1 min to start; expected ~8.5 minutes on an H100 (not yet measured).

    python experiments/bench/gpu_search.py                      # on the GPU machine
    python experiments/bench/gpu_search.py --tiny               # dry run on the CPU (about 40 s)
"""
import argparse
import math
import shutil
import tempfile
from pathlib import Path

import torch
from common import about, append_results, output_folder, save_base, utc_stamp
from search_tasks import data_config

from evo_sft import build
from evo_sft.compare import runner
from evo_sft.config import config_from_dict
from evo_sft.data.demo import build_tokenizer

MEMBERS = 8


def search_config(folder: Path, tiny: bool, compile_layers: bool) -> dict:
    """The experiment both strategies run: 8 members on one card (2 on the CPU with `tiny`)."""
    tokenizer = folder / "tokenizer"
    build_tokenizer().save_pretrained(tokenizer)
    dtype = torch.float32 if tiny else torch.bfloat16
    members = 2 if tiny else MEMBERS
    config = {
        "name": "gpu-search", "seed": 42,
        "model": {"name": str(save_base("tiny" if tiny else "0.5b", folder, dtype)),
                  "dtype": "float32" if tiny else "bfloat16"},
        "tokenizer": str(tokenizer),
        "data": data_config("demo", folder),
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "agent": {"lr": 1.0e-4, "batch_size": 16, "micro_batch_size_per_gpu": 16, "max_grad_norm": 1.0,
                  "compile_layers": compile_layers},
        "population": {"size": members, "backend": "ray", "members_per_actor": members,
                       "num_gpus": 0 if tiny else 1 / members, "num_cpus": 0.5 if tiny else 2},
        "evolution": {"generations": 8, "steps_per_generation": 25, "fitness": "test_loss",
                      "hyperparameters": {"lr": {"min": 1.0e-5, "max": 3.0e-3}, "batch_size": {"min": 8, "max": 64}}},
    }
    if tiny:
        config["data"].update(num_rows=60, test_size=12)
        config["agent"].update(batch_size=8, micro_batch_size_per_gpu=8)
        config["evolution"].update(steps_per_generation=2, hyperparameters={"lr": {"min": 1.0e-4, "max": 3.0e-2}})
    return config


def seconds_to(run, target: float) -> float | None:
    """When `run` first evaluated a model at least as fit as `target` (None: never)."""
    return next((seconds for seconds, (_, best) in zip(run.seconds, run.best_so_far()) if best >= target), None)


def per_seed(runs, fitness) -> list[dict]:
    """Per seed: each strategy's figures, and the evolution's time to PBT's best final fitness."""
    rows = []
    for seed in dict.fromkeys(run.seed for run in runs):
        mine = {run.strategy: run for run in runs if run.seed == seed}
        evolution, pbt = mine.get("evolution"), mine.get("pbt")
        row = {"seed": seed, **{f"{name}_{key}": value for name, run in mine.items() for key, value in (
            ("best_final", fitness.shown(run.best_final)), ("tokens", run.tokens), ("wall_s", run.wall_s))}}
        if evolution and pbt and math.isfinite(pbt.best_final):
            reached = seconds_to(evolution, pbt.best_final)
            row.update(evolution_s_to_pbt_best=reached,
                       x_pbt_wall=None if reached is None else reached / pbt.wall_s)
        rows.append(row)
    return rows


def print_table(rows: list[dict], metric: str, budget_s: float) -> None:
    print(f"\nbudget: {budget_s:g} s of wall-clock time per strategy and seed, start-up included")
    print(f"| seed | evolution best {metric} | pbt best {metric} | evolution tokens | pbt tokens | evolution wall s "
          "| pbt wall s | evolution s to pbt's best | x pbt wall (target <= 0.4) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        reached = row.get("evolution_s_to_pbt_best")
        ratio = row.get("x_pbt_wall")
        print(f"| {row['seed']} | {row.get('evolution_best_final', math.nan):.4f} | {row.get('pbt_best_final', math.nan):.4f} "
              f"| {row.get('evolution_tokens', 0):,} | {row.get('pbt_tokens', 0):,} | "
              f"{row.get('evolution_wall_s', math.nan):.0f} | {row.get('pbt_wall_s', math.nan):.0f} | "
              f"{'never' if reached is None else f'{reached:.0f}'} | {'-' if ratio is None else f'{ratio:.2f}'} |")
    ratios = [row["x_pbt_wall"] for row in rows if row.get("x_pbt_wall") is not None]
    print(f"mean x pbt wall over the {len(ratios)} of {len(rows)} seeds where the evolution reached pbt's best: "
          + (f"{sum(ratios) / len(ratios):.2f}" if ratios else "-"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="dry run on the CPU: the tiny shape, 2 members, 1 seed")
    parser.add_argument("--seeds", type=int, help="default: 3; 1 with --tiny")
    parser.add_argument("--budget-seconds", type=float, help="per strategy and seed (default: 60; 10 with --tiny)")
    parser.add_argument("--strategies", default="evolution,pbt")
    parser.add_argument("--compile", action="store_true", help="compiled decoder layers (agent.compile_layers)")
    parser.add_argument("--out", help="where results.jsonl, the table and the plot go (see common.output_folder)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders (MLflow store, Tune trials)")
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.tiny else 3)
    budget_s = args.budget_seconds or (10.0 if args.tiny else 60.0)
    device, stamp = torch.device("cpu" if args.tiny else "cuda"), utc_stamp()
    print(about(device, stamp), flush=True)
    folder = output_folder("gpu_search", args.out, args.tiny)
    scratch = Path(tempfile.mkdtemp(prefix="gs", dir="/tmp"))  # Ray's socket paths stay short
    try:
        config = config_from_dict(search_config(scratch, args.tiny, args.compile))
        comparison = runner.plan(config, args.strategies, seeds, None, scratch / "compare", budget_seconds=budget_s)
        runs = runner.run(comparison)
        fitness = build.fitness(config)
        rows = per_seed(runs, fitness)
        print_table(rows, fitness.metric, budget_s)
        labels = {"budget_seconds": budget_s, "members": config.population.size, "compile": args.compile}
        append_results(folder, [{**labels, **run.to_dict()} for run in runs]
                       + [{**labels, "per_seed": True, **row} for row in rows], stamp, device)
        for name in ("table.md", "best_fitness_vs_tokens.png"):
            shutil.copy(scratch / "compare" / name, folder / name)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"results appended to {folder / 'results.jsonl'}")


if __name__ == "__main__":
    main()
