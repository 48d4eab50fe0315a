#!/usr/bin/env python3
"""Does the evolution find better hyperparameters than Ray Tune's PBT, PB2, ASHA, random search
and an lr grid, at the same budget of supervised training tokens, on a pretrained base? (issue 33)

Runs `evo-sft compare` (evo_sft.compare) on each task of search_tasks.py, every strategy with
`--seeds` seeds. The base is pretrained here from scratch on the standard library's source
(pretrained_base.py; cached per machine), and the tasks fine-tune it with LoRA on the attention
projections only, as configs/qwen2.5-*.yaml do: too high a learning rate damages what the base
knows, too low a one learns nothing. Fitness: the token-weighted test loss over the fixed test
set (deterministic, so an evaluation is no noisier for one strategy than another). The budget is
what the config's evolution trains on at the config's batch size.

  --device cpu    the 'cpu' base (Llama-shaped, 2 layers of 64), population 4 on 2 cores
  --device cuda   the 'gpu' base (~85M parameters), population 4 sharing one GPU
  --tiny          the smoke tests' size: the 'tiny' base, a few rows, one seed (seconds, not a result)

Decide changes to the search on the decision tasks (demo, stdlib); `--tasks unicode` is the
held-out task, run once with the design frozen. `--set KEY=VALUE` changes the evolution's config
only (e.g. `--set evolution.selection=truncation`): each row records the overrides.

Writes, per task, the comparison's table and plot, and appends one row per (strategy, seed) to
results.jsonl in --out (see common.output_folder); RESULTS.md there is written by hand from them.

    PYTHONPATH=. python experiments/bench/bench_search.py --device cpu --seeds 5
"""
import argparse
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from common import about, append_results, output_folder, utc_stamp
from pretrained_base import pretrained_base
from search_tasks import STDLIB_MODULES, data_config

from evo_sft.compare import runner
from evo_sft.config import apply_override, config_from_dict

# The wider search space of issue 22 (`--space wide`), on top of lr and batch size.
WIDE_SPACE = {"weight_decay": {"min": 0.0, "max": 0.1}, "warmup_steps": {"min": 0, "max": 20, "multiple_of": 5},
              "scheduler": {"choices": ["constant", "cosine", "linear"]}, "lora_r": {"choices": [8, 16, 32]},
              "lora_alpha": {"min": 16.0, "max": 64.0, "scale": "log"}}
# Steps a generation at the config's batch size: the budget is 6 generations of them.
STEPS = {"demo": 25, "stdlib": 15, "unicode": 20}


def task_config(task: str, size: str, folder: Path, space: str) -> dict:
    base = pretrained_base(size, STDLIB_MODULES)
    config = {
        "name": f"bench-search-{task}",
        "model": {"name": str(base)},
        "data": data_config(task, folder),
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "agent": {"lr": 1.0e-3, "batch_size": 16, "micro_batch_size_per_gpu": 8, "max_grad_norm": 1.0},
        "population": {"size": 4, "backend": "ray", "num_cpus": 0.5},
        "evolution": {"generations": 6, "steps_per_generation": STEPS[task], "tournament_size": 2,
                      "fitness": "test_loss",
                      "hyperparameters": {"lr": {"min": 1.0e-5, "max": 1.0e-1}, "batch_size": {"min": 8, "max": 32}}},
    }
    if size == "gpu":
        config["model"]["dtype"] = "bfloat16"
        config["population"].update(num_gpus=0.25, num_cpus=2)
        config["agent"].update(micro_batch_size_per_gpu=16, batch_size=32)
        config["evolution"].update(steps_per_generation=4 * STEPS[task],
                                   hyperparameters={"lr": {"min": 1.0e-5, "max": 1.0e-1},
                                                    "batch_size": {"min": 16, "max": 64}})
    if size == "tiny":
        config["data"].update(test_size=12, **({"num_rows": 60} if task == "demo" else {}))
        config["population"]["size"] = 2
        config["agent"].update(batch_size=8)
        config["evolution"].update(generations=2, steps_per_generation=2)
    if space == "wide":
        config["evolution"]["hyperparameters"].update(WIDE_SPACE)
    return config


def with_overrides(config: dict, overrides: list[str]) -> dict:
    """`config` with the `--set` overrides applied to its evolution only (population.backend
    changes where members train, not what they compute: local is quicker on a busy machine)."""
    for override in overrides:
        if not override.startswith(("evolution.", "population.backend=")):
            raise SystemExit(f"--set {override}: only evolution.* keys (and population.backend) change the "
                             "evolution alone")
        apply_override(config, override)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="the smoke tests' size (seconds; not a result)")
    parser.add_argument("--tasks", default="demo,stdlib", help="decision tasks by default; unicode is held out")
    parser.add_argument("--strategies", default="evolution,pbt,pb2,random,grid")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=42, help="seeds are this one and the --seeds - 1 after it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an evolution.* override for the evolution's runs (repeatable)")
    parser.add_argument("--space", default="lr+batch", choices=["lr+batch", "wide"],
                        help="what mutates: lr and batch size, or also weight decay, warm-up, scheduler, LoRA r and alpha")
    parser.add_argument("--out", help="where results.jsonl and the tables go (see common.output_folder)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders (MLflow store, Tune trials)")
    parser.add_argument("--work", type=Path, help="where the runs' folders go (default: a new folder under /tmp); "
                        "each run's row is in <work>/<task>/results.jsonl as soon as it ends")
    args = parser.parse_args()
    device, stamp = torch.device(args.device), utc_stamp()
    size = "tiny" if args.tiny else "gpu" if args.device == "cuda" else "cpu"
    seeds = 1 if args.tiny else args.seeds
    print(about(device, stamp))
    folder = output_folder("bench_search", args.out, args.tiny)
    scratch = args.work or Path(tempfile.mkdtemp(prefix="bs", dir="/tmp"))  # Ray's socket paths stay short
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        for task in args.tasks.split(","):
            config = {**task_config(task, size, scratch, args.space), "seed": args.first_seed}
            evolution = config_from_dict(with_overrides(yaml.safe_load(yaml.safe_dump(config)), args.overrides))
            comparison = runner.plan(config_from_dict(config), args.strategies, seeds, None, scratch / task,
                                     evolution=evolution)
            runs = runner.run(comparison)
            append_results(folder, [{"task": task, "size": size, "budget": comparison.budget, "space": args.space,
                                     "overrides": args.overrides, **run.to_dict()} for run in runs], stamp, device)
            for name, suffix in (("table.md", ".md"), ("best_fitness_vs_tokens.png", ".png")):
                shutil.copy(scratch / task / name, folder / f"{task}_{size}{suffix}")
    finally:
        if not (args.keep or args.work):
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"results appended to {folder / 'results.jsonl'}")


if __name__ == "__main__":
    main()
