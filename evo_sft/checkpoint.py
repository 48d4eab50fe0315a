"""Evolution checkpoints: the whole state of a run, atomic and hashed, from which it resumes exactly.

Layout of `RUN_DIR/checkpoints/generation_NNNNN/`:
  controller.json       generation, random generator state, lineage, fitness, slot ids, extras
  members/slot_K/       each member (PEFT adapter, optimizer, scheduler, attributes)
  members/slot_K.stream.json   the slot's data-stream position
  members/slot_K.rng.safetensors   the slot's torch random generator (LoRA dropout)
  manifest.json         sha256 of every file
"""
import shutil
import warnings
from pathlib import Path

from evo_sft import storage

PREFIX = "generation_"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, newest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(root.glob(f"{PREFIX}*[0-9]"), reverse=True) if root.exists() else []


class EvolutionCheckpointer:
    """Writes a checkpoint every `every` generations and keeps the newest `keep`.
    `extra_state()` adds JSON to controller.json (e.g. the MLflow run ids)."""

    def __init__(self, run_dir: Path, every: int = 1, keep: int = 3, extra_state=None):
        self.run_dir, self.every, self.keep = Path(run_dir), every, keep
        self.extra_state = extra_state or dict

    def maybe_save(self, controller) -> Path | None:
        if controller.generation % self.every:
            return None
        return self.save(controller)

    def save(self, controller) -> Path:
        path = self.run_dir / "checkpoints" / f"{PREFIX}{controller.generation:05d}"
        with storage.atomic_directory(path) as tmp:
            controller.population.save(tmp / "members")
            storage.save_json(tmp / "controller.json", {"controller": controller.state_dict(),
                                                        **self.extra_state()})
        controller.population.last_checkpoint = path
        for old in checkpoint_dirs(self.run_dir)[self.keep:]:
            shutil.rmtree(old)
        return path


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
