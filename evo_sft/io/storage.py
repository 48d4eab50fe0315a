"""The one way evo-sft writes and reads files: safetensors for tensors, JSON for
everything else, checkpoint directories written atomically with a sha256 manifest.

Nothing here pickles or unpickles, so loading a checkpoint never runs code. torch is imported
only where tensors are handled: reading JSON and checking a manifest need none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "evo-sft-checkpoint"
MANIFEST_VERSION = 1
WRITE_THREADS = min(8, os.cpu_count() or 1)
MAX_PENDING_BYTES = 4 << 30


class CheckpointError(Exception):
    """A checkpoint file is missing or damaged; the message names the file."""


class WriterLost(Exception):
    """The process that was writing part of a checkpoint is gone, so that checkpoint is incomplete."""


def _full(path: str | os.PathLike) -> Path:
    return Path(path).absolute()


# ---------------------------------------------------------------------------
# JSON


def _check_json(obj: Any, where: str) -> None:
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"{where or '<root>'}: dict key {key!r} is {type(key).__name__}, JSON keys must be str")
            _check_json(value, f"{where}.{key}" if where else key)
        return
    raise TypeError(f"{where or '<root>'}: {type(obj).__name__} is not a JSON type")


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON with sorted keys.

    Only dict (str keys), list, str, int, float, bool and None are accepted; anything
    else (tuples included, they would come back as lists) raises TypeError naming the
    key path. Non-finite floats are written as NaN/Infinity, which Python reads back.
    """
    _check_json(obj, "")
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"  # json.dump encodes in small pieces, slower
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def load_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing file {_full(path)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"invalid JSON in {_full(path)}: {e}") from None


# ---------------------------------------------------------------------------
# Tensors


def cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor copied once into its own contiguous CPU storage (safetensors refuses shared ones)."""
    import torch

    return {name: torch.empty(t.shape, dtype=t.dtype).copy_(t.detach()) for name, t in tensors.items()}


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    umask_modes(path)


def umask_modes(path: str | os.PathLike) -> None:
    """Give the file `path`, or every file under the folder `path`, the mode a new file gets here
    (0o666 less the umask): safetensors writes each file through a private temporary one, so its
    files, and the folders of PEFT and transformers that hold them, would stay readable by their
    owner alone."""
    mode = 0o666 & ~_umask()
    path = Path(path)
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(file, mode)


def _umask() -> int:
    """The process's umask, read where Linux shows it (setting it to read it back races with threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise CheckpointError(f"missing file {_full(path)}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"unreadable safetensors file {_full(path)}: {e}") from None


# ---------------------------------------------------------------------------
# Arbitrary nested state <-> (tensors, JSON structure)
#
# Structure encoding: str, int, bool, None and finite floats are stored as themselves;
# everything else is a one-key object: {"tensor": key}, {"list": [...]},
# {"tuple": [...]}, {"dict": [[key, value], ...]} (keys str or int, order kept),
# {"float": "nan" | "inf" | "-inf"}.


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (optimizer/scheduler state_dict, ...) into tensors and a JSON structure.

    Tensor names are the dotted path to the tensor, e.g. "state.0.exp_avg".
    """
    import torch

    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            if path in tensors:
                raise ValueError(f"two tensors map to the name {path!r}")
            tensors[path] = value
            return {"tensor": path}
        if value is None or isinstance(value, (str, bool, int)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, (list, tuple)):
            kind = "list" if isinstance(value, list) else "tuple"
            return {kind: [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]}
        if isinstance(value, dict):
            items = []
            for k, v in value.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(f"{path or '<root>'}: dict key {k!r} is {type(k).__name__}, only str and int keys are supported")
                items.append([k, walk(v, f"{path}.{k}" if path else str(k))])
            return {"dict": items}
        raise TypeError(f"{path or '<root>'}: cannot store value of type {type(value).__name__}")

    structure = walk(obj, "")
    return tensors, structure


def unflatten_state(tensors: dict[str, torch.Tensor], structure: Any, device: str | torch.device = "cpu") -> Any:
    """Inverse of flatten_state. Raises ValueError when structure and tensors disagree."""

    def build(node: Any) -> Any:
        if node is None or isinstance(node, (str, bool, int, float)):
            return node
        if isinstance(node, dict) and len(node) == 1:
            (kind, body), = node.items()
            if kind == "tensor":
                if body not in tensors:
                    raise ValueError(f"tensor {body!r} is missing")
                return tensors[body].to(device)
            if kind == "list":
                return [build(v) for v in body]
            if kind == "tuple":
                return tuple(build(v) for v in body)
            if kind == "dict":
                return {k: build(v) for k, v in body}
            if kind == "float":
                return float(body)
        raise ValueError(f"malformed state node {node!r}")

    return build(structure)


class Snapshot:
    """Files copied out of live state now and written later, possibly on another thread while
    the state trains on: tensors are CPU copies, JSON is copied, and a nested snapshot becomes
    an atomic directory of its own. `nbytes` counts the tensor bytes it holds."""

    def __init__(self):
        self.files: list[tuple[str, Callable[[Path], None]]] = []
        self.nbytes = 0

    def tensors(self, relative: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        owned = cpu_copy(tensors)
        self.nbytes += sum(t.nbytes for t in owned.values())
        self.files.append((relative, lambda path: save_tensors(path, owned, metadata)))

    def json(self, relative: str, obj: Any) -> None:
        _check_json(obj, relative)
        frozen = json.loads(json.dumps(obj))
        self.files.append((relative, lambda path: save_json(path, frozen)))

    def state(self, name: str, obj: Any) -> None:
        """`obj` (an optimizer or scheduler state, ...) as `<name>.safetensors` (tensors) +
        `<name>.json` (structure), which `load_state` reads back."""
        tensors, structure = flatten_state(obj)
        self.tensors(f"{name}.safetensors", tensors)
        self.files.append((f"{name}.json", lambda path: save_json(path, structure)))  # new objects: no copy

    def writer(self, relative: str, write: Callable[[Path], None]) -> None:
        """A file (or folder) that `write(path)` makes from data it already owns."""
        self.files.append((relative, write))

    def directory(self, relative: str, snapshot: "Snapshot") -> None:
        self.nbytes += snapshot.nbytes
        self.files.append((relative, snapshot.write_atomic))

    def write(self, directory: str | os.PathLike) -> None:
        for relative, write in self.files:
            path = Path(directory) / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)

    def write_atomic(self, path: str | os.PathLike) -> None:
        with atomic_directory(path) as tmp:
            self.write(tmp)


class PendingWrites:
    """Writes that `write_snapshots` started; `wait()` returns once all have ended and raises
    the first error, so that a failed checkpoint's folder can be deleted with nothing still
    writing into it."""

    def __init__(self, futures: list[Future]):
        self.futures = futures

    def wait(self) -> None:
        wait(self.futures)
        for future in self.futures:
            future.result()


def write_snapshots(snapshots: Iterable[Snapshot], directory: str | os.PathLike,
                    threads: int = WRITE_THREADS, max_pending_bytes: int = MAX_PENDING_BYTES) -> PendingWrites:
    """Write each snapshot into `directory` on a pool of threads. Returns once every snapshot is
    taken, so the state may change while the writes go on. The writes start once the snapshots
    are all taken, or once the unwritten ones hold `max_pending_bytes`: then the next is taken
    only when they hold less, so large members never pile up in memory, and after a failed write
    no more are taken. Writing holds the GIL in part (JSON, safetensors' serialisation), so
    snapshots taken while others are written would wait for it. A snapshot that cannot be taken
    is raised once the started writes have ended."""
    sizes: dict[Future, int] = {}
    taken: list[Snapshot] = []
    pool = ThreadPoolExecutor(threads)

    def start_taken() -> None:
        for snapshot in taken:
            sizes[pool.submit(snapshot.write, directory)] = snapshot.nbytes
        taken.clear()

    def unwritten_bytes() -> int:
        return sum(s.nbytes for s in taken) + sum(n for f, n in sizes.items() if not f.done())

    try:
        for snapshot in snapshots:
            taken.append(snapshot)
            if unwritten_bytes() >= max_pending_bytes:
                start_taken()
                while unwritten_bytes() >= max_pending_bytes:
                    wait([f for f in sizes if not f.done()], return_when=FIRST_COMPLETED)
                if any(f.done() and f.exception() is not None for f in sizes):
                    break
        start_taken()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=False)
    return PendingWrites(list(sizes))


def load_state(directory: str | os.PathLike, name: str, device: str | torch.device = "cpu") -> Any:
    structure_path = Path(directory) / f"{name}.json"
    structure = load_json(structure_path)
    tensors = load_tensors(Path(directory) / f"{name}.safetensors", device=device)
    try:
        return unflatten_state(tensors, structure, device=device)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{_full(structure_path)} does not match {name}.safetensors: {e}") from None


# ---------------------------------------------------------------------------
# Atomic, hashed directories


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _siblings(final: Path, kind: str) -> list[Path]:
    """Leftovers of interrupted writes of `final`: `.<kind>-<name>-<8 hex>`, newest first."""
    pattern = re.compile(rf"\.{kind}-{re.escape(final.name)}-[0-9a-f]{{8}}")
    found = [p for p in final.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()] if final.parent.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _is_complete(path: Path) -> bool:
    try:
        _verify(path)
    except CheckpointError:
        return False
    return True


def recover_directory(final_path: str | os.PathLike) -> bool:
    """Apply the recovery rule of `atomic_directory` when `final_path` is missing.

    If a complete `.tmp-<name>-*` sibling exists (its manifest verifies), the newest
    one is renamed to `final_path`; otherwise the newest `.old-<name>-*` sibling is.
    Returns True when something was moved into place.
    """
    final = Path(final_path)
    if final.exists():
        return False
    candidates = [p for p in _siblings(final, "tmp") if _is_complete(p)] or _siblings(final, "old")
    if not candidates:
        return False
    os.rename(candidates[0], final)
    _fsync(final.parent)
    return True


def replace_directory(new: Path, final: Path) -> Path:
    """Put the finished folder `new` (on the same file system) at `final`: an existing `final` is
    renamed to `.old-<name>-<8 hex>`, `new` renamed into place, then the old one deleted. `final`
    never holds a mix of old and new files."""
    if final.exists():
        old = final.parent / f".old-{final.name}-{secrets.token_hex(4)}"
        os.rename(final, old)
        os.rename(new, final)
        _fsync(final.parent)
        shutil.rmtree(old)
    else:
        os.rename(new, final)
        _fsync(final.parent)
    return final


class AtomicDirectory:
    """A fresh temporary directory, `tmp`, that `commit()` swaps in for `final_path` atomically
    and `abort()` deletes; `atomic_directory` is its context manager, and documents the rules.
    Split like this, the files may be written on other threads before the commit."""

    def __init__(self, final_path: str | os.PathLike):
        self.final = Path(final_path)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        recover_directory(self.final)
        for leftover in _siblings(self.final, "tmp") + _siblings(self.final, "old"):
            shutil.rmtree(leftover)
        self.tmp = self.final.parent / f".tmp-{self.final.name}-{secrets.token_hex(4)}"
        self.tmp.mkdir()

    def commit(self) -> Path:
        try:
            _write_manifest(self.tmp)
        except BaseException:
            self.abort()
            raise
        return replace_directory(self.tmp, self.final)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `final_path` atomically on success.

    The temporary directory is `.tmp-<name>-<8 hex>` in the same parent. On normal
    exit a `manifest.json` listing sha256 and size of every file (recursively) is
    written, everything is fsynced, and the directory is swapped in: an existing
    `final_path` is renamed to `.old-<name>-<8 hex>`, the new one renamed to
    `final_path`, then the old one deleted. On an exception the temporary directory
    is deleted and `final_path` is left untouched.

    Recovery rule (crash between the two renames, the only moment `final_path` is
    missing): the newest `.tmp-<name>-*` whose manifest verifies is the new complete
    copy and is moved into place; failing that, the newest `.old-<name>-*` is.
    `recover_directory` implements it; `verify_directory` and the next
    `atomic_directory` on the same path apply it, and the latter also deletes
    leftovers of interrupted writes. One writer per `final_path` at a time.
    """
    directory = AtomicDirectory(final_path)
    try:
        yield directory.tmp
    except BaseException:
        directory.abort()
        raise
    directory.commit()


def _write_manifest(directory: Path) -> None:
    """List every file with its sha256, except the files of a complete atomic directory inside
    (one with its own manifest, already hashed and fsynced): its manifest stands for them, and
    `_verify` follows it."""
    nested = {p.parent for p in directory.rglob(MANIFEST) if p.parent != directory}
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative == MANIFEST or (path.name != MANIFEST and nested.intersection(path.parents)):
            continue
        _fsync(path)
        files[relative] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": files}
    save_json(directory / MANIFEST, manifest)
    _fsync(directory / MANIFEST)
    for sub in sorted({p.parent for p in directory.rglob("*")}, reverse=True):
        _fsync(sub)


def _verify(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"missing manifest {_full(manifest_path)}")
    manifest = load_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise CheckpointError(f"{_full(manifest_path)} is not a {MANIFEST_FORMAT} manifest version {MANIFEST_VERSION}")
    for relative, entry in manifest["files"].items():
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise CheckpointError(f"{_full(manifest_path)} lists a path outside the directory: {relative!r}")
        file = path / relative
        if not file.is_file():
            raise CheckpointError(f"missing file {_full(file)} (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"size mismatch for {_full(file)}: {size} bytes, manifest says {entry['bytes']}")
        if _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"sha256 mismatch for {_full(file)}: the file is damaged")
        if file.name == MANIFEST:  # a complete atomic directory inside: check its files too
            _verify(file.parent)
    return manifest


def verify_directory(path: str | os.PathLike) -> dict:
    """Check every file listed in `path/manifest.json` for presence, size and sha256.

    Raises CheckpointError naming the offending file; returns the manifest. Files
    present but not listed are ignored. If `path` is missing, the recovery rule of
    `atomic_directory` is applied first.
    """
    path = Path(path)
    recover_directory(path)
    return _verify(path)
