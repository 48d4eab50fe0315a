#!/usr/bin/env python3
"""Saving a generation checkpoint of k members: this tree's `evo_sft.io.storage` against the one of
a named git revision, in the same run. Each member is an atomic directory (manifest, sha256,
fsync) inside the generation's atomic directory, as `EvolutionCheckpointer` writes them; a
member's state is random float32 tensors of about the size of a 3B LoRA-r16 member with its
AdamW moments (88 MB). Revisions before `write_snapshots` write the members one after another.

    python experiments/bench/bench_checkpoint_save.py --baseline-rev 11d299e
    python experiments/bench/bench_checkpoint_save.py --baseline-rev HEAD --members 1 --repeats 1   # quick
"""
import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import safetensors
import torch
from common import ROOT, STORAGE_PATHS, module_at, utc_stamp

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
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=str(ROOT), help="where to write (the disk being measured)")
    args = parser.parse_args()
    impls = {f"baseline {args.baseline_rev}": module_at(STORAGE_PATHS, args.baseline_rev, args.baseline_file),
             "this tree": tree_storage}
    state = {f"t{i}": torch.randn(1_000_000) for i in range(22)}
    results = {name: {"save": [], "verify": []} for name in impls}
    for _ in range(args.repeats):
        for name, storage in impls.items():
            root = Path(tempfile.mkdtemp(dir=args.dir))
            start = time.perf_counter()
            with storage.atomic_directory(root / "generation") as tmp:
                write_members(storage, state, args.members, tmp / "members")
            results[name]["save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            storage.verify_directory(root / "generation")
            results[name]["verify"].append(time.perf_counter() - start)
            shutil.rmtree(root)
    print(f"{utc_stamp()}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, safetensors {safetensors.__version__}, writing under {args.dir}")
    print(f"| storage | save of {args.members} members x 88 MB, s (median of {args.repeats}) | verify, s |")
    print("|---|---:|---:|")
    for name, times in results.items():
        print(f"| {name} | {sorted(times['save'])[len(times['save']) // 2]:.2f} | "
              f"{sorted(times['verify'])[len(times['verify']) // 2]:.2f} |")


if __name__ == "__main__":
    main()
