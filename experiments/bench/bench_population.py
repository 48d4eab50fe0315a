#!/usr/bin/env python3
"""A population on one GPU: members sharing one base model against one model copy per member
(issue 9), through the product's own path (`build.local_hosts`, `Controller`, checkpoints).

For each model shape (Qwen2.5-0.5B / -3B, random bf16 weights saved with `save_pretrained`) and
each population size k, it builds the population, runs a first generation of `--warmup` steps (untimed:
compilation, and no evolution step, since selection opens a generation), then
times `--generations` full generations of `--steps` optimizer steps (train, evaluate, select,
clone, mutate, record, checkpoint; medians reported). It prints, per row: peak GPU memory (and
its ratio to one member alone), aggregate supervised tokens/s (and its ratio to one member
alone), MFU over a bf16 matmul measured in the same run, and the evolution step (select + clone
+ mutate + record + checkpoint) as a share of a generation of 100 optimizer steps per member.
The checkpoint is written while the next generation trains, as in a run: its share is the time
the generation spends copying the members plus any wait for the commit after that training, and
each row records how much slower that training ran (`train_with_writes_x`).

  together    k members on one base model (population.members_per_actor = k), stepped together:
              each optimizer step sends all k members' micro-batches through one forward and
              backward, each member keeping its own adapter, loss and optimizer step
  shared      k members on one base model, trained one after another (step_together off)
  copies      one model copy per member (members_per_actor = 1), all on the same GPU
  ray xG GPU  (--ray-gpus) G Ray actors of one GPU each, --per-gpu members sharing the base
              model in each (stepped together): the population over G GPUs against 1 GPU

Data: rows of random letters, prompts 16-128 tokens, responses lognormal with median ~180 (the
lengths of `common.make_rows`, as in bench_sft_step.py; `common.write_text_rows`), one token a
letter with the demo's byte-level tokenizer, prepared as a run prepares its data
(`build.prepare_data`: chat template, 64 rows held out as the test set); 16 sequences per optimizer step and member; LoRA
r=16/alpha 64 on q,k,v,o without dropout (stepping together needs lora_dropout 0); gradient
checkpointing on (so that 8 copies of the 3B shape fit on one card). `--check` first compares, on
the 0.5B shape, members stepped together with the same members trained alone (losses and adapter
updates).

    python experiments/bench/bench_population.py                           # GPU
    python experiments/bench/bench_population.py --members "" --ray-gpus 1,2   # 2-GPU machine, Ray
    python experiments/bench/bench_population.py --tiny --device cpu       # quick CPU smoke run

Each row and check is appended to results.jsonl in --out (see --help), with the run's header.
"""
import argparse
import datetime
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import (
    SHAPES, append_jsonl, card, free, matmul_tflops, output_folder, population_data, population_experiment, profile,
    save_base, step_stats, sync, useful_flops, versions,
)

from evo_sft import build
from evo_sft.config import config_from_dict
from evo_sft.controller import Controller
from evo_sft.data import TokenizedSplit, collate
from evo_sft.data.demo import build_tokenizer
from evo_sft.data.sources import load_tokenizer
from evo_sft.io.checkpoint import EvolutionCheckpointer
from evo_sft.kernels.loss import supervised_token_count
from evo_sft.population import step_together
from evo_sft.population.local import LocalPopulation
from evo_sft.sft.step import micro_loss_sum

STEPS_PER_GENERATION = 100  # the generation the evolution-step share is reported for


class TimedPopulation:
    """Forwards to a population and adds up the seconds each method took (GPU work included)."""

    def __init__(self, population, device):
        self.population, self.device, self.seconds = population, device, {}

    def __getattr__(self, name):
        value = getattr(self.population, name)
        if not callable(value):
            return value

        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            result = value(*args, **kwargs)
            sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            return result

        return timed

    def __setattr__(self, name, value):
        if name in ("population", "device", "seconds"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.population, name, value)


def timed_generation(population, controller, steps: int, device) -> dict:
    """One generation (train, evaluate, select, clone, mutate, record, checkpoint), then the next
    generation's training, as in a run, while the checkpoint is written; what is left of the
    writes after that training is waited for, as before scoring."""
    population.seconds.clear()
    sync(device)
    start = time.perf_counter()
    record = controller.run_generation()
    generation_s = time.perf_counter() - start
    train_s, evaluate_s = population.seconds["train"], population.seconds["evaluate"]
    next_train = population.train(steps)
    train_with_writes_s = population.seconds["train"] - train_s
    start = time.perf_counter()
    controller.checkpointer.settle(controller)
    commit_wait_s = time.perf_counter() - start
    parts = {f"{name}_part_s": s for name, s in population.seconds.items() if name not in ("train", "evaluate")}
    return {"record": record, "train_s": train_s, "evaluate_s": evaluate_s,
            "evolution_s": generation_s - train_s - evaluate_s + commit_wait_s,
            "tok_s": sum(t.tokens for t in record.train) / train_s,
            "train_with_writes_x": train_with_writes_s / train_s,
            "tok_s_next": sum(t.tokens for t in next_train) / train_with_writes_s,
            **parts, "commit_wait_part_s": commit_wait_s}


def measure(size, k, layout, args, device, paths, prepared, flops_per_token, peak_tflops, gpus: int = 0,
            compile_layers: bool = False) -> dict:
    """One GPU in this process (`gpus` 0), or `gpus` Ray actors of one GPU each, `k // gpus`
    members sharing the base model in each."""
    free(device)
    together = layout != "shared"
    if gpus:
        layout = f"ray x{gpus} GPU"
    members_per_actor = k // gpus if gpus else (1 if layout == "copies" else k)
    if compile_layers:
        layout += " +compile"
    config = config_from_dict(population_experiment(
        k, members_per_actor, together, "ray" if gpus else "local", paths["model"], paths["tokenizer"], paths["data"],
        paths["runs"] / f"{size}-{k}-{layout.replace(' ', '')}", device, args.steps, compile_layers))
    start = time.perf_counter()
    founders = build.founder_hyperparameters(config)
    if gpus:
        from evo_sft.population.ray_backend import RayPopulation

        population = TimedPopulation(RayPopulation(build.member_recipe(config, str(paths["model"])), prepared, founders,
                                                   num_cpus=2 if device.type == "cuda" else 1,
                                                   num_gpus=config.population.num_gpus,
                                                   members_per_actor=k // gpus),
                                     torch.device("cpu"))  # ray.get returns when the actors are done
    else:
        population = TimedPopulation(
            LocalPopulation(build.local_hosts(config, str(paths["model"]), prepared, founders)), device)
    build_s = time.perf_counter() - start
    selection, mutations = build.selection_and_mutations(config)
    controller = Controller(population, build.hp_config(config), args.warmup, config.seed, selection=selection,
                            mutations=mutations, micro_batch_size=16,
                            checkpointer=EvolutionCheckpointer(Path(config.run_dir), 1, 1))
    # The first generation warms up (compiled layers compile their training and no-grad graphs);
    # selection opens a generation, so every timed one has its evolution step.
    controller.run_generation()
    controller.checkpointer.settle(controller)
    controller.steps_per_generation = args.steps
    generations = [timed_generation(population, controller, args.steps, device) for _ in range(args.generations)]
    timed = {key: statistics.median(g[key] for g in generations) for key in generations[0] if key != "record"}
    record = generations[-1]["record"]
    clones_each = [sum(d.clone for d in g["record"].decisions) for g in generations]
    generation_100 = timed["train_s"] * STEPS_PER_GENERATION / args.steps + timed["evaluate_s"] + timed["evolution_s"]
    row = {
        "model": size, "members": k, "layout": layout,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" and not gpus
        else float("nan"),
        "build_s": build_s, "step_ms": 1000 * timed["train_s"] / (k * args.steps), "tok_s": timed["tok_s"],
        "mfu": timed["tok_s"] * flops_per_token / (peak_tflops * 1e12 * max(1, gpus)),  # per GPU
        "evaluate_s": timed["evaluate_s"], "evolution_s": timed["evolution_s"],
        "evolution_parts_s": {name.removesuffix("_part_s"): s for name, s in timed.items() if name.endswith("_part_s")},
        "train_with_writes_x": timed["train_with_writes_x"],  # the next generation's training, writes in flight
        "tok_s_next": timed["tok_s_next"],
        "evolution_share_100": timed["evolution_s"] / generation_100,
        "clones": clones_each[-1],
        "train_s_per_slot": [t.seconds for t in record.train],  # one actor's call: a straggler shows here
        "generations": len(generations),  # the figures above are medians over these timed generations
        "evolution_s_each": [g["evolution_s"] for g in generations],
        "clone_s_each": [g["clone_part_s"] for g in generations],
        "clones_each": clones_each,
        "save_s_each": [g["save_part_s"] for g in generations],
    }
    population.close()
    del controller, population, record
    free(device)
    return row


def check_together(size, args, device, paths, prepared, k: int = 4) -> dict:
    """The first step's adapter gradients of k members stepped together against each member's
    own packed step, and (the bf16 noise floor) each member's packed step against its padded step;
    each member's step with compiled decoder layers against its eager packed step."""
    def agents_and_batches(members_per_actor: int, packing: bool, compile_layers: bool = False):
        config = population_experiment(k, members_per_actor, True, "local", paths["model"], paths["tokenizer"], paths["data"],
                                       paths["runs"] / f"check-{size}-{members_per_actor}", device, 1,
                                       compile_layers)
        config["agent"]["packing"] = packing
        config = config_from_dict(config)
        hosts = build.local_hosts(config, str(paths["model"]), prepared, build.founder_hyperparameters(config))
        return hosts, [host.gym.batch(host.stream, 16) for host in hosts]

    def own_step(host, batch) -> torch.Tensor:
        loss = micro_loss_sum(host.agent, batch) / supervised_token_count(batch["labels"])
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in host.agent.trainable_parameters().values()])
        host.agent.optimizer.zero_grad(set_to_none=True)
        return grads

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    free(device)
    grads = {}
    for packing, compile_layers in ((False, False), (True, False), (True, True)):
        hosts, batches = agents_and_batches(1, packing, compile_layers)
        for host in hosts:
            host.agent.set_training_mode(True)
        grads[packing, compile_layers] = [own_step(host, batch) for host, batch in zip(hosts, batches)]
        del hosts
        free(device)
    hosts, batches = agents_and_batches(k, True)
    base = hosts[0].base
    base.park()
    base.agent.set_training_mode(True)
    names = list(base.agent.trainable_parameters())
    together, _, _ = step_together.forward_backward(
        base.agent, step_together.lora_layers(base.agent), [base.parked[h.slot]["weights"] for h in hosts], batches,
        [16] * k, [base._scaling(h.slot) for h in hosts])
    together = [torch.cat([g[name].float().flatten() for name in names]) for g in together]
    return {
        "check": f"first-step adapter gradients, {k} members", "model": size,
        "together_vs_own_packed_max_rel": max(rel(a, b) for a, b in zip(together, grads[True, False])),
        "own_packed_vs_own_padded_max_rel": max(rel(a, b) for a, b in zip(grads[True, False], grads[False, False])),
        "own_compiled_vs_own_packed_max_rel": max(rel(a, b) for a, b in zip(grads[True, True], grads[True, False])),
    }


def profile_together(size, args, device, paths, prepared, out: Path, k: int = 8) -> dict:
    """A torch.profiler trace summary of 2 optimizer steps of k members stepped together, with
    compiled layers where `--compile` has "on" (the next row frees the population's GPU memory)."""
    compile_layers = "on" in args.compile.split(",")
    config = config_from_dict(population_experiment(k, k, True, "local", paths["model"], paths["tokenizer"], paths["data"],
                                                    paths["runs"] / f"profile-{size}", device, 1, compile_layers))
    population = LocalPopulation(build.local_hosts(config, str(paths["model"]), prepared,
                                                   build.founder_hyperparameters(config)))
    population.train(2)
    suffix = "_compiled" if compile_layers else ""
    summary = profile(lambda _: population.train(1), [0, 1], device, out / f"profile_{size}_together{k}{suffix}.txt")
    return {"profile": f"{k} members stepped together, 2 steps", "model": size, "compile_layers": compile_layers,
            **summary}


def print_table(rows):
    """Ratios against one member alone on one GPU and, for Ray rows, against the Ray row on 1 GPU,
    each with the same compile setting."""
    def setting(r):
        return r["model"], r["layout"].endswith("+compile")

    alone = {setting(r): r for r in rows if r["layout"].startswith("alone")}
    one_gpu = {setting(r): r for r in rows if r["layout"].startswith("ray x1 GPU")}
    print("| model | members | layout | peak GiB | x one member | step ms | agg sup tok/s | x one member | x ray 1 GPU "
          "| next generation tok/s | its x ray 1 GPU | train x (writes in flight) | MFU | clones | evolution s "
          "| evolution share (100 steps) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    nan = {"peak_gib": float("nan"), "tok_s": float("nan"), "tok_s_next": float("nan")}
    for r in rows:
        one, gpu = alone.get(setting(r), nan), one_gpu.get(setting(r), nan)
        ray_row = r["layout"].startswith("ray")
        scaling = f"{r['tok_s'] / gpu['tok_s']:.2f}" if ray_row else ""
        next_scaling = f"{r['tok_s_next'] / gpu['tok_s_next']:.2f}" if ray_row else ""
        print(f"| {r['model']} | {r['members']} | {r['layout']} | {r['peak_gib']:.2f} | "
              f"{r['peak_gib'] / one['peak_gib']:.2f} | {r['step_ms']:.1f} | {r['tok_s']:.0f} | "
              f"{r['tok_s'] / one['tok_s']:.2f} | {scaling} | {r['tok_s_next']:.0f} | {next_scaling} | "
              f"{r['train_with_writes_x']:.2f} | {100 * r['mfu']:.1f}% | {r['clones']} | "
              f"{r['evolution_s']:.2f} | {100 * r['evolution_share_100']:.2f}% |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: the tiny model; unless given, members 1,2, 1 warm-up and 1 timed step, "
                             "compile off")
    parser.add_argument("--models", default="0.5b,3b")
    parser.add_argument("--members", help="population sizes (default: 1,4,8)")
    parser.add_argument("--warmup", type=int, help="optimizer steps of the untimed first generation (default: 2)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per member (default: 5)")
    parser.add_argument("--layouts", default="together,shared,copies", help="for more than one member on one GPU")
    parser.add_argument("--check", action="store_true", help="first compare stepping together with training alone")
    parser.add_argument("--profile", action="store_true", help="profile 8 members stepped together (top kernels)")
    parser.add_argument("--ray-gpus", default="", help="e.g. 1,2: Ray actors of one GPU each, --per-gpu members each")
    parser.add_argument("--per-gpu", type=int, default=4, help="members sharing the base model on each GPU (Ray rows)")
    parser.add_argument("--compile", help="agent.compile_layers for every row: on (the default on a GPU), off, or "
                                          "off,on (default: on)")
    parser.add_argument("--generations", type=int, default=1, help="timed generations per row (medians reported)")
    parser.add_argument("--work", help="folder for the saved models, kept between runs (default: a new temp folder)")
    parser.add_argument("--out", help="folder for results.jsonl and profiles; default $OUT/bench_population, else "
                                      "experiments/results/bench_population (a new temporary folder with --tiny)")
    args = parser.parse_args()
    for name, full, tiny in (("members", "1,4,8", "1,2"), ("warmup", 2, 1), ("steps", 5, 1), ("compile", "on", "off")):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = ["tiny"] if args.tiny else args.models.split(",")
    out = output_folder("bench_population", args.out, args.tiny)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-population-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_path = work / "tokenizer"
    build_tokenizer().save_pretrained(tokenizer_path)
    peak = matmul_tflops(device, args.tiny)
    if args.ray_gpus:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(_temp_dir=str(work / "ray"), include_dashboard=False, log_to_driver=False)
    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "card": card(device), "bf16_matmul_tflops": peak, "versions": versions(),
              "warmup": args.warmup, "steps": args.steps}
    print(json.dumps(header), flush=True)
    print(f"results: {out / 'results.jsonl'}", flush=True)
    rows = []
    for size in models:
        paths = {"model": save_base(size, work, dtype), "tokenizer": tokenizer_path,
                 "data": population_data(work, args.tiny), "runs": work / "runs"}
        prepared = build.prepare_data(config_from_dict(population_experiment(
            1, 1, True, "local", paths["model"], paths["tokenizer"], paths["data"], paths["runs"] / "data", device,
            1)), load_tokenizer(str(tokenizer_path)))
        split = TokenizedSplit.from_dict(prepared["train"])
        stats = step_stats(collate(split, range(len(split)), pad_token_id=0))
        flops_per_token = useful_flops(SHAPES[size], stats) / stats["supervised"]
        extras = ([check_together(size, args, device, paths, prepared)] if args.check else []) + (
            [profile_together(size, args, device, paths, prepared, out)] if args.profile else [])
        for extra in extras:
            print(json.dumps(extra), flush=True)
            append_jsonl(out / "results.jsonl", {**header, **extra})
        runs = [(k, layout, 0) for k in (int(m) for m in args.members.split(",") if m)
                for layout in (("alone",) if k == 1 else args.layouts.split(","))]
        runs += [(g * args.per_gpu, "", g) for g in (int(g) for g in args.ray_gpus.split(",") if g)]
        for (k, layout, gpus), compile_layers in itertools.product(runs, [c == "on" for c in args.compile.split(",")]):
            row = measure(size, k, layout, args, device, paths, prepared, flops_per_token, peak, gpus, compile_layers)
            rows.append(row)
            print(json.dumps(row), flush=True)
            append_jsonl(out / "results.jsonl", {**header, **row})
    print_table(rows)


if __name__ == "__main__":
    main()
