"""The Ray backend: one actor per member, trained and scored in parallel; clones travel
actor to actor as object references; a dead actor is rebuilt from the last checkpoint."""
import warnings
from pathlib import Path

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from evo_sft.build import build_host

MAX_RESTARTS_PER_GENERATION = 3
ACTOR_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError)


class MemberActor:
    """A thin shell: builds its member inside the actor and forwards every call to it."""

    def __init__(self, config_dict: dict, model_path: str, prepared: dict, slot: int, hyperparameters: dict):
        self.host = build_host(config_dict, model_path, prepared, slot, hyperparameters)

    def call(self, method: str, *args):
        return getattr(self.host, method)(*args)

    def export_state(self):
        return self.host.export_state()

    def location(self) -> dict:
        import os

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


class RayPopulation:
    """The population interface over one Ray actor per member."""

    def __init__(self, config_dict: dict, model_path: str, prepared: dict, founders: list[dict],
                 num_cpus: float = 1.0, num_gpus: float = 0.0, on_restart=None):
        self.config_dict, self.model_path = config_dict, model_path
        self.prepared_ref = ray.put(prepared)
        self.actor_class = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(MemberActor)
        self.current_hyperparameters = list(founders)
        self.last_checkpoint: Path | None = None
        self.trained_steps = 0
        self.restarts = [0] * len(founders)
        self.on_restart = on_restart
        self.actors = [self._start(slot, founders[slot]) for slot in range(len(founders))]

    @property
    def size(self) -> int:
        return len(self.actors)

    def _start(self, slot: int, hyperparameters: dict):
        return self.actor_class.remote(self.config_dict, self.model_path, self.prepared_ref, slot, hyperparameters)

    def _restore(self, slot: int, error: Exception) -> None:
        """Replace a dead actor: restore the member from the last checkpoint (or rebuild it with
        its hyperparameters before the first one) and replay this generation's training."""
        self.restarts[slot] += 1
        if self.restarts[slot] > MAX_RESTARTS_PER_GENERATION:
            raise RuntimeError(f"slot {slot} failed {MAX_RESTARTS_PER_GENERATION} times in one generation: {error}")
        warnings.warn(f"the actor of slot {slot} died ({type(error).__name__}); restarting it")
        self.actors[slot] = self._start(slot, self.current_hyperparameters[slot])
        if self.last_checkpoint is not None:
            ray.get(self.actors[slot].call.remote("load", str(self.last_checkpoint / "members")))
        if self.trained_steps:
            ray.get(self.actors[slot].call.remote("train", self.trained_steps))
        if self.on_restart is not None:
            self.on_restart(slot, str(error))

    def _call(self, slots: list[int], method: str, args_of=lambda slot: ()) -> list:
        """Call `method` on the given slots' actors in parallel, restarting dead ones."""
        refs = {slot: self.actors[slot].call.remote(method, *args_of(slot)) for slot in slots}
        results = {}
        for slot, ref in refs.items():
            while slot not in results:
                try:
                    results[slot] = ray.get(ref)
                except ACTOR_FAILURES as error:
                    self._restore(slot, error)
                    ref = self.actors[slot].call.remote(method, *args_of(slot))
        return [results[slot] for slot in slots]

    def train(self, steps: int) -> list[dict]:
        self.restarts = [0] * self.size
        self.trained_steps = 0
        results = self._call(list(range(self.size)), "train", lambda slot: (steps,))
        self.trained_steps = steps
        return results

    def evaluate(self) -> list[float]:
        return self._call(list(range(self.size)), "evaluate")

    def hyperparameters(self) -> list[dict]:
        self.current_hyperparameters = self._call(list(range(self.size)), "hyperparameters")
        return self.current_hyperparameters

    def clone(self, pairs: list[tuple[int, int]]) -> None:
        """Each donor exports once, into the object store; receivers take the reference, so the
        driver never holds the tensors. Donors are exported before any receiver changes."""
        states = {donor: self.actors[donor].export_state.remote() for donor in {d for _, d in pairs}}
        self._call([r for r, _ in pairs], "import_state", lambda slot: (states[dict(pairs)[slot]],))

    def set_hyperparameters(self, per_slot: dict[int, dict]) -> None:
        self._call(list(per_slot), "set_hyperparameters", lambda slot: (per_slot[slot],))

    def save(self, directory: Path) -> None:
        self._call(list(range(self.size)), "save", lambda slot: (str(directory),))

    def load(self, directory: Path) -> None:
        self._call(list(range(self.size)), "load", lambda slot: (str(directory),))

    def export_adapter(self, slot: int, directory: Path) -> str:
        return self._call([slot], "export_adapter", lambda s: (str(directory),))[0]

    def locations(self) -> list[dict]:
        return ray.get([actor.location.remote() for actor in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
