#!/usr/bin/env python3
"""Does the evolution find better hyperparameters than Ray Tune's PBT, ASHA, random search and an
lr grid, at the same budget of supervised training tokens? (issue 21)

Runs `evo-sft compare` (evo_sft.compare) on two tasks, every strategy with `--seeds` seeds:
  demo     the built-in task: reverse a word of 3-7 letters (evo_sft.data.demo)
  stdlib   real text available offline: Python standard library docstrings, a function's or
           class's qualified name and signature as the prompt, the first line of its docstring
           as the response; built here from the installed standard library with `inspect`
           (the same rows for the same Python version)
Fitness: the token-weighted test loss over the fixed test set (deterministic, so an evaluation is
no noisier for one strategy than another). The budget is what the config's evolution trains on
at the founders' batch size.

  --device cpu    the demo model (Llama-shaped, 2 layers of 64), population 4
  --device cuda   a Qwen2.5-0.5B-shaped model, random init (the ranking is what is measured),
                  population 4 sharing one GPU

Writes, per task, the comparison's table and plot, and appends one row per (strategy, seed) to
results.jsonl in --out (see common.output_folder); RESULTS.md there is written by hand from them.

    PYTHONPATH=. python experiments/bench/bench_search.py --device cpu --seeds 5
    PYTHONPATH=. python experiments/bench/bench_search.py --tiny --device cpu    # smoke run
"""
import argparse
import importlib
import inspect
import json
import shutil
import tempfile
from pathlib import Path

import torch
from common import append_results, output_folder, save_base, utc_stamp, about

from evo_sft.compare import runner
from evo_sft.config import config_from_dict

STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmath", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email", "enum", "filecmp", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "http.client", "imaplib", "inspect", "ipaddress", "itertools", "json", "logging", "lzma", "mailbox",
    "math", "mimetypes", "operator", "os", "os.path", "pathlib", "pickle", "platform", "plistlib", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "signal", "smtplib", "socket",
    "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "turtle", "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile", "zlib",
)
MAX_PROMPT, MAX_RESPONSE = 72, 72  # characters (one token each for the demo's byte-level tokenizer)


def stdlib_rows() -> list[dict]:
    """One row per public function, class and method with a signature and a docstring in the
    modules above: prompt `module.Qualified.name(signature)`, response the docstring's first line.
    Sorted by prompt, so the rows depend only on the Python version."""
    rows = {}
    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # e.g. turtle without tkinter
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            members = [(name, obj)]
            if inspect.isclass(obj):
                members += [(f"{name}.{n}", m) for n, m in sorted(vars(obj).items())
                            if not n.startswith("_") and inspect.isfunction(m)]
            for qualified, member in members:
                row = _row(f"{module_name}.{qualified}", member)
                if row is not None:
                    rows.setdefault(row["prompt"], row)
    return [rows[prompt] for prompt in sorted(rows)]


def _row(qualified: str, obj) -> dict | None:
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
        return None
    try:
        prompt = f"{qualified}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return None
    doc = inspect.getdoc(obj)
    first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
    if not (8 <= len(first) <= MAX_RESPONSE and len(prompt) <= MAX_PROMPT and (prompt + first).isascii()):
        return None
    return {"prompt": prompt, "response": first}


# The wider search space of issue 22 (`--space wide`), on top of lr and batch size.
WIDE_SPACE = {"weight_decay": {"min": 0.0, "max": 0.1}, "warmup_steps": {"min": 0, "max": 20, "multiple_of": 5},
              "scheduler": {"choices": ["constant", "cosine", "linear"]}, "lora_r": {"choices": [8, 16, 32]},
              "lora_alpha": {"min": 16.0, "max": 64.0, "scale": "log"}}


def task_config(task: str, device: str, folder: Path, selection: str, space: str) -> dict:
    cuda = device == "cuda"
    config = {
        "name": f"bench-search-{task}", "seed": 42,
        "model": {"name": "demo"},
        "data": {"source": "demo", "num_rows": 2000, "test_size": 200, "max_length": 64},
        "lora": {"r": 16, "lora_alpha": 32,  # as configs/demo.yaml: a random-init base needs the MLP and head adapted
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                    "lm_head"]},
        "agent": {"lr": 1.0e-3, "batch_size": 16, "micro_batch_size_per_gpu": 8, "max_grad_norm": 1.0},
        "population": {"size": 4, "backend": "ray", "num_cpus": 0.5},
        "evolution": {"generations": 6, "steps_per_generation": 25, "selection": selection, "tournament_size": 2,
                      "fitness": "test_loss",
                      "hyperparameters": {"lr": {"min": 1.0e-4, "max": 3.0e-2}, "batch_size": {"min": 8, "max": 32}}},
    }
    if task == "stdlib":
        path = folder / "stdlib_docstrings.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in stdlib_rows()))
        config["data"] = {"source": str(path), "test_size": 200, "max_length": 160}
        config["agent"].update(batch_size=8)
        config["evolution"].update(steps_per_generation=15)
    if cuda:
        from evo_sft.data.demo import build_tokenizer

        tokenizer = folder / "tokenizer"
        build_tokenizer().save_pretrained(tokenizer)
        config["model"] = {"name": str(save_base("0.5b", folder, torch.bfloat16)), "dtype": "bfloat16"}
        config["tokenizer"] = str(tokenizer)
        config["population"].update(num_gpus=0.25, num_cpus=2)
        config["agent"].update(lr=1.0e-4, batch_size=16, micro_batch_size_per_gpu=16)
        config["evolution"].update(generations=8, steps_per_generation=50,
                                   hyperparameters={"lr": {"min": 1.0e-5, "max": 3.0e-3},
                                                    "batch_size": {"min": 8, "max": 64}})
        config["lora"]["lora_dropout"] = 0.0
    if space == "wide":
        config["evolution"]["hyperparameters"].update(WIDE_SPACE)
    return config


def tiny_config(config: dict) -> dict:
    """The config at the smallest size that still runs every part of a comparison: 2 members,
    2 generations of 2 steps, 200 rows (a smoke run; its figures mean nothing)."""
    config["data"].update(num_rows=200, test_size=20)
    config["population"]["size"] = 2
    config["evolution"].update(generations=2, steps_per_generation=2)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tasks", help="default: demo,stdlib; demo with --tiny")
    parser.add_argument("--strategies", help="default: evolution,pbt,asha,random,grid; evolution,pbt with --tiny")
    parser.add_argument("--seeds", type=int, help="default: 5; 1 with --tiny")
    parser.add_argument("--tiny", action="store_true", help="every config at its smallest (`tiny_config`): a smoke run")
    parser.add_argument("--selection", default="tournament", choices=["tournament", "truncation"],
                        help="the evolution's evolution.selection")
    parser.add_argument("--space", default="lr+batch", choices=["lr+batch", "wide"],
                        help="what mutates: lr and batch size, or also weight decay, warm-up, scheduler, LoRA r and alpha")
    parser.add_argument("--out", help="where results.jsonl and the tables go (see common.output_folder)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders (MLflow store, Tune trials)")
    args = parser.parse_args()
    for name, full, tiny in (("tasks", "demo,stdlib", "demo"), ("strategies", "evolution,pbt,asha,random,grid",
                                                                  "evolution,pbt"), ("seeds", 5, 1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    device, stamp = torch.device(args.device), utc_stamp()
    print(about(device, stamp))
    folder = output_folder("bench_search", args.out, args.tiny)
    scratch = Path(tempfile.mkdtemp(prefix="bs", dir="/tmp"))  # Ray's socket paths stay short
    try:
        for task in args.tasks.split(","):
            config = task_config(task, args.device, scratch, args.selection, args.space)
            config = config_from_dict(tiny_config(config) if args.tiny else config)
            comparison = runner.plan(config, args.strategies, args.seeds, None, scratch / task)
            runs = runner.run(comparison)
            append_results(folder, [{"task": task, "device": args.device, "budget": comparison.budget,
                                     "selection": args.selection, "space": args.space, **run.to_dict()} for run in runs], stamp, device)
            for name, suffix in (("table.md", ".md"), ("best_fitness_vs_tokens.png", ".png")):
                shutil.copy(scratch / task / name, folder / f"{task}_{args.device}{suffix}")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"results appended to {folder / 'results.jsonl'}")


if __name__ == "__main__":
    main()
