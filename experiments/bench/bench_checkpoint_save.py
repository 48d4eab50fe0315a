#!/usr/bin/env python3
"""Saving a generation checkpoint of k members: this tree's `evo_sft.io.storage` against the one of
a named git revision, in the same run. Each member is an atomic directory (manifest, sha256,
fsync) inside the generation's atomic directory, as `EvolutionCheckpointer` writes them; a
member's state is random float32 tensors of about the size of a 3B LoRA-r16 member with its
AdamW moments (88 MB; 0.9 MB with --tiny). Revisions before `write_snapshots` write the members one
after another.

    python experiments/bench/bench_checkpoint_save.py --baseline-rev 11d299e
    python experiments/bench/bench_checkpoint_save.py --baseline-rev HEAD --tiny     # smoke run

The rows are appended to results.jsonl in --out (see common.output_folder).
"""
import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import safetensors
import torch
from common import ROOT, STORAGE_PATHS, append_results, module_at, output_folder, utc_stamp

from evo_sft.io import storage as tree_storage


def write_members(storage, state: dict, members: int, directory: Path) -> None:
    """As the population writes its members: copied one after another and written on a pool of
    threads where the storage module has `write_snapshots`, else each copied and written in turn."""
    if not hasattr(storage, "write_snapshots"):
        for slot in range(members):
            with storage.atomic_directory(directory / f"slot_{slot}") as member:
                storage.save_tensors(member / "state.safetensors", state)
        return

    def snapshot(slot: int):
        member, files = storage.Snapshot(), storage.Snapshot()
        files.tensors("state.safetensors", state)
        member.directory(f"slot_{slot}", files)
        return member

    pending = storage.write_snapshots((snapshot(slot) for slot in range(members)), directory)
    if pending is not None:  # since 0cecc5b the writes go on after write_snapshots returns
        pending.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-rev", required=True)
    parser.add_argument("--baseline-file", help="that revision's storage module, where there is no git "
                                                "(`git show REV:evo_sft/io/storage.py > FILE`; "
                                                "evo_sft/storage.py before a3fc743)")
    parser.add_argument("--members", type=int, help="members a checkpoint holds (default: 8; 2 with --tiny)")
    parser.add_argument("--repeats", type=int, help="saves of each storage, median reported (default: 3; 1 with --tiny)")
    parser.add_argument("--dir", help="where to write (the disk being measured; default: the repository, the "
                                      "temporary folder with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="members of 0.9 MB: a smoke run")
    parser.add_argument("--out", help="folder for results.jsonl; default $OUT/bench_checkpoint_save, else "
                                      "experiments/results/bench_checkpoint_save (a new temporary folder with --tiny)")
    args = parser.parse_args()
    members = args.members or (2 if args.tiny else 8)
    repeats = args.repeats or (1 if args.tiny else 3)
    where = args.dir or (tempfile.gettempdir() if args.tiny else str(ROOT))
    out = output_folder("bench_checkpoint_save", args.out, args.tiny)
    impls = {f"baseline {args.baseline_rev}": module_at(STORAGE_PATHS, args.baseline_rev, args.baseline_file),
             "this tree": tree_storage}
    state = {f"t{i}": torch.randn(10_000 if args.tiny else 1_000_000) for i in range(22)}
    member_mb = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
    results = {name: {"save": [], "verify": []} for name in impls}
    for _ in range(repeats):
        for name, storage in impls.items():
            root = Path(tempfile.mkdtemp(dir=where))
            start = time.perf_counter()
            with storage.atomic_directory(root / "generation") as tmp:
                write_members(storage, state, members, tmp / "members")
            results[name]["save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            storage.verify_directory(root / "generation")
            results[name]["verify"].append(time.perf_counter() - start)
            shutil.rmtree(root)
    stamp = utc_stamp()
    print(f"{stamp}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, safetensors {safetensors.__version__}, writing under {where}")
    print(f"| storage | save of {members} members x {member_mb:.1f} MB, s (median of {repeats}) | verify, s |")
    print("|---|---:|---:|")
    rows = [dict(storage=name, members=members, member_mb=member_mb, save_s=statistics.median(times["save"]),
                 verify_s=statistics.median(times["verify"]), repeats=repeats) for name, times in results.items()]
    for row in rows:
        print(f"| {row['storage']} | {row['save_s']:.2f} | {row['verify_s']:.2f} |")
    append_results(out, rows, stamp, torch.device("cpu"))
    print(f"results: {out / 'results.jsonl'}")


if __name__ == "__main__":
    main()
