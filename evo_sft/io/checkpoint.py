"""Evolution checkpoints: the whole state of a run, atomic and hashed, from which it resumes exactly.

Layout of `RUN_DIR/checkpoints/generation_NNNNN/`:
  controller.json       generation, random generator state, lineage, fitness, slot ids, extras
  members/slot_K/       each member (PEFT adapter, optimizer, scheduler, attributes)
  members/slot_K.stream.json   the slot's data-stream position
  members/slot_K.rng.safetensors   the slot's torch random generator (LoRA dropout)
  manifest.json         sha256 of every file
"""
import shutil
import threading
import warnings
from pathlib import Path

from evo_sft.io import storage

PREFIX = "generation_"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, newest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(root.glob(f"{PREFIX}*[0-9]"), reverse=True) if root.exists() else []


class EvolutionCheckpointer:
    """Writes a checkpoint every `every` generations and keeps the newest `keep`.
    `extra_state()` adds JSON to controller.json (e.g. the MLflow run ids).

    `save` returns once every member is copied; the copies are written, and the checkpoint
    committed, on a background thread while the next generation trains. `settle` waits for that
    commit and is called after each generation's training and when the run ends. A checkpoint
    whose writer was lost (a Ray actor that died) is abandoned with a warning and the previous
    one stays the newest; any other failure is raised by `settle`."""

    def __init__(self, run_dir: Path, every: int = 1, keep: int = 3, extra_state=None):
        self.run_dir, self.every, self.keep = Path(run_dir), every, keep
        self.extra_state = extra_state or dict
        self.pending: tuple[threading.Thread, list[BaseException], storage.AtomicDirectory] | None = None

    def maybe_save(self, controller) -> None:
        if controller.generation % self.every == 0:
            self.save(controller)

    def save(self, controller) -> None:
        self.settle(controller)
        directory = storage.AtomicDirectory(self.run_dir / "checkpoints" / f"{PREFIX}{controller.generation:05d}")
        try:
            storage.save_json(directory.tmp / "controller.json", {"controller": controller.state_dict(),
                                                                  **self.extra_state()})
            writes = controller.population.save(directory.tmp / "members")
        except BaseException:
            directory.abort()
            raise
        errors: list[BaseException] = []

        def commit():
            try:
                writes.wait()
                directory.commit()
            except BaseException as error:  # noqa: BLE001 - handed to settle
                directory.abort()
                errors.append(error)

        thread = threading.Thread(target=commit, name=f"commit {directory.final.name}", daemon=True)
        thread.start()
        self.pending = (thread, errors, directory)

    def settle(self, controller) -> None:
        """Wait for the checkpoint being written, if any, and make it the one a restarted actor restores."""
        if self.pending is None:
            return
        thread, errors, directory = self.pending
        self.pending = None
        thread.join()
        if errors:
            if isinstance(errors[0], storage.WriterLost):
                warnings.warn(f"checkpoint {directory.final.name} is abandoned: {errors[0]}")
                return
            raise errors[0]
        controller.population.checkpoint_committed(directory.final)
        for old in checkpoint_dirs(self.run_dir)[self.keep:]:
            shutil.rmtree(old)


def latest_intact(run_dir: Path) -> tuple[Path, dict]:
    """The newest checkpoint whose every file matches its manifest, with its controller.json.
    A damaged one is reported by file name and skipped."""
    for path in checkpoint_dirs(run_dir):
        try:
            storage.verify_directory(path)
            return path, storage.load_json(path / "controller.json")
        except storage.CheckpointError as error:
            warnings.warn(f"checkpoint {path.name} is damaged ({error}); falling back to an older one")
    raise storage.CheckpointError(f"no intact checkpoint under {Path(run_dir) / 'checkpoints'}")
