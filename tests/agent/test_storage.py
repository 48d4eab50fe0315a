import inspect
import json
import math
import os
import pickle
import re
import threading
import time

import pytest
import torch

from evo_sft.io import storage
from evo_sft.io.storage import (
    CheckpointError,
    atomic_directory,
    flatten_state,
    load_json,
    load_state,
    load_tensors,
    recover_directory,
    save_json,
    unflatten_state,
    verify_directory,
)


def assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert type(k) is type(next(x for x in b if x == k))
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


# --- JSON


def test_json_round_trip_sorted_and_indented(tmp_path):
    obj = {"b": [1, 2.5, None, True, "x"], "a": {"inf": -math.inf}}
    save_json(tmp_path / "x.json", obj)
    text = (tmp_path / "x.json").read_text()
    assert text.index('"a"') < text.index('"b"')
    assert '\n  "a"' in text
    assert load_json(tmp_path / "x.json") == obj


@pytest.mark.parametrize(
    "obj, where",
    [
        ({"a": {"b": [1, (2, 3)]}}, "a.b[1]"),
        ({"a": {1: 2}}, "a"),
        ({"t": torch.zeros(1)}, "t"),
        ({"s": {1, 2}}, "s"),
    ],
)
def test_save_json_rejects_non_json_naming_key_path(tmp_path, obj, where):
    with pytest.raises(TypeError, match="^" + re.escape(where) + ":"):
        save_json(tmp_path / "x.json", obj)
    assert not (tmp_path / "x.json").exists()


def test_load_json_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "missing.json"))):
        load_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "bad.json"))):
        load_json(tmp_path / "bad.json")


# --- tensors


def test_tensors_round_trip_with_shared_storage_and_metadata(tmp_path):
    base = torch.arange(12, dtype=torch.float32, requires_grad=True)
    tensors = {
        "view": base[2:8].view(2, 3),
        "transposed": base.detach().view(3, 4).t(),
        "same": base,
        "scalar": torch.tensor(7, dtype=torch.int64),
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
    }
    snapshot = storage.Snapshot()
    snapshot.tensors("t.safetensors", tensors, metadata={"kind": "test"})
    snapshot.write(tmp_path)
    loaded = load_tensors(tmp_path / "t.safetensors")
    for name, t in tensors.items():
        assert_same(t.detach(), loaded[name])
    assert loaded["scalar"].dim() == 0


def test_load_tensors_reports_truncated_and_missing_file(tmp_path):
    path = tmp_path / "t.safetensors"
    snapshot = storage.Snapshot()
    snapshot.tensors(path.name, {"w": torch.randn(64, 64)})
    snapshot.write(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_tensors(path)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nope.safetensors"))):
        load_tensors(tmp_path / "nope.safetensors")


def test_pickle_file_is_rejected_not_loaded(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_tensors(path)


def test_module_never_unpickles():
    source = inspect.getsource(storage)
    for forbidden in ("torch.load", "import pickle", "pickle.", "torch.save"):
        assert forbidden not in source


# --- nested state


def test_flatten_round_trip_of_mixed_structure():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 2)}, 5: {}},
        "groups": [{"betas": (0.9, 0.999), "params": [0, 5], "foreach": None, "amsgrad": False, "name": "g"}],
        "nested": ((1, [2.0, "x"]), {"deep": {"er": torch.tensor([1, 2], dtype=torch.int32)}}),
        "floats": [math.inf, -math.inf, math.nan, 1e-300, 0.1],
        "empty": {"list": [], "tuple": (), "dict": {}},
    }
    tensors, structure = flatten_state(state)
    json.dumps(structure, allow_nan=False)
    assert set(tensors) == {"state.0.step", "state.0.m", "nested.1.deep.er"}
    assert_same(state, unflatten_state(tensors, json.loads(json.dumps(structure))))


@pytest.mark.parametrize("bad", [{"a": object()}, {(1, 2): 3}, {"a": {True: 1}}])
def test_flatten_rejects_unsupported_values(bad):
    with pytest.raises(TypeError):
        flatten_state(bad)


def make_training(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=1e-4)
    return model, optimizer, [lambda_lr, cosine]


def train_step(model, optimizer, schedulers, step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 4, generator=g)
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for scheduler in schedulers:
        scheduler.step()


def test_optimizer_and_scheduler_state_resume_bit_identical(tmp_path):
    model, optimizer, schedulers = make_training()
    for step in range(3):
        train_step(model, optimizer, schedulers, step)
    snapshot = storage.Snapshot()
    snapshot.tensors("model.safetensors", model.state_dict())
    snapshot.state("optimizer", optimizer.state_dict())
    snapshot.state("schedulers", [s.state_dict() for s in schedulers])
    snapshot.write(tmp_path)

    model2, optimizer2, schedulers2 = make_training(seed=1)
    model2.load_state_dict(load_tensors(tmp_path / "model.safetensors"))
    optimizer_state = load_state(tmp_path, "optimizer")
    assert_same(optimizer.state_dict(), optimizer_state)
    optimizer2.load_state_dict(optimizer_state)
    for scheduler, state in zip(schedulers2, load_state(tmp_path, "schedulers")):
        scheduler.load_state_dict(state)

    for step in range(3, 6):
        train_step(model, optimizer, schedulers, step)
        train_step(model2, optimizer2, schedulers2, step)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert optimizer.param_groups[0]["lr"] == optimizer2.param_groups[0]["lr"]


def test_load_state_reports_mismatched_files(tmp_path):
    state, other = storage.Snapshot(), storage.Snapshot()
    state.state("s", {"w": torch.zeros(2)})
    other.tensors("s.safetensors", {"other": torch.zeros(2)})
    state.write(tmp_path)
    other.write(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "s.json"))):
        load_state(tmp_path, "s")


# --- atomic directories


def write_checkpoint(path, value):
    with atomic_directory(path) as tmp:
        snapshot = storage.Snapshot()
        snapshot.tensors("w.safetensors", {"w": torch.full((32,), float(value))})
        snapshot.write(tmp)
        (tmp / "sub" / "deeper").mkdir(parents=True)
        save_json(tmp / "sub" / "deeper" / "meta.json", {"value": value})


def test_atomic_directory_writes_manifest_for_every_file(tmp_path):
    final = tmp_path / "ckpt"
    write_checkpoint(final, 1)
    manifest = verify_directory(final)
    assert manifest["format"] == "evo-sft-checkpoint" and manifest["version"] == 1
    assert set(manifest["files"]) == {"w.safetensors", "sub/deeper/meta.json"}
    entry = manifest["files"]["w.safetensors"]
    assert entry["bytes"] == (final / "w.safetensors").stat().st_size
    assert len(entry["sha256"]) == 64
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_atomic_directory_replaces_previous_contents(tmp_path):
    final = tmp_path / "ckpt"
    write_checkpoint(final, 1)
    (final / "stale.txt").write_text("from the first write")
    write_checkpoint(final, 2)
    verify_directory(final)
    assert load_json(final / "sub" / "deeper" / "meta.json") == {"value": 2}
    assert not (final / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_exception_inside_atomic_directory_keeps_previous_checkpoint(tmp_path):
    final = tmp_path / "ckpt"
    write_checkpoint(final, 1)
    before = {p.name: p.read_bytes() for p in final.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(final) as tmp:
            snapshot = storage.Snapshot()
            snapshot.tensors("w.safetensors", {"w": torch.zeros(32)})
            snapshot.write(tmp)
            raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in final.rglob("*") if p.is_file()} == before
    verify_directory(final)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_exception_on_first_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "ckpt"):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def crash_between_renames(monkeypatch, final, value):
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("power cut")
        real_rename(src, dst)

    monkeypatch.setattr(storage.os, "rename", rename)
    with pytest.raises(OSError, match="power cut"):
        write_checkpoint(final, value)
    monkeypatch.setattr(storage.os, "rename", real_rename)


def test_crash_between_renames_recovers_new_copy(tmp_path, monkeypatch):
    final = tmp_path / "ckpt"
    write_checkpoint(final, 1)
    crash_between_renames(monkeypatch, final, 2)
    assert not final.exists()
    verify_directory(final)
    assert load_json(final / "sub" / "deeper" / "meta.json") == {"value": 2}
    write_checkpoint(final, 3)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_recovery_falls_back_to_old_copy_when_new_is_incomplete(tmp_path, monkeypatch):
    final = tmp_path / "ckpt"
    write_checkpoint(final, 1)
    crash_between_renames(monkeypatch, final, 2)
    (tmp_path / next(p for p in os.listdir(tmp_path) if p.startswith(".tmp-ckpt-")) / "manifest.json").unlink()
    assert recover_directory(final)
    assert load_json(final / "sub" / "deeper" / "meta.json") == {"value": 1}
    verify_directory(final)


def test_similar_names_are_not_mistaken_for_leftovers(tmp_path):
    write_checkpoint(tmp_path / "ckpt-1", 1)
    (tmp_path / ".tmp-ckpt-1-0123abcd").mkdir()
    write_checkpoint(tmp_path / "ckpt", 2)
    assert (tmp_path / ".tmp-ckpt-1-0123abcd").exists()


def test_verify_reports_flipped_byte_by_file_name(tmp_path):
    final = tmp_path / "ckpt"
    write_checkpoint(final, 1)
    path = final / "w.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(f"sha256 mismatch for {path}")):
        verify_directory(final)


def test_verify_reports_truncated_missing_and_no_manifest(tmp_path):
    final = tmp_path / "ckpt"
    write_checkpoint(final, 1)
    meta = final / "sub" / "deeper" / "meta.json"
    meta.write_bytes(meta.read_bytes()[:-2])
    with pytest.raises(CheckpointError, match=re.escape(f"size mismatch for {meta}")):
        verify_directory(final)
    meta.unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"missing file {meta}")):
        verify_directory(final)
    (final / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"missing manifest {final / 'manifest.json'}")):
        verify_directory(final)


def test_nested_atomic_directory_is_hashed_once_and_verified_through_its_manifest(tmp_path):
    """A member checkpoint written atomically inside a generation's: the outer manifest lists the
    inner manifest (which lists the inner files), and verifying the outer checks the inner files."""
    final = tmp_path / "generation"
    with atomic_directory(final) as tmp:
        write_checkpoint(tmp / "members" / "slot_0", 1)
        save_json(tmp / "controller.json", {"generation": 1})
    manifest = verify_directory(final)
    assert set(manifest["files"]) == {"controller.json", "members/slot_0/manifest.json"}
    inner = final / "members" / "slot_0" / "w.safetensors"
    data = bytearray(inner.read_bytes())
    data[-5] ^= 0x01
    inner.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(f"sha256 mismatch for {inner}")):
        verify_directory(final)


def test_verify_ignores_unlisted_files(tmp_path):
    final = tmp_path / "ckpt"
    write_checkpoint(final, 1)
    (final / "notes.txt").write_text("added later")
    assert "notes.txt" not in verify_directory(final)["files"]


def _snapshot_of(name: str, log: list, nbytes: int, fail: bool = False, gate=None) -> storage.Snapshot:
    """A snapshot that logs when it is taken and when its one file is written (after `gate` opens)."""
    log.append(f"take {name}")
    snapshot = storage.Snapshot()
    snapshot.tensors(f"{name}.safetensors", {"w": torch.zeros(nbytes // 4)})

    def write(path):
        if gate is not None:
            gate.wait(timeout=5)
        if fail:
            raise OSError(f"disk full writing {name}")
        save_json(path, name)
        log.append(f"wrote {name}")

    snapshot.writer(f"{name}.json", write)
    return snapshot


def test_write_snapshots_writes_every_member_and_bounds_the_memory_held(tmp_path):
    log = []
    storage.write_snapshots((_snapshot_of(f"m{i}", log, nbytes=4096) for i in range(4)), tmp_path,
                            threads=4, max_pending_bytes=4096).wait()
    # each snapshot alone reaches the bound, so the next is taken only once the previous is written
    assert log == [f"{event} m{i}" for i in range(4) for event in ("take", "wrote")]
    for i in range(4):
        assert load_json(tmp_path / f"m{i}.json") == f"m{i}"
        assert load_tensors(tmp_path / f"m{i}.safetensors")["w"].numel() == 1024

    # under the bound, every snapshot is taken while the first writes still wait
    log.clear()
    all_taken = threading.Event()

    def snapshots():
        for i in range(4):
            yield _snapshot_of(f"n{i}", log, nbytes=4096, gate=all_taken)
        all_taken.set()

    storage.write_snapshots(snapshots(), tmp_path, threads=4, max_pending_bytes=1 << 20).wait()
    assert log[:4] == [f"take n{i}" for i in range(4)]
    assert sorted(log[4:]) == [f"wrote n{i}" for i in range(4)]


def test_writes_start_once_every_snapshot_is_taken(tmp_path):
    """Writing holds the GIL in part, so a snapshot taken while others are written would wait."""
    log = []

    def slowly_taken():
        for i in range(3):
            yield _snapshot_of(f"m{i}", log, nbytes=4096)
            time.sleep(0.05)

    storage.write_snapshots(slowly_taken(), tmp_path, threads=2, max_pending_bytes=1 << 20).wait()
    assert log[:3] == [f"take m{i}" for i in range(3)]
    assert sorted(log[3:]) == [f"wrote m{i}" for i in range(3)]


def test_a_snapshot_that_cannot_be_taken_is_raised_once_the_started_writes_have_ended(tmp_path):
    log, m1_running, release_m1 = [], threading.Event(), threading.Event()

    def snapshot(name: str, write) -> storage.Snapshot:
        taken = storage.Snapshot()
        taken.tensors(f"{name}.safetensors", {"w": torch.zeros(1024)})  # 4 KiB
        taken.writer(f"{name}.json", write)
        return taken

    def write_m0(path):
        m1_running.wait(timeout=5)
        log.append("wrote m0")

    def write_m1(path):
        m1_running.set()
        release_m1.wait(timeout=5)
        log.append("wrote m1")

    def failing_at_the_third():
        yield snapshot("m0", write_m0)
        yield snapshot("m1", write_m1)  # 8 KiB unwritten: both writes start
        raise RuntimeError("member 2 cannot be copied")

    threading.Timer(0.2, release_m1.set).start()
    with pytest.raises(RuntimeError, match="member 2 cannot be copied"):
        storage.write_snapshots(failing_at_the_third(), tmp_path, threads=2, max_pending_bytes=8192)
    assert log == ["wrote m0", "wrote m1"]


def test_write_snapshots_raises_the_first_error_and_takes_no_more_members(tmp_path):
    log = []
    snapshots = (_snapshot_of(f"m{i}", log, nbytes=4096, fail=i == 1) for i in range(4))
    with pytest.raises(OSError, match="disk full writing m1"):
        storage.write_snapshots(snapshots, tmp_path, threads=2, max_pending_bytes=4096).wait()
    assert log == ["take m0", "wrote m0", "take m1"]


def test_a_failed_write_is_raised_once_the_other_writes_have_ended(tmp_path):
    """So that the failed checkpoint's folder can be deleted whole: nothing writes into it after."""
    log, fail_now, write_later = [], threading.Event(), threading.Event()
    writes = storage.write_snapshots([_snapshot_of("m0", log, nbytes=4096, fail=True, gate=fail_now),
                                      _snapshot_of("m1", log, nbytes=4096, gate=write_later)],
                                     tmp_path, threads=2, max_pending_bytes=1 << 20)
    fail_now.set()
    threading.Timer(0.3, write_later.set).start()
    with pytest.raises(OSError, match="disk full writing m0"):
        writes.wait()
    assert log == ["take m0", "take m1", "wrote m1"]


def test_write_snapshots_returns_once_every_snapshot_is_taken_and_writes_on(tmp_path):
    log, written = [], threading.Event()
    writes = storage.write_snapshots((_snapshot_of(f"m{i}", log, nbytes=4096, gate=written) for i in range(3)),
                                     tmp_path, threads=2, max_pending_bytes=1 << 20)
    assert log == [f"take m{i}" for i in range(3)]  # nothing written yet: the writes wait on the gate
    written.set()
    writes.wait()
    assert sorted(log[3:]) == [f"wrote m{i}" for i in range(3)]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_written_files_have_the_mode_the_umask_gives(tmp_path, umask):
    """Issue 30, item 4: safetensors writes through a private temporary file, so its files were 0o600."""
    previous = os.umask(umask)
    try:
        snapshot = storage.Snapshot()
        snapshot.tensors("weights.safetensors", {"w": torch.ones(2)})
        snapshot.state("optimizer", {"state": {0: {"exp_avg": torch.zeros(2)}}})
        snapshot.json("attributes.json", {"a": 1})
        snapshot.write_atomic(tmp_path / "checkpoint")
    finally:
        os.umask(previous)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "checkpoint").iterdir()}
    assert modes == dict.fromkeys(["weights.safetensors", "optimizer.safetensors", "optimizer.json",
                                   "attributes.json", "manifest.json"], oct(0o666 & ~umask))
