"""The in-process backend: every member in this process, trained one after another."""
from pathlib import Path

from evo_sft.fitness import Evaluation
from evo_sft.io import storage
from evo_sft.population.member import MemberHost
from evo_sft.population.protocol import TrainResult


class LocalPopulation:
    """The population interface over `MemberHost`s in this process."""

    def __init__(self, hosts: list[MemberHost]):
        self.hosts = hosts
        self.on_failure = None  # members in this process have no worker that can die

    @property
    def size(self) -> int:
        return len(self.hosts)

    def train(self, steps: int, max_tokens: list[int] | None = None, report=None) -> list[TrainResult]:
        """Every member; members sharing a base model train in one call (together where they can).
        `report` hears of every step."""
        limits = dict(enumerate(max_tokens)) if max_tokens is not None else None
        results, done = {}, {host.slot: (0, 0) for host in self.hosts}

        def listener(host):
            def on_step():
                done[host.slot] = host.progress
                report(dict(done))
            return on_step

        for host in self.hosts:
            host.on_step = None if report is None else listener(host)
        try:
            for host in self.hosts:
                if host.slot not in results:
                    results.update(host.train_group(steps, limits))
        finally:
            for host in self.hosts:
                host.on_step = None
        return [results[host.slot] for host in self.hosts]

    def evaluate(self, full: bool = False) -> list[Evaluation]:
        return [host.evaluate(full) for host in self.hosts]

    def hyperparameters(self) -> list[dict]:
        return [host.hyperparameters() for host in self.hosts]

    def started(self, timeout: float) -> bool:
        return True  # built in this process before the population

    def clone(self, pairs: list[tuple[int, int]]) -> None:
        """(receiver, donor) pairs; every donor is exported before any receiver changes."""
        states = {donor: self.hosts[donor].export_state(on_device=True) for donor in {d for _, d in pairs}}
        for receiver, donor in pairs:
            self.hosts[receiver].import_state(states[donor])

    def set_hyperparameters(self, per_slot: dict[int, dict]) -> None:
        for slot, hyperparameters in per_slot.items():
            self.hosts[slot].set_hyperparameters(hyperparameters)

    def save(self, directory: Path) -> storage.PendingWrites:
        """Each member is copied in turn; the copies are written on threads while training goes
        on, and `wait()` on the result returns once all are."""
        return storage.write_snapshots((host.snapshot() for host in self.hosts), directory)

    def checkpoint_committed(self, path: Path) -> None:
        pass  # nothing to rebuild from it

    def load(self, directory: Path) -> None:
        for host in self.hosts:
            host.load(directory)

    def export_adapter(self, slot: int, directory: Path) -> str:
        return self.hosts[slot].export_adapter(directory)

    def close(self) -> None:
        pass
