"""Learning-rate schedules: the factor applied to an agent's learning rate at each optimizer step."""
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up to the learning rate, then cosine decay to `min_lr_ratio` of it."""

    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def constant(step: int) -> float:
    return 1.0
