"""What the benchmarks share: the model shapes and LoRA they measure, random data, the card and
versions a run had, timing and profiling helpers, where results go, and evo_sft modules as they
were at a named git revision (the baseline a benchmark compares this tree against).

Run a benchmark as `python experiments/bench/NAME.py`: Python puts this folder on sys.path, so
`from common import ...` finds this module. evo_sft must be importable from this checkout
(`pip install -e .`, or `PYTHONPATH=<repository root>`); a benchmark stops if it comes from
anywhere else, since what it measures is "this tree".
"""
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
try:
    import evo_sft
except ImportError:
    evo_sft = None
if evo_sft is None or Path(evo_sft.__file__).resolve().parent != ROOT / "evo_sft":
    where = "not importable" if evo_sft is None else f"imported from {Path(evo_sft.__file__).resolve().parent}"
    raise SystemExit(f"evo_sft is {where}, not from this checkout: run with PYTHONPATH={ROOT} "
                     f"(or pip install -e {ROOT})")

from evo_sft.data import IGNORE_INDEX, TokenizedSplit  # noqa: E402

SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
}
LORA = dict(r=16, lora_alpha=64, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


# ----------------------------------------------------------------------------- the run
def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "accelerate", "trl", "liger_kernel", "datasets", "triton"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            out[name] = f"missing ({type(e).__name__})"
    if out.get("liger_kernel", "").startswith("?") or out.get("liger_kernel") == "?":
        try:
            from importlib.metadata import version
            out["liger_kernel"] = version("liger-kernel")
        except Exception:  # noqa: BLE001
            pass
    return out


def card(device) -> str:
    if device.type != "cuda":
        return platform.processor() or "cpu"
    p = torch.cuda.get_device_properties(device)
    return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"


def utc_stamp() -> str:
    """Now, as the results' `date` field has it: 2026-11-27 14:00 UTC."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def about(device, stamp: str) -> str:
    """The first line a benchmark prints: when, on what card, with which versions."""
    return f"{stamp}; {card(device)}; {json.dumps(versions())}"


# ----------------------------------------------------------------------------- results
def output_folder(bench: str, out: str | None, tiny: bool = False) -> Path:
    """Where a benchmark writes: `--out`; else `$OUT/<bench>` (the folder that comes back from a
    device machine); else a new temporary folder for a --tiny smoke run, so that it never adds
    to the recorded results; else `experiments/results/<bench>/`."""
    if out:
        folder = Path(out)
    elif os.environ.get("OUT"):
        folder = Path(os.environ["OUT"]) / bench
    elif tiny:
        folder = Path(tempfile.mkdtemp(prefix=f"{bench}-"))
    else:
        folder = RESULTS / bench
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def append_jsonl(path: Path, *rows: dict) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def append_results(folder: Path, rows: list[dict], date: str, device, name: str = "results.jsonl") -> None:
    """Append `rows` to `folder/name` (JSON lines), each stamped with date, card and versions."""
    stamp = dict(date=date, card=card(device), versions=versions())
    append_jsonl(Path(folder) / name, *(dict(row, **stamp) for row in rows))


# ----------------------------------------------------------------------------- device and timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def matmul_tflops(device, tiny: bool) -> float:
    n = 512 if tiny else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mats = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
            for _ in range(3)]
    for a, b in mats:
        a @ b
    sync(device)
    reps = 30 if device.type == "cuda" else 3
    t = time.perf_counter()
    for i in range(reps):
        a, b = mats[i % 3]
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def profile(step_fn, batches, device, path):
    """torch.profiler over `step_fn(b)` for each of `batches`: the tables go to `path`, a summary
    (wall and GPU kernel time, the top kernels) is returned."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    sync(device)
    t = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in batches:
            step_fn(b)
        sync(device)
    wall = time.perf_counter() - t
    events = prof.key_averages()
    attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    self_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    kernel_us = sum(getattr(e, self_attr) for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    tables = [events.table(sort_by=key, row_limit=25) for key in (self_attr, "self_cpu_time_total")]
    Path(path).write_text("By GPU time:\n" + tables[0] + "\nBy host time:\n" + tables[1])
    top = sorted(((getattr(e, self_attr), e.key) for e in events), reverse=True)[:8]
    return {"wall_ms": wall * 1e3, "gpu_kernel_ms": kernel_us / 1e3, "gpu_busy": kernel_us / 1e6 / wall,
            "top_kernels_ms": [(k[:70], round(v / 1e3, 2)) for v, k in top], "_attr": attr}


# ----------------------------------------------------------------------------- models and data
def build_model(size: str, device, dtype):
    """A random-initialised Qwen2 of the shape `SHAPES[size]` (sdpa attention)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = SHAPES[size]
    config = Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1_000_000.0, use_cache=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def save_base(size: str, folder: Path, dtype) -> Path:
    """A random-initialised model of the shape, saved as a hub model would be."""
    path = folder / f"model-{size}"
    if not (path / "config.json").exists():
        build_model(size, torch.device("cpu"), dtype).save_pretrained(path)
    return path


def lora_config():
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **LORA)


def _row_lengths(rng, num_rows: int, tiny: bool) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of 16-128, responses lognormal with median ~180 and at most 900 (an eighth of both
    with `tiny`)."""
    scale = 8 if tiny else 1
    prompts = rng.integers(16, 129, num_rows) // scale
    responses = np.clip(np.round(rng.lognormal(math.log(180), 0.6, num_rows)), 16, 900).astype(int) // scale
    return prompts, responses


def make_rows(num_rows: int, vocab: int, tiny: bool, seed: int = 0) -> TokenizedSplit:
    """Random token ids of the lengths of `_row_lengths`."""
    rng = np.random.default_rng(seed)
    prompts, responses = _row_lengths(rng, num_rows, tiny)
    ids = [rng.integers(3, vocab, int(p + r)).tolist() for p, r in zip(prompts, responses)]
    return TokenizedSplit(ids, [int(p) for p in prompts], list(range(num_rows)))


def write_text_rows(path: Path, num_rows: int, tiny: bool, seed: int = 0) -> Path:
    """A JSON-lines file of `num_rows` rows {"prompt", "response"} of random lowercase letters,
    as many characters as `_row_lengths` gives tokens: with the demo's byte-level tokenizer
    (`evo_sft.data.demo.build_tokenizer`) a letter is one token, so the package's own data path
    (`build.prepare_data`) makes rows of those lengths plus its chat template's few tokens."""
    rng = np.random.default_rng(seed)
    prompts, responses = _row_lengths(rng, num_rows, tiny)

    def letters(count) -> str:
        return "".join(map(chr, rng.integers(ord("a"), ord("z") + 1, int(count))))

    append_jsonl(path, *({"prompt": letters(p), "response": letters(r)} for p, r in zip(prompts, responses)))
    return path


def step_stats(batch) -> dict:
    lengths = batch["attention_mask"].sum(-1)
    return {
        "supervised": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        "real": int(lengths.sum()),
        "padded": int(batch["attention_mask"].numel()),
        "sq": float((lengths.double() ** 2).sum()),
    }


def useful_flops(shape: dict, stats: dict) -> float:
    """The step's useful FLOPs: forward and input-gradient backward of the frozen body on real
    tokens, causal attention, LoRA forward+backward, the LM head on supervised tokens only."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = h // heads
    kv_dim = kv * head_dim
    body = layers * (2 * h * h + 2 * h * kv_dim + 3 * h * inter)  # matmul weights per token
    r = LORA["r"]
    lora = layers * r * ((h + h) * 2 + (h + kv_dim) * 2)  # A and B of q, o, k, v
    attn_fwd = layers * 2 * h * stats["sq"]  # causal QK^T and PV: 2 * (2 * L^2/2 * h)
    head = 2 * shape["vocab_size"] * h * stats["supervised"]
    return 4 * body * stats["real"] + 6 * lora * stats["real"] + 3 * attn_fwd + 2 * head


POPULATION_ROWS = {"train": 512, "test": 64}  # of `population_data`


def population_data(folder: Path, tiny: bool) -> Path:
    """The rows file of `population_experiment`: `write_text_rows` of its train and test rows."""
    path = Path(folder) / f"rows{'-tiny' if tiny else ''}.jsonl"
    if not path.exists():
        write_text_rows(path, sum(POPULATION_ROWS.values()), tiny)
    return path


def population_experiment(k: int, members_per_actor: int, together: bool, backend: str, model_path: Path,
                          tokenizer_path: Path, data_path: Path, run_dir: Path, device, steps: int,
                          compile_layers: bool = False) -> dict:
    """The config (as a dict) of a population of k members of the saved model: LoRA as `LORA`
    without dropout, 16 sequences a step, packed, gradient checkpointing on, one generation; its
    data the rows file `data_path` (`population_data`), nothing truncated, 64 rows held out."""
    return {
        "name": "bench-population", "seed": 0, "run_dir": str(run_dir),
        "model": {"name": str(model_path), "dtype": "bfloat16" if device.type == "cuda" else "float32",
                  "attn_implementation": "sdpa"},
        "tokenizer": str(tokenizer_path),
        "data": {"source": str(data_path), "test_size": POPULATION_ROWS["test"], "max_length": 2048},
        "lora": {"r": LORA["r"], "lora_alpha": LORA["lora_alpha"], "lora_dropout": 0.0,
                 "target_modules": LORA["target_modules"]},
        "agent": {"lr": 1e-4, "batch_size": 16, "micro_batch_size_per_gpu": 16, "gradient_checkpointing": True,
                  "packing": True, "compile_layers": compile_layers},
        "population": {"size": k, "backend": backend, "num_gpus": 1 if device.type == "cuda" else 0, "num_cpus": 2,
                       "members_per_actor": members_per_actor, "step_together": together},
        "evolution": {"generations": 1, "steps_per_generation": steps, "tournament_size": min(2, k),
                      "mutation": {"no_mutation": 0.0, "rl_hp": 1.0},
                      "hyperparameters": {"lr": {"min": 1e-5, "max": 1e-3}, "batch_size": {"min": 16, "max": 16}}},
        "checkpoint": {"every": 1, "keep": 1},
    }


# ----------------------------------------------------------------------------- baselines
# Where a module is (first) and where it was before the renovation (a3fc743), for `module_at`.
STORAGE_PATHS = ("evo_sft/io/storage.py", "evo_sft/storage.py")
LOSS_PATHS = ("evo_sft/kernels/loss.py", "evo_sft/packing.py")  # the frozen head's chunked cross-entropy


def module_from_source(source: str, name: str):
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def module_at(paths: str | Sequence[str], rev: str, file: str | None = None):
    """An evo_sft module as it was at git revision `rev`, loaded beside this tree's, so that a
    benchmark compares against a named baseline in the same run: the first of `paths` (relative
    to the repository; a module that moved is named at each of its places, newest first) that
    exists at `rev`. Where the copy has no git (the device machines), pass the file that
    `git show REV:PATH > FILE` wrote. The module's own `evo_sft` imports are this tree's."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if file:
        return module_from_source(Path(file).read_text(), f"{Path(paths[0]).stem}_baseline")
    errors = []
    for path in paths:
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
        if shown.returncode == 0:
            return module_from_source(shown.stdout, f"{Path(path).stem}_baseline")
        errors.append(shown.stderr.strip())
    raise SystemExit(f"no baseline module at {rev}: " + "; ".join(errors))
