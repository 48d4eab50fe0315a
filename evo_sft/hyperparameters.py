"""What a training hyperparameter is, declared once.

Each entry names a setting of the SFT agent, its type, its default, the values it may take, and
how a new value reaches a live member (`applies_to`):
- "learning_rate": the optimizer's param groups and the scheduler's base rate (moments kept);
- "optimizer": the AdamW key of the same name in every param group (moments kept);
- "step": an agent attribute the training step reads at every optimizer step.

The experiment config takes each entry as `agent.<name>` (the founders' value), and the ones
listed under `evolution.hyperparameters` mutate within the bounds given there. Adding a numeric
AdamW hyperparameter is one entry here. Pure Python: importable without torch.
"""
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    type: type
    default: float | int
    minimum: float
    minimum_allowed: bool
    applies_to: Literal["learning_rate", "optimizer", "step"]
    scale: Literal["linear", "log"]
    help: str

    def problem(self, value) -> str | None:
        """Why `value` cannot be this hyperparameter's value, or None."""
        if value < self.minimum or (value == self.minimum and not self.minimum_allowed):
            return f"must be {'>=' if self.minimum_allowed else '>'} {self.minimum:g}, got {value}"
        return None


HYPERPARAMETERS = {h.name: h for h in (
    Hyperparameter("lr", float, 1.0e-4, 0.0, False, "learning_rate", "log", "AdamW learning rate"),
    Hyperparameter("batch_size", int, 16, 1, True, "step", "linear", "training rows per optimizer step"),
    Hyperparameter("max_grad_norm", float, 1.0, 0.0, False, "step", "log", "gradient clipping norm"),
    Hyperparameter("weight_decay", float, 0.01, 0.0, True, "optimizer", "linear", "AdamW decoupled weight decay"),
)}


def unknown(name: str) -> str:
    return f"unknown hyperparameter {name!r} (known: {', '.join(HYPERPARAMETERS)})"
