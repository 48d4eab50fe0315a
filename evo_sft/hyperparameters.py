"""What a training hyperparameter is, declared once.

Each entry names a setting of the SFT agent, its type, its default, the values it may take, and
how a new value reaches a live member (`applies_to`):
- "learning_rate": the optimizer's param groups and the scheduler's base rate (moments kept);
- "optimizer": the AdamW key of the same name in every param group (moments kept);
- "step": an agent attribute the training step reads at every optimizer step;
- "schedule": the learning-rate schedule (its kind and warm-up), at the member's current step;
- "lora": the member's LoRA adapter (rank, alpha, dropout), changed so that the member computes
  the same function at the moment of the change (see `evo_sft.sft.lora`).

The experiment config takes each entry at its `key` (`agent.<name>` unless the entry names
another, e.g. `lora.r`): the founders' value. The ones listed under `evolution.hyperparameters`
mutate within the bounds or choices given there. Adding a numeric AdamW hyperparameter is one
entry here. Pure Python: importable without torch.
"""
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    type: type  # float, int or str
    default: float | int | str
    applies_to: Literal["learning_rate", "optimizer", "step", "schedule", "lora"]
    help: str
    scale: Literal["linear", "log"] | None = None  # how a numeric one is spread over its range
    minimum: float | None = None
    minimum_allowed: bool = True
    maximum: float | None = None
    maximum_allowed: bool = True
    choices: tuple = ()  # every value a categorical one can take
    config_key: str | None = None  # where the config sets the founders' value; None: agent.<name>

    @property
    def key(self) -> str:
        return self.config_key or f"agent.{self.name}"

    @property
    def categorical(self) -> bool:
        return self.type is str

    def problem(self, value) -> str | None:
        """Why `value` cannot be this hyperparameter's value, or None."""
        if self.categorical:
            return None if value in self.choices else f"must be one of {', '.join(self.choices)}, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if self.type is int and not float(value).is_integer():
            return f"must be an integer, got {value}"
        if self.minimum is not None and (value < self.minimum or (value == self.minimum and not self.minimum_allowed)):
            return f"must be {'>=' if self.minimum_allowed else '>'} {self.minimum:g}, got {value}"
        if self.maximum is not None and (value > self.maximum or (value == self.maximum and not self.maximum_allowed)):
            return f"must be {'<=' if self.maximum_allowed else '<'} {self.maximum:g}, got {value}"
        return None


SCHEDULES = ("constant", "cosine", "linear")

HYPERPARAMETERS = {h.name: h for h in (
    Hyperparameter("lr", float, 1.0e-4, "learning_rate", "AdamW learning rate", "log", 0.0, False),
    Hyperparameter("batch_size", int, 16, "step", "training rows per optimizer step", "linear", 1),
    Hyperparameter("max_grad_norm", float, 1.0, "step", "gradient clipping norm", "log", 0.0, False),
    Hyperparameter("weight_decay", float, 0.01, "optimizer", "AdamW decoupled weight decay", "linear", 0.0),
    Hyperparameter("warmup_steps", int, 0, "schedule", "optimizer steps of linear warm-up", "linear", 0),
    Hyperparameter("scheduler", str, "constant", "schedule", "learning-rate schedule after the warm-up",
                   choices=SCHEDULES),
    Hyperparameter("lora_r", int, 8, "lora", "LoRA rank", "log", 1, config_key="lora.r"),
    Hyperparameter("lora_alpha", float, 16.0, "lora", "LoRA alpha (scaling = alpha / r)", "log", 0.0, False,
                   config_key="lora.lora_alpha"),
    Hyperparameter("lora_dropout", float, 0.0, "lora", "dropout on the LoRA input", "linear", 0.0,
                   maximum=1.0, maximum_allowed=False, config_key="lora.lora_dropout"),
)}


def unknown(name: str) -> str:
    return f"unknown hyperparameter {name!r} (known: {', '.join(HYPERPARAMETERS)})"


def shown(value) -> str:
    """A hyperparameter's value in a table: numbers to 3 significant digits, choices as they are."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
