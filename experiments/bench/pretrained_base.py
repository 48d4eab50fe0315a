#!/usr/bin/env python3
"""A small Llama-shaped base, pretrained from scratch on the Python standard library's source: the
kind of model users fine-tune (a pretrained one, which too high a learning rate damages and too
low leaves as it was), built offline on every machine.

The corpus is this Python's standard library `.py` files (tests and the modules that the stdlib
docstring task draws from left out, so its test rows were never pretrained on), read in sorted
order with the byte-level demo tokenizer; one file in HELD_OUT_EVERY is held out and the base's
own loss on it recorded. Training is deterministic for a recipe: windows drawn by a seeded
generator, AdamW with warm-up and cosine decay. A base is cached under
`<cache>/<size>-<hash of its recipe>/` (save_pretrained with its tokenizer, `recipe.json`,
`pretraining.json`), so each machine pretrains each recipe once.

    PYTHONPATH=. python experiments/bench/pretrained_base.py --size cpu   # prints where it is and its losses
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

SIZES = {
    # ~0.13M parameters (the demo model's width and depth), ~1M training tokens: ~4 minutes on 2 CPU cores
    "cpu": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, steps=240, batch=32, length=128, lr=4e-3),
    # ~85M parameters, ~130M training tokens: a few minutes on one H100
    "gpu": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=4, steps=2000, batch=128, length=512, lr=1e-3),
    # the smoke tests' size: seconds
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, steps=10, batch=4, length=64, lr=3e-3),
}
WARMUP_FRACTION, MIN_LR_RATIO, WEIGHT_DECAY = 0.05, 0.1, 0.1
HELD_OUT_EVERY = 20  # one corpus file in 20 is held out
EVAL_WINDOWS = 64
SEED = 1234
SKIPPED_FOLDERS = ("test", "tests", "idle_test", "site-packages", "__pycache__")


def corpus_files(excluded_modules=()) -> list[Path]:
    """The standard library's source files, sorted, without tests and without the files of
    `excluded_modules` (dotted names: `os.path` leaves out os/path.py or posixpath.py's alias
    only where it is a file of its own; a package leaves out its whole folder)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = set()
    for name in excluded_modules:
        parts = name.split(".")
        excluded.add(Path(*parts).with_suffix(".py"))
        excluded.add(Path(*parts))
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if any(part in SKIPPED_FOLDERS for part in relative.parts):
            continue
        if relative in excluded or any(parent in excluded for parent in relative.parents):
            continue
        files.append(path)
    return files


def token_streams(tokenizer, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, held-out ids): every file's bytes as tokens, files joined by the end-of-text
    token; every HELD_OUT_EVERY-th file goes to the held-out stream."""
    eos = tokenizer.eos_token_id
    train, held_out = [], []
    for index, path in enumerate(files):
        ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        (held_out if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train).extend(ids + [eos])
    return np.asarray(train, dtype=np.int64), np.asarray(held_out, dtype=np.int64)


def recipe(size: str, excluded_modules=()) -> dict:
    """Everything the base depends on; its hash names the cache entry."""
    return {"size": size, **SIZES[size], "warmup_fraction": WARMUP_FRACTION, "min_lr_ratio": MIN_LR_RATIO,
            "weight_decay": WEIGHT_DECAY, "held_out_every": HELD_OUT_EVERY, "seed": SEED,
            "excluded_modules": sorted(excluded_modules), "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "corpus": "stdlib .py files without tests", "tokenizer": "evo_sft.data.demo.build_tokenizer"}


def default_cache() -> Path:
    return Path(os.environ.get("EVO_SFT_CACHE", Path.home() / ".cache" / "evo-sft")) / "bases"


def pretrained_base(size: str = "cpu", excluded_modules=(), cache: Path | None = None, device: str = "cpu",
                    log=print) -> Path:
    """The folder of the pretrained base for `size` (pretrained now if this machine has not yet)."""
    wanted = recipe(size, excluded_modules)
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:12]
    folder = (cache or default_cache()) / f"{size}-{digest}"
    if (folder / "pretraining.json").exists():
        return folder
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model, tokenizer, figures = pretrain(wanted, excluded_modules, torch.device(device), log)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "recipe.json").write_text(json.dumps(wanted, indent=2) + "\n")
    (staging / "pretraining.json").write_text(json.dumps(figures, indent=2) + "\n")
    try:
        staging.rename(folder)
    except OSError:  # another process cached the same recipe meanwhile: keep its base
        shutil.rmtree(staging)
    return folder


def build(recipe_: dict, vocab_size: int):
    from evo_sft.data.demo import build_model

    return build_model(vocab_size, seed=recipe_["seed"], hidden_size=recipe_["hidden_size"],
                       num_layers=recipe_["num_hidden_layers"], intermediate_size=recipe_["intermediate_size"],
                       num_attention_heads=recipe_["num_attention_heads"],
                       num_key_value_heads=recipe_["num_key_value_heads"],
                       max_position_embeddings=max(512, recipe_["length"]))


def windows(stream: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([stream[s:s + length] for s in starts]))


def held_out_loss(model, held_out: np.ndarray, length: int, device) -> float:
    """Mean next-token loss (nats per byte) on EVAL_WINDOWS evenly spaced held-out windows."""
    starts = np.linspace(0, len(held_out) - length - 1, EVAL_WINDOWS).astype(np.int64)
    model.eval()
    with torch.no_grad():
        ids = windows(held_out, starts, length).to(device)
        loss = float(model(input_ids=ids, labels=ids).loss)
    model.train()
    return loss


def pretrain(recipe_: dict, excluded_modules, device, log=print):
    from evo_sft.data.demo import build_tokenizer

    tokenizer = build_tokenizer()
    files = corpus_files(excluded_modules)
    train, held_out = token_streams(tokenizer, files)
    model = build(recipe_, len(tokenizer)).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                                  lr=recipe_["lr"], betas=(0.9, 0.95))
    steps, warmup = recipe_["steps"], max(1, round(WARMUP_FRACTION * recipe_["steps"]))

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    rng = np.random.default_rng(recipe_["seed"])
    length, batch = recipe_["length"], recipe_["batch"]
    before = held_out_loss(model, held_out, length, device)
    log(f"pretraining the '{recipe_['size']}' base: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(files)} files, {len(train):,} training and {len(held_out):,} held-out tokens, "
        f"{steps} steps of {batch} x {length}; held-out loss {before:.3f}")
    started, curve = time.perf_counter(), []
    for step in range(steps):
        ids = windows(train, rng.integers(0, len(train) - length - 1, batch), length).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "train_loss": loss.item(), "held_out_loss": held_out_loss(
                model, held_out, length, device), "seconds": round(time.perf_counter() - started, 1)})
            log(f"  step {step + 1:>5}  train {curve[-1]['train_loss']:.3f}  held-out {curve[-1]['held_out_loss']:.3f}"
                f"  {curve[-1]['seconds']:.0f} s")
    figures = {"parameters": sum(p.numel() for p in model.parameters()), "files": len(files),
               "train_tokens_available": len(train), "held_out_tokens": len(held_out),
               "tokens_trained": steps * batch * length, "held_out_loss_before": before,
               "held_out_loss": curve[-1]["held_out_loss"], "seconds": curve[-1]["seconds"], "device": str(device),
               "torch": torch.__version__, "curve": curve}
    return model.to("cpu").float(), tokenizer, figures


def main() -> None:
    from search_tasks import STDLIB_MODULES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="cpu", choices=sorted(SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, help=f"default: {default_cache()} ($EVO_SFT_CACHE/bases)")
    args = parser.parse_args()
    folder = pretrained_base(args.size, STDLIB_MODULES, args.cache, args.device)
    figures = json.loads((folder / "pretraining.json").read_text())
    print(f"{folder}\nheld-out loss {figures['held_out_loss_before']:.3f} -> {figures['held_out_loss']:.3f} nats/byte "
          f"after {figures['tokens_trained']:,} tokens in {figures['seconds']:.0f} s on {figures['device']}")


if __name__ == "__main__":
    main()
