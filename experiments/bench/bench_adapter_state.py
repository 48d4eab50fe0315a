#!/usr/bin/env python3
"""Reading a member's adapter for a checkpoint: PEFT's `get_peft_model_state_dict` (the baseline,
which walks every module and the whole state dict of the model on each call) against
`evo_sft.sft.state.adapter_state` (PEFT asked once, then the bound parameters read), and the whole
`checkpoint_snapshot` of the member with each of the two, in the same run. Random Qwen2 weights
of the 0.5B / 3B shapes, LoRA r16 on q,k,v,o as in bench_population.py; one optimizer step first,
so the AdamW moments exist.
This is host-side Python: the CPU measures it as well as a GPU machine's host (not its copies).

    python experiments/bench/bench_adapter_state.py --models 0.5b          # CPU
    python experiments/bench/bench_adapter_state.py --models 0.5b,3b --device cuda
    python experiments/bench/bench_adapter_state.py --tiny                 # quick CPU smoke run

The rows are appended to results.jsonl in --out (see --help).
"""
import argparse
import statistics
import time

import torch
from common import SHAPES, about, append_results, build_model, lora_config, make_rows, output_folder, sync, utc_stamp
from peft import get_peft_model_state_dict

from evo_sft.data import collate
from evo_sft.sft import state
from evo_sft.sft.agent import ACTOR, SFT


def median_ms(fn, device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="0.5b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tiny", action="store_true", help="the tiny shape, one repeat: a smoke run")
    parser.add_argument("--out", help="folder for results.jsonl; default $OUT/bench_adapter_state, else "
                                      "experiments/results/bench_adapter_state (a new temporary folder with --tiny)")
    args = parser.parse_args()
    device = torch.device(args.device)
    models, repeats = (["tiny"], 1) if args.tiny else (args.models.split(","), args.repeats)
    out = output_folder("bench_adapter_state", args.out, args.tiny)
    stamp = utc_stamp()
    print(about(device, stamp))
    print("| model | adapter tensors | read | ms (median) | x baseline |")
    print("|---|---:|---|---:|---:|")
    rows = []
    for model_name in models:
        model = build_model(model_name, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        agent = SFT(pad_token_id=0, pad_token="<pad>", actor_network=model, lora_config=lora_config(), batch_size=2,
                    lr=1e-4, device=str(device), compile_layers=False)
        agent.learn(collate(make_rows(2, SHAPES[model_name]["vocab_size"], tiny=True), range(2), pad_token_id=0))
        tensors = len(state.adapter_state(agent, ACTOR))

        def through_peft(agent, adapter):
            return get_peft_model_state_dict(agent.actor, adapter_name=adapter)

        def snapshot_through_peft():
            bound, state.adapter_state = state.adapter_state, through_peft  # for the baseline row only
            try:
                agent.checkpoint_snapshot()
            finally:
                state.adapter_state = bound

        pairs = [("adapter: PEFT get_peft_model_state_dict (baseline)", lambda: through_peft(agent, ACTOR)),
                 ("adapter: evo_sft.sft.state.adapter_state", lambda: state.adapter_state(agent, ACTOR)),
                 ("checkpoint_snapshot, adapter through PEFT (baseline)", snapshot_through_peft),
                 ("checkpoint_snapshot", agent.checkpoint_snapshot)]
        baseline_ms = None
        for index, (way, fn) in enumerate(pairs):
            ms = median_ms(fn, device, repeats)
            if index % 2 == 0:
                baseline_ms = ms
            rows.append(dict(model=model_name, tensors=tensors, read=way, ms=ms, x_baseline=baseline_ms / ms))
            print(f"| {model_name} | {tensors} | {way} | {ms:.1f} | {baseline_ms / ms:.2f} |", flush=True)
    append_results(out, rows, stamp, device)
    print(f"results: {out / 'results.jsonl'}")


if __name__ == "__main__":
    main()
