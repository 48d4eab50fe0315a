"""Generation checkpoints are written while the next generation trains: what they hold, when
they are committed, and what a failed write does."""
import threading
import warnings

import pytest

from evo_sft import build
from evo_sft.io.checkpoint import checkpoint_dirs, latest_intact
from evo_sft.config import config_from_dict
from evo_sft.population.local import LocalPopulation
from tests.helpers.evolution_run import experiment, make_controller, pieces


class HeldWrites:
    """A population's checkpoint writes, which report done only once `gate` (if any) opens,
    then fail with `error` if one is given."""

    def __init__(self, writes, gate: threading.Event | None, error: Exception | None):
        self.writes, self.gate, self.error = writes, gate, error

    def wait(self) -> None:
        if self.gate is not None and not self.gate.wait(timeout=60):
            raise AssertionError("the run waited for this checkpoint before the next generation trained")
        self.writes.wait()
        if self.error is not None:
            raise self.error


class HeldPopulation:
    """The real in-process population, except that the writes of its first checkpoint report
    done only once the next generation has started training, and those of checkpoint
    `failing` fail."""

    def __init__(self, population: LocalPopulation, failing: int | None = None):
        self.population, self.failing = population, failing
        self.held: threading.Event | None = None
        self.saves = 0

    def __getattr__(self, name):
        return getattr(self.population, name)

    def train(self, steps: int, max_tokens: list[int] | None = None, report=None) -> list[dict]:
        if self.held is not None:
            self.held.set()
        return self.population.train(steps, max_tokens, report)

    def save(self, directory):
        self.saves += 1
        gate = threading.Event() if self.saves == 1 else None
        self.held = self.held or gate
        error = OSError("No space left on device") if self.saves == self.failing else None
        return HeldWrites(self.population.save(directory), gate, error)


def local_population(config) -> LocalPopulation:
    return LocalPopulation(build.local_hosts(config, *pieces(config, config.resolved_run_dir())))


def test_a_checkpoint_is_committed_after_the_next_generation_starts_and_holds_its_own_generation(tmp_path):
    config = config_from_dict(experiment("local", tmp_path / "run"))
    population = HeldPopulation(local_population(config))
    controller = make_controller(config, population, tmp_path / "run")
    scored_at_checkpoint = {}
    controller.observers.append(lambda c, record: scored_at_checkpoint.update({c.generation: population.evaluate()}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controller.run(2)  # waiting for checkpoint 1 before generation 2 trains would stall and fail

    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["generation_00002", "generation_00001"]
    # the members restored from checkpoint 1 are the members as they were when it was taken,
    # although generation 2 trained them while it was written
    restored = local_population(config)
    restored.load(checkpoint_dirs(tmp_path / "run")[1] / "members")
    assert restored.evaluate() == scored_at_checkpoint[1]
    assert scored_at_checkpoint[2] != scored_at_checkpoint[1]


def test_a_failed_checkpoint_write_is_raised_and_the_previous_checkpoint_stays_the_newest(tmp_path):
    config = config_from_dict(experiment("local", tmp_path / "run"))
    population = HeldPopulation(local_population(config), failing=2)
    controller = make_controller(config, population, tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OSError, match="No space left on device"):
            controller.run(2)

    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["generation_00001"]
    assert latest_intact(tmp_path / "run")[0].name == "generation_00001"
