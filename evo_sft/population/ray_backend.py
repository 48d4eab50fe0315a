"""The Ray backend: one actor per member, trained and scored in parallel; clones travel
actor to actor as object references; a dead actor is rebuilt from the last checkpoint."""
import math
import warnings
from pathlib import Path

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from evo_sft.build import build_host

MAX_RESTARTS_PER_GENERATION = 3
ACTOR_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError)
# Calls that change a member; each is logged per slot until the next checkpoint and replayed,
# in order, on an actor rebuilt after a death.
STATE_CHANGING = ("train", "import_state", "set_hyperparameters", "load")
# What a lost member reports for the rest of its generation: it scores -inf, so the plan
# replaces it with a clone of the elite.
LOST_RESULTS = {
    "train": lambda slot: {"slot": slot, "train_loss": math.nan, "finite": False, "tokens": 0, "seconds": 0.0,
                           "tokens_per_second": 0.0, "optimizer_step": None},
    "evaluate": lambda slot: -math.inf,
}


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
                 num_cpus: float = 1.0, num_gpus: float = 0.0, on_restart=None, on_lost=None,
                 max_restarts_per_generation: int = MAX_RESTARTS_PER_GENERATION):
        self.config_dict, self.model_path = config_dict, model_path
        self.prepared_ref = ray.put(prepared)
        self.actor_class = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(MemberActor)
        self.founders = list(founders)
        self.current_hyperparameters = list(founders)
        self._last_checkpoint: Path | None = None
        self.since_checkpoint: list[list[tuple[str, tuple]]] = [[] for _ in founders]
        self.restarts = [0] * len(founders)
        self.max_restarts_per_generation = max_restarts_per_generation
        self.lost: set[int] = set()
        self.on_restart, self.on_lost = on_restart, on_lost
        self.actors = [self._start(slot, founders[slot]) for slot in range(len(founders))]

    @property
    def size(self) -> int:
        return len(self.actors)

    @property
    def last_checkpoint(self) -> Path | None:
        return self._last_checkpoint

    @last_checkpoint.setter
    def last_checkpoint(self, path: Path | None) -> None:
        """Set when a checkpoint of every member is complete: what came before it need not be replayed."""
        self._last_checkpoint = Path(path) if path is not None else None
        self.since_checkpoint = [[] for _ in range(self.size)]

    def _start(self, slot: int, hyperparameters: dict):
        return self.actor_class.remote(self.config_dict, self.model_path, self.prepared_ref, slot, hyperparameters)

    def _restore(self, slot: int, error: Exception) -> None:
        """Replace a dead actor: restore the member from the last checkpoint (or rebuild it as
        founded before the first one) and replay every call that changed it since then (training,
        clone imports, mutations), so it is the member it was when it died. A member that dies
        more than `max_restarts_per_generation` times in one generation is lost instead."""
        while True:
            self.restarts[slot] += 1
            if self.restarts[slot] > self.max_restarts_per_generation:
                self._lose(slot, error)
                return
            warnings.warn(f"the actor of slot {slot} died ({type(error).__name__}); restarting it")
            self._stop_actor(slot)
            hyperparameters = self.founders[slot] if self.last_checkpoint is None else self.current_hyperparameters[slot]
            self.actors[slot] = self._start(slot, hyperparameters)
            try:
                if self.last_checkpoint is not None:
                    ray.get(self.actors[slot].call.remote("load", str(self.last_checkpoint / "members")))
                for method, args in self.since_checkpoint[slot]:
                    ray.get(self.actors[slot].call.remote(method, *args))
            except ACTOR_FAILURES as again:
                error = again
                continue
            break
        if self.on_restart is not None:
            self.on_restart(slot, str(error))

    def _lose(self, slot: int, error: Exception) -> None:
        """Give up on the member of `slot` for this generation: a fresh actor takes the slot, the
        member scores -inf, and the generation's plan fills the slot with a clone of the elite."""
        if slot in self.lost:
            raise RuntimeError(f"slot {slot}: even a fresh actor for a lost member died: {error}") from error
        warnings.warn(f"slot {slot} died {self.restarts[slot]} times in this generation ({type(error).__name__}); "
                      "its member scores -inf and is replaced by a clone of the elite")
        self._stop_actor(slot)
        self.actors[slot] = self._start(slot, self.current_hyperparameters[slot])
        self.lost.add(slot)
        if self.on_lost is not None:
            self.on_lost(slot, str(error))

    def _stop_actor(self, slot: int) -> None:
        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _call(self, slots: list[int], method: str, args_of=lambda slot: ()) -> list:
        """Call `method` on the given slots' actors in parallel, restarting dead ones."""
        results = {}

        def send(slot: int):
            if slot in self.lost and method in LOST_RESULTS:
                results[slot] = LOST_RESULTS[method](slot)
                return None
            return self.actors[slot].call.remote(method, *args_of(slot))

        refs = {slot: send(slot) for slot in slots}
        for slot, ref in refs.items():
            while slot not in results:
                try:
                    results[slot] = ray.get(ref)
                except ACTOR_FAILURES as error:
                    self._restore(slot, error)
                    ref = send(slot)
                    continue
                if method in STATE_CHANGING:
                    self.since_checkpoint[slot].append((method, tuple(args_of(slot))))
        return [results[slot] for slot in slots]

    def train(self, steps: int) -> list[dict]:
        self.restarts, self.lost = [0] * self.size, set()
        return self._call(list(range(self.size)), "train", lambda slot: (steps,))

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
