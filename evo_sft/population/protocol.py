"""What the controller asks of a population, whatever hosts its members (this process or Ray
actors): the one interface both backends implement."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from evo_sft.fitness import Evaluation


@dataclass(frozen=True)
class TrainResult:
    """What one member reports for one generation's training. A member lost with its worker
    reports `optimizer_step` None and a NaN loss. `step_losses` holds (optimizer step, mean loss
    of that step's supervised tokens) for each step taken (one `SFT.learn` call: with
    `update_epochs` > 1 its steps' mean, at its last step)."""

    slot: int
    train_loss: float
    finite: bool
    tokens: int
    seconds: float
    tokens_per_second: float
    optimizer_step: int | None
    step_losses: tuple[tuple[int, float], ...] = ()


class Writes(Protocol):
    def wait(self) -> None:
        """Return once every file is written; raise the first failure."""


class Population(Protocol):
    size: int
    # Called as on_failure(kind, slot, error) when a member's worker died: kind "restart" (rebuilt
    # as it was) or "lost" (it scores -inf this generation). Backends whose workers cannot die never call it.
    on_failure: Callable[[str, int, str], None] | None

    def train(self, steps: int, max_tokens: list[int] | None = None,
              report: Callable[[dict[int, tuple[int, int]]], None] | None = None) -> list[TrainResult]:
        """`steps` optimizer steps of every member, in slot order; with `max_tokens`, a member
        stops early once it has trained on `max_tokens[slot]` supervised tokens this call. While
        they train, `report` (if given) is called now and then with {slot: (steps taken,
        supervised tokens)} of this call."""

    def evaluate(self, full: bool = False) -> list[Evaluation]:
        """Every member's evaluation (its fitness: higher is better, -inf for a broken member), in
        slot order; `full` scores every test row whatever `evolution.fitness_options.eval_rows` says."""

    def hyperparameters(self) -> list[dict]:
        """Every member's hyperparameters, in slot order."""

    def started(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds for every member to be built; whether they all are (a
        worker that died building its members counts as done: the next call restarts it)."""

    def clone(self, pairs: list[tuple[int, int]]) -> None:
        """(receiver, donor) slot pairs: each receiver becomes a copy of its donor as the donor was
        before any receiver changed (weights, optimizer and scheduler state, attributes)."""

    def set_hyperparameters(self, per_slot: dict[int, dict]) -> None:
        """New hyperparameters, effective from the members' next optimizer step."""

    def save(self, directory: Path) -> Writes:
        """Copy every member (and its data stream and random generator) now; the copies are written
        under `directory` while training goes on."""

    def load(self, directory: Path) -> None:
        """Become the members saved under `directory`."""

    def checkpoint_committed(self, path: Path) -> None:
        """A checkpoint with every member is complete at `path`: a member rebuilt later starts there."""

    def export_adapter(self, slot: int, directory: Path) -> str:
        """Write the member's adapter as a PEFT folder under `directory`; return its path."""

    def close(self) -> None:
        """Free the workers."""
