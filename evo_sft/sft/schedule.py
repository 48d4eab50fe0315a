"""Learning-rate schedules: the factor applied to an agent's learning rate at each optimizer step."""
import math
from dataclasses import dataclass

from evo_sft.hyperparameters import SCHEDULES


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up over `warmup_steps` to the learning rate, then by `kind`: "constant" stays
    there; "cosine" and "linear" decay to `min_lr_ratio` of it at `total_steps` and stay."""

    total_steps: int | None = None
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    kind: str = "cosine"

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"LRSchedule: kind must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        if self.kind != "constant" and (self.total_steps is None or self.total_steps < 1):
            raise ValueError(f"LRSchedule: a {self.kind} schedule needs total_steps >= 1, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"LRSchedule: warmup_steps must be >= 0, got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay


CONSTANT = LRSchedule(kind="constant")
