#!/usr/bin/env python3
"""One SFT optimizer step, evo-sft against TRL, in one run on one GPU (issue 8).

Same random-initialised model (Qwen2.5-0.5B / -3B shapes, bf16), same data (random token ids,
prompts 16-128 tokens, responses lognormal with median ~180 tokens, 16 sequences per optimizer
step), same LoRA (r=16, alpha=64, dropout 0.05 on q,k,v,o), same learning rate, with gradient
checkpointing on and off:

  evo          evo_sft.SFT.learn as shipped (on CUDA: packed, padding-free, compiled decoder layers)
  evo_eager    the same with compile_layers=False
  evo_padded   evo_sft.SFT.learn with packing=False (the padded path; reference for the gain)
  evo_liger    evo plus Liger's RoPE/RMSNorm/SwiGLU kernels
  trl_default  TRL SFTTrainer with its defaults (per-device batch 16, no accumulation)
  trl_liger    TRL + use_liger_kernel=True
  trl_pf_liger TRL + padding_free=True + use_liger_kernel=True
  trl_pf       TRL + padding_free=True

"trl_fast" in the table is the fastest TRL variant at that model size and GC setting. Where trl is
not installed the TRL methods are left out, and evo is compared with evo_eager only.
Tokens/s counts supervised (next-token-labelled) tokens. MFU counts the useful FLOPs of the
step - forward and input-gradient backward of the frozen body on real (unpadded) tokens,
causal attention, LoRA forward+backward, and the LM head on supervised tokens only; no
recomputation - over the bf16 matmul rate measured in the same run.

    python experiments/bench/bench_sft_step.py                        # GPU, full
    python experiments/bench/bench_sft_step.py --tiny --device cpu    # quick CPU smoke run

Each run appends to results.jsonl in --out (see --help): the run's header, the packed-vs-padded
check on a GPU, then a line for each method, model and GC setting.
"""
import argparse
import datetime
import importlib.util
import json
import tempfile
import time
import traceback

import torch
from common import (
    LORA, SHAPES, append_jsonl, build_model, card, free, lora_config, make_rows, matmul_tflops,
    output_folder, profile, step_stats, sync, useful_flops, versions,
)

from evo_sft.data import IGNORE_INDEX, collate

SEQS_PER_STEP = 16
LR = 1e-4


def log(*a):
    print(*a, flush=True)


def padded_batches(split, steps: int) -> list[dict]:
    return [collate(split, range(i * SEQS_PER_STEP, (i + 1) * SEQS_PER_STEP), pad_token_id=0) for i in range(steps)]


# ----------------------------------------------------------------------------- methods
def run_evo(size, gc_on, batches, warmup, device, dtype, packing=None, profile_to=None, compile_layers=None,
            liger=False):
    from evo_sft.kernels.liger import apply_liger_layer_kernels
    from evo_sft.sft.agent import SFT

    model = build_model(size, device, dtype)
    agent = SFT(pad_token_id=0, pad_token="<pad>", actor_network=model, lora_config=lora_config(),
                batch_size=SEQS_PER_STEP, lr=LR, max_grad_norm=1.0, device=str(device),
                gradient_checkpointing=gc_on, packing=packing, use_liger_loss=liger == "liger_loss",
                compile_layers=compile_layers)
    liger_layers = liger == "liger_layers" and apply_liger_layer_kernels(agent.actor)
    losses = []
    for batch in batches[:warmup]:
        losses.append(agent.learn(batch)["mean_loss"])
    sync(device)
    t = time.perf_counter()
    for batch in batches[warmup:]:
        losses.append(agent.learn(batch)["mean_loss"])
    sync(device)
    elapsed = time.perf_counter() - t
    extra = {"packing": agent.packing, "compile_layers": agent.compile_layers, "liger_layers": liger_layers}
    if profile_to is not None and device.type == "cuda":
        try:
            extra["profile"] = profile(agent.learn, batches[warmup:warmup + 2], device, profile_to)
        except Exception as e:  # noqa: BLE001
            extra["profile"] = f"failed: {type(e).__name__}: {e}"
    del agent, model
    return elapsed, losses, extra


class _Timer:
    def __init__(self, warmup, total, device):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step in (warmup, total):
                    sync(device)
                    outer.marks[state.global_step] = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    outer.losses.append(logs["loss"])

        self.marks, self.losses, self.callback = {}, [], Callback()


def run_trl(size, gc_on, batches, warmup, device, dtype, split, variant):
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from torch.utils.data import SequentialSampler
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    class SequentialSFTTrainer(SFTTrainer):  # same batches, in the same order, as the other methods
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>")),
        pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    steps = len(batches)
    rows = range(steps * SEQS_PER_STEP)
    labels = []
    for r in rows:
        ids, p = split.input_ids[r], split.prompt_lengths[r]
        labels.append([IGNORE_INDEX] * p + ids[p:])
    import pyarrow as pa

    table = pa.Table.from_pydict({"input_ids": [split.input_ids[r] for r in rows], "labels": labels})
    dataset = Dataset(table, fingerprint=f"bench-{size}-{steps}")
    model = build_model(size, device, dtype)
    kwargs = dict(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=SEQS_PER_STEP,
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=LR, gradient_checkpointing=gc_on,
        save_strategy="no", report_to="none", max_length=None, disable_tqdm=True, logging_steps=steps,
        dataloader_num_workers=0, seed=0, bf16=device.type == "cuda",
        # the data is already tokenised with labels; skipping TRL's dataset.map changes no step
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    if device.type != "cuda":
        kwargs["use_cpu"] = True
    if "pf" in variant.split("_"):
        kwargs["padding_free"] = True
    if "liger" in variant:
        kwargs["use_liger_kernel"] = True
    args = SFTConfig(**kwargs)
    timer = _Timer(warmup, steps, device)
    trainer = SequentialSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                   peft_config=lora_config(), callbacks=[timer.callback])
    trainer.train()
    elapsed = timer.marks[steps] - timer.marks[warmup]
    extra = {"attn": getattr(trainer.model.config, "_attn_implementation", "?")}
    del trainer, model
    return elapsed, timer.losses, extra


# ----------------------------------------------------------------------------- correctness
def check_packed_matches_padded(size, device, dtype, batch) -> dict:
    """bf16 on the GPU: packed loss and LoRA grads against the padded path, same weights."""
    from evo_sft.sft.agent import SFT
    from evo_sft.sft.step import micro_loss_sum

    results = {}
    grads = {}
    for packing, run_dtype in ((None, torch.float32), (False, dtype), (True, dtype)):
        model = build_model(size, device, torch.float32).to(run_dtype)
        agent = SFT(pad_token_id=0, pad_token="<pad>", actor_network=model, lora_config=lora_config(),
                    batch_size=SEQS_PER_STEP, lr=LR, device=str(device), gradient_checkpointing=False,
                    packing=bool(packing))
        agent.actor.eval()  # no LoRA dropout, so both paths compute the same function
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in agent.actor.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        tokens = step_stats(batch)["supervised"]
        loss = micro_loss_sum(agent, batch) / tokens
        loss.backward()
        results[packing] = float(loss.detach())
        grads[packing] = {n: p.grad.float().clone() for n, p in agent.trainable_parameters().items()}
        del agent, model
        free(device)
    def flat(key):
        return torch.cat([g.flatten() for g in grads[key].values()])

    def rel(a, b):
        return float((flat(a) - flat(b)).norm() / flat(b).norm())

    return {"loss_fp32_padded": results[None], "loss_bf16_padded": results[False], "loss_bf16_packed": results[True],
            "loss_rel_packed_vs_padded": abs(results[True] - results[False]) / abs(results[False]),
            "grad_rel_packed_vs_padded": rel(True, False),
            "grad_rel_packed_vs_fp32": rel(True, None), "grad_rel_padded_vs_fp32": rel(False, None),
            "grad_rel_per_tensor_max_packed_vs_fp32": max(
                float((grads[True][n] - grads[None][n]).norm() / grads[None][n].norm()) for n in grads[None])}


# ----------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and short sequences (CPU smoke run)")
    parser.add_argument("--models", default="0.5b,3b")
    parser.add_argument("--gc", default="off,on")
    parser.add_argument("--methods", default="evo,evo_eager,trl_default,trl_liger,trl_pf_liger")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--profile", default="", help="evo methods to profile for two steps, comma-separated")
    parser.add_argument("--out", help="folder for results.jsonl (the run's header first, then a line a row) and "
                                      "profiles; default $OUT/bench_sft_step, else experiments/results/bench_sft_step "
                                      "(a new temporary folder with --tiny)")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = ["tiny"] if args.tiny else args.models.split(",")
    if args.tiny:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
    out = output_folder("bench_sft_step", args.out, args.tiny)
    results_path = out / "results.jsonl"
    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "card": card(device), "versions": versions(), "lora": LORA, "seqs_per_step": SEQS_PER_STEP,
              "warmup": args.warmup, "timed_steps": args.steps}
    log(json.dumps(header))
    peak = matmul_tflops(device, args.tiny)
    header["matmul_tflops"] = peak
    log(f"bf16 matmul (8192^3): {peak:.0f} TFLOP/s" if not args.tiny else f"matmul: {peak:.2f} TFLOP/s")
    append_jsonl(results_path, {"header": header})
    log(f"results: {results_path}")

    total_steps = args.warmup + args.steps
    rows = []
    methods = args.methods.split(",")
    if importlib.util.find_spec("trl") is None and any(m.startswith("trl") for m in methods):
        log("trl is not installed: its methods are left out (evo is compared with evo_eager)")
        methods = [m for m in methods if not m.startswith("trl")]
    # methods that use Liger patch transformers' Qwen2 module globally, so they run last
    phases = [[m for m in methods if "liger" not in m], [m for m in methods if "liger" in m]]
    for phase in phases:
        if phase:
            run_phase(phase, models, args, device, dtype, peak, total_steps, out, results_path, rows)
    print_table(rows, header)


def run_phase(methods, models, args, device, dtype, peak, total_steps, out, results_path, rows):
    for size in models:
        shape = SHAPES[size]
        split = make_rows(total_steps * SEQS_PER_STEP, shape["vocab_size"], args.tiny)
        batches = padded_batches(split, total_steps)
        timed = [step_stats(b) for b in batches[args.warmup:]]
        supervised = sum(s["supervised"] for s in timed)
        flops = sum(useful_flops(shape, s) for s in timed)
        padding = 1 - sum(s["real"] for s in timed) / sum(s["padded"] for s in timed)
        log(f"\n== {size}: {supervised / args.steps:.0f} supervised tokens/step, "
            f"{sum(s['real'] for s in timed) / args.steps:.0f} real tokens/step, padding {padding:.0%}, "
            f"useful {flops / args.steps / 1e12:.2f} TFLOP/step")
        if device.type == "cuda" and "liger" not in methods[0]:
            try:
                check = check_packed_matches_padded(size, device, dtype, batches[0])
                log(f"   packed vs padded (bf16, eval mode): {json.dumps(check)}")
                append_jsonl(results_path, {"size": size, "check": check})
            except Exception:  # noqa: BLE001
                log("   packed vs padded check FAILED:\n" + traceback.format_exc())
        for gc_setting in args.gc.split(","):
            gc_on = gc_setting == "on"
            for method in methods:
                free(device)
                try:
                    if method.startswith("evo"):
                        prof = (out / f"profile_{size}_gc{gc_setting}_{method}.txt"
                                if method in args.profile.split(",") else None)
                        elapsed, losses, extra = run_evo(size, gc_on, batches, args.warmup, device, dtype,
                                                         packing=False if method == "evo_padded" else None,
                                                         profile_to=prof,
                                                         compile_layers=False if "eager" in method else None,
                                                         liger="liger_layers" if "liger" in method else False)
                    else:
                        elapsed, losses, extra = run_trl(size, gc_on, batches, args.warmup, device, dtype, split,
                                                         variant=method)
                except Exception as e:  # noqa: BLE001
                    log(f"   {method} gc={gc_setting}: FAILED {type(e).__name__}: {e}")
                    traceback.print_exc()
                    append_jsonl(results_path, {"size": size, "gc": gc_setting, "method": method,
                                                "error": f"{type(e).__name__}: {e}"[:2000]})
                    continue
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
                row = {"size": size, "gc": gc_setting, "method": method, "step_s": elapsed / args.steps,
                       "tok_s": supervised / elapsed, "peak_gib": mem,
                       "mfu": flops / elapsed / (peak * 1e12), "first_loss": losses[0] if losses else None,
                       "last_loss": losses[-1] if losses else None, **{k: v for k, v in extra.items()}}
                rows.append(row)
                log(f"   {method:13s} gc={gc_setting:3s} step {row['step_s'] * 1e3:8.1f} ms  "
                    f"{row['tok_s']:9.0f} sup tok/s  peak {mem:6.2f} GiB  MFU {row['mfu']:.1%}  "
                    f"loss {row['first_loss']} -> {row['last_loss']}")
                if "profile" in extra:
                    log(f"   profile: {json.dumps(extra['profile'])}")
                append_jsonl(results_path, row)


def print_table(rows, header):
    log(f"\n# card: {header['card']}   date: {header['date']}")
    log("# " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()))
    log(f"# bf16 matmul measured: {header.get('matmul_tflops', float('nan')):.0f} TFLOP/s; "
        f"{header['timed_steps']} timed steps after {header['warmup']} warm-up, {SEQS_PER_STEP} seqs/step")
    log("| model | GC | method | step ms | sup tok/s | peak GiB | MFU | x evo_eager | x trl_default | x trl_fast |")
    log("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in dict.fromkeys(r["size"] for r in rows):
        for gc_setting in sorted(dict.fromkeys(r["gc"] for r in rows if r["size"] == size)):
            group = [r for r in rows if r["size"] == size and r["gc"] == gc_setting]
            group.sort(key=lambda r: (not r["method"].startswith("evo"), r["method"] != "trl_default", r["method"]))
            eager = next((r for r in group if r["method"] == "evo_eager"), None)
            default = next((r for r in group if r["method"] == "trl_default"), None)
            fast = [r for r in group if r["method"].startswith("trl_") and r["method"] != "trl_default"]
            fast = max(fast, key=lambda r: r["tok_s"]) if fast else None
            for r in group:
                x_eager = f"{r['tok_s'] / eager['tok_s']:.2f}" if eager else "-"
                x_default = f"{r['tok_s'] / default['tok_s']:.2f}" if default else "-"
                x_fast = f"{r['tok_s'] / fast['tok_s']:.2f}" if fast else "-"
                name = r["method"] + (" (trl_fast)" if fast is r else "")
                log(f"| {size} | {gc_setting} | {name} | {r['step_s'] * 1e3:.1f} | {r['tok_s']:.0f} | "
                    f"{r['peak_gib']:.2f} | {r['mfu']:.1%} | {x_eager} | {x_default} | {x_fast} |")


if __name__ == "__main__":
    main()
