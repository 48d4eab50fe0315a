"""The Ray backend: members on Ray actors (one each, or several sharing one base model), trained
and scored in parallel; clones travel actor to actor as object references (or stay on the device
within one actor); a dead actor is rebuilt from the last checkpoint."""
import math
import os
import traceback
import warnings
from pathlib import Path

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from evo_sft.console import quiet_libraries
from evo_sft.fitness import Evaluation
from evo_sft.io import storage
from evo_sft.population.gang import Gang
from evo_sft.population.hosting import MemberRecipe, build_hosts, slot_groups
from evo_sft.population.protocol import TrainResult
from evo_sft.sft import data_parallel

MAX_RESTARTS_PER_GENERATION = 3
PROGRESS_SECONDS = 0.5  # how often a `train` with a `report` asks the actors how far they are
ACTOR_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError)
# Calls that change a member (or an actor's stash of donors for clones on it); each is logged
# per actor until the next checkpoint and replayed, in order, on an actor rebuilt after a death.
# "train_group" trains every member of the actor (together where they can).
STATE_CHANGING = ("train_group", "import_portable", "set_hyperparameters", "load", "stash", "import_stashed",
                  "drop_stash")
ACTOR_METHODS = ("save_members", "stash", "import_stashed", "drop_stash", "export_portable", "import_portable")
# What only rank 0 of a member on several processes does (the others hold the same member).
RANK_0_ONLY = ("save_members", "export_portable", "export_adapter")


def portable(state) -> tuple[dict, dict, dict]:
    """A member state for another process: each tensor as a numpy byte array, which Ray moves out
    of band (torch tensors are pickled, several times slower), plus its dtype and shape."""
    tensors, meta = state
    arrays = {name: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy() for name, t in tensors.items()}
    layout = {name: [str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()}
    return arrays, layout, meta


def from_portable(payload) -> tuple[dict, dict]:
    """The state `portable` made, as read-only tensors over Ray's arrays (no copy): they are only
    read, by `import_state`, which copies every tensor onto the member's device."""
    arrays, layout, meta = payload
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: torch.from_numpy(arrays[name]).view(getattr(torch, dtype)).reshape(shape)
                for name, (dtype, shape) in layout.items()}, meta


LOST_EVALUATION = Evaluation(-math.inf, math.nan)  # what a lost member reports: see lost_train_result


def lost_train_result(slot: int) -> TrainResult:
    """What a lost member reports for the rest of its generation: it scores -inf, so the plan
    replaces it with a clone of the elite."""
    return TrainResult(slot, math.nan, False, 0, 0.0, 0.0, None)


class MemberActor:
    """A thin shell: builds its members (one, or several on one shared base model) inside the
    actor and forwards every call to the member of the given slot. With `ranks` (rank, world,
    rendezvous address) it is one process of a member trained by `world` (a `Gang`)."""

    def __init__(self, recipe: MemberRecipe, prepared: dict, founders: dict[int, dict], ranks: tuple | None = None):
        quiet_libraries()
        replicas = data_parallel.join(*ranks, use_gpu=recipe.use_gpu) if ranks else None
        self.rank, self.in_gang = (replicas.rank, True) if replicas else (0, False)
        self.hosts = build_hosts(recipe, prepared, founders)
        if replicas:  # one member, on several processes
            (host,) = self.hosts.values()
            host.agent.replicas = replicas
            data_parallel.shard_base(host.agent, replicas)
        self.stashed = {}
        self.writes = storage.PendingWrites([])

    def call(self, slot: int, method: str, *args):
        """In a gang, a call that fails (a peer died inside a collective, or anything else) leaves
        the ranks out of step: this process prints the error and exits, so that the backend sees
        an actor death and rebuilds the whole member from its checkpoint."""
        if self.rank and method in RANK_0_ONLY:
            return None
        try:
            if method in ACTOR_METHODS:
                return getattr(self, method)(slot, *args)
            return getattr(self.hosts[slot], method)(*args)
        except Exception:
            if not self.in_gang:
                raise
            traceback.print_exc()
            os._exit(1)

    def save_members(self, slot: int, directory: str) -> None:
        """Copy every member of this actor in turn (`slot` is any of them); the copies are written
        on threads while the actor goes on, and `wait_saved` reports when they are."""
        self.writes = storage.write_snapshots((host.snapshot() for host in self.hosts.values()), directory)

    @ray.method(concurrency_group="progress")
    def progress(self) -> dict[int, tuple[int, int]]:
        """{slot: (steps, tokens)} of each member's current or last `train`, read beside training."""
        return {slot: host.progress for slot, host in self.hosts.items()}

    @ray.method(concurrency_group="writes")
    def wait_saved(self) -> None:
        """Runs beside training (its own concurrency group), so the driver learns when this
        actor's part of a checkpoint is on disk without waiting for the actor's current call."""
        self.writes.wait()

    def stash(self, slot: int) -> None:
        """Keep a copy of a donor on its device, for clones into members of this actor."""
        self.stashed[slot] = self.hosts[slot].export_state(on_device=True)

    def import_stashed(self, slot: int, donor: int) -> None:
        self.hosts[slot].import_state(self.stashed[donor])

    def drop_stash(self, slot: int) -> None:
        """Free every state this actor stashed (`slot` is any of its members)."""
        self.stashed.clear()

    def export_portable(self, slot: int):
        return portable(self.hosts[slot].export_state())

    def import_portable(self, slot: int, payload, stash_as: int | None = None) -> None:
        """Become the exported member; with `stash_as` (the donor's slot), also keep the state on
        the device for this actor's other receivers of the same donor."""
        self.hosts[slot].import_state(from_portable(payload))
        if stash_as is not None:
            self.stashed[stash_as] = self.hosts[slot].export_state(on_device=True)

    def location(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


class ActorWrites:
    """The checkpoint writes of each actor (by its slots)."""

    def __init__(self, refs: dict[tuple, ray.ObjectRef]):
        self.refs = refs

    def wait(self) -> None:
        """Returns once every actor's writes have ended and raises the first failure, so that a failed
        checkpoint's folder can be deleted with no other actor still writing into it."""
        ray.wait(list(self.refs.values()), num_returns=len(self.refs))
        for slots, ref in self.refs.items():
            try:
                ray.get(ref)
            except ACTOR_FAILURES as error:
                raise storage.WriterLost(f"the actor of slots {list(slots)} died before its members were written "
                                         f"({type(error).__name__})") from error


class RayPopulation:
    """The population interface over Ray actors, each hosting `members_per_actor` members, or,
    with `gpus_per_member` k > 1, over gangs of k actors that each train one member together.
    `num_cpus`/`num_gpus` are what one actor asks for."""

    def __init__(self, recipe: MemberRecipe, prepared: dict, founders: list[dict],
                 num_cpus: float = 1.0, num_gpus: float = 0.0, members_per_actor: int = 1,
                 max_restarts_per_generation: int = MAX_RESTARTS_PER_GENERATION, gpus_per_member: int = 1):
        if gpus_per_member > 1 and members_per_actor > 1:
            raise ValueError("a member on several processes has a base model of its own: members_per_actor must be 1")
        self.recipe = recipe
        self.gang = (gpus_per_member, num_cpus, num_gpus)
        self.prepared_ref = ray.put(prepared)
        self.actor_class = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
                                      concurrency_groups={"writes": 1, "progress": 1},
                                      allow_out_of_order_execution=False)(MemberActor)  # `_calls` relies on it
        self.founders = list(founders)
        self.current_hyperparameters = list(founders)
        self.groups = slot_groups(len(founders), members_per_actor)
        self.group_of = {slot: g for g, group in enumerate(self.groups) for slot in group}
        self.last_checkpoint: Path | None = None
        self.since_checkpoint: list[list[tuple[int, str, tuple]]] = [[] for _ in self.groups]
        self.saved_at: list[int] | None = None
        self.restarts = [0] * len(self.groups)
        self.max_restarts_per_generation = max_restarts_per_generation
        self.lost: set[int] = set()
        self.on_failure = None
        self.actors = [self._start(g, self.founders) for g in range(len(self.groups))]

    @property
    def size(self) -> int:
        return len(self.founders)

    def checkpoint_committed(self, path: Path) -> None:
        """A checkpoint of every member is complete: the calls made before its copies were taken
        (by the last `save`, else all so far) need not be replayed."""
        self.last_checkpoint = Path(path)
        marks = self.saved_at or [len(log) for log in self.since_checkpoint]
        self.since_checkpoint = [log[mark:] for log, mark in zip(self.since_checkpoint, marks)]
        self.saved_at = None

    def _start(self, group: int, hyperparameters: list[dict]):
        founders = {slot: hyperparameters[slot] for slot in self.groups[group]}
        if self.gang[0] > 1:
            return Gang(self.actor_class, *self.gang, self.recipe, self.prepared_ref, founders)
        return self.actor_class.remote(self.recipe, self.prepared_ref, founders)

    def _restore(self, group: int, error: Exception) -> None:
        """Replace a dead actor: restore each of its members from the last checkpoint (or rebuild
        it as founded before the first one) and replay every call that changed it since then
        (training, clone imports, mutations), so it is the member it was when it died. The
        members of an actor that dies more than `max_restarts_per_generation` times in one
        generation are lost instead."""
        while True:
            self.restarts[group] += 1
            if self.restarts[group] > self.max_restarts_per_generation:
                self._lose(group, error)
                return
            warnings.warn(f"the actor of slots {self.groups[group]} died ({type(error).__name__}); restarting it")
            self._stop_actor(group)
            self.actors[group] = self._start(
                group, self.founders if self.last_checkpoint is None else self.current_hyperparameters)
            actor = self.actors[group]
            try:
                if self.last_checkpoint is not None:
                    ray.get([actor.call.remote(slot, "load", str(self.last_checkpoint / "members"))
                             for slot in self.groups[group]])
                for slot, method, args in self.since_checkpoint[group]:
                    ray.get(actor.call.remote(slot, method, *args))
            except ACTOR_FAILURES as again:
                error = again
                continue
            break
        if self.on_failure is not None:
            for slot in self.groups[group]:
                self.on_failure("restart", slot, str(error))

    def _lose(self, group: int, error: Exception) -> None:
        """Give up on the members of `group` for this generation: a fresh actor takes their slots,
        they score -inf, and the generation's plan fills the slots with clones of the elite."""
        slots = self.groups[group]
        if self.lost.intersection(slots):
            raise RuntimeError(f"slots {slots}: even a fresh actor for lost members died: {error}") from error
        warnings.warn(f"the actor of slots {slots} died {self.restarts[group]} times in this generation "
                      f"({type(error).__name__}); its members score -inf and are replaced by clones of the elite")
        self._stop_actor(group)
        self.actors[group] = self._start(group, self.current_hyperparameters)
        self.lost.update(slots)
        if self.on_failure is not None:
            for slot in slots:
                self.on_failure("lost", slot, str(error))

    def _stop_actor(self, group: int) -> None:
        if isinstance(self.actors[group], Gang):
            self.actors[group].kill()
            return
        try:
            ray.kill(self.actors[group], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _call(self, slots: list[int], method: str, args_of=lambda slot: ()) -> list:
        """Call `method` on the given slots' members in parallel, restarting dead actors."""
        return self._calls([(slot, method, tuple(args_of(slot))) for slot in slots])

    def _calls(self, calls: list[tuple[int, str, tuple]], while_waiting=None) -> list:
        """Send every (slot, method, args) call at once and return their results. One actor runs
        its calls in the order given (its tasks run in order), different actors in parallel. The
        results are taken in that order, so a dead actor is rebuilt by replaying the calls it
        finished, and its later calls are sent again, in order, to its replacement. `while_waiting`
        (if any) is called every PROGRESS_SECONDS until the results are in."""
        results, sent_to = {}, {}

        def send(index: int):
            slot, method, args = calls[index]
            if slot in self.lost and method in ("train_group", "evaluate"):
                results[index] = LOST_EVALUATION if method == "evaluate" else {
                    s: lost_train_result(s) for s in self.groups[self.group_of[slot]]}
                return None
            sent_to[index] = self.actors[self.group_of[slot]]
            return sent_to[index].call.remote(slot, method, *args)

        refs = [send(index) for index in range(len(calls))]
        for index, ref in enumerate(refs):
            slot, method, args = calls[index]
            while index not in results:
                while while_waiting is not None and not ray.wait([ref], timeout=PROGRESS_SECONDS)[0]:
                    while_waiting()
                try:
                    results[index] = ray.get(ref)
                except ACTOR_FAILURES as error:
                    group = self.group_of[slot]
                    if self.actors[group] is sent_to[index]:  # not yet replaced for an earlier call
                        self._restore(group, error)
                    ref = send(index)
                    continue
                if method in STATE_CHANGING:
                    self.since_checkpoint[self.group_of[slot]].append((slot, method, args))
        return [results[index] for index in range(len(calls))]

    def train(self, steps: int, max_tokens: list[int] | None = None, report=None) -> list[TrainResult]:
        """One call per actor, which trains all of its members; while they train, `report` hears
        from the actors every PROGRESS_SECONDS."""
        self.restarts, self.lost = [0] * len(self.groups), set()
        limits = dict(enumerate(max_tokens)) if max_tokens is not None else None
        results = {}
        calls = [(group[0], "train_group", (steps, limits)) for group in self.groups]
        for group_results in self._calls(calls, None if report is None else lambda: report(self._progress())):
            results.update(group_results)
        if report is not None:
            report({slot: (len(result.step_losses), result.tokens) for slot, result in results.items()})
        return [results[slot] for slot in range(self.size)]

    def _progress(self) -> dict[int, tuple[int, int]]:
        """{slot: (steps, tokens)} from every actor that answers within PROGRESS_SECONDS."""
        refs = [actor.progress.remote() for actor in self.actors]
        done = {}
        for ref in ray.wait(refs, num_returns=len(refs), timeout=PROGRESS_SECONDS)[0]:
            try:
                done.update(ray.get(ref))
            except ACTOR_FAILURES:
                pass  # a dead actor: `_calls` rebuilds it
        return done

    def evaluate(self, full: bool = False) -> list[Evaluation]:
        return self._call(list(range(self.size)), "evaluate", lambda slot: (full,))

    def hyperparameters(self) -> list[dict]:
        self.current_hyperparameters = self._call(list(range(self.size)), "hyperparameters")
        return self.current_hyperparameters

    def started(self, timeout: float) -> bool:
        refs = [actor.location.remote() for actor in self.actors]
        return len(ray.wait(refs, num_returns=len(refs), timeout=max(0.0, timeout))[0]) == len(refs)

    def clone(self, pairs: list[tuple[int, int]]) -> None:
        """(receiver, donor) pairs. Between members of one actor a clone is a copy on its device.
        Otherwise the donor exports once, into the object store, and on each receiving actor one
        receiver takes the reference (the driver never holds the tensors) and keeps the state on
        the device for that actor's other receivers of the donor. Every call is sent at once: each
        actor runs its own in order, donors export before any receiver changes, and the copies
        within an actor run while the other actors export."""
        donor_of = dict(pairs)
        local = sorted(r for r, d in pairs if self.group_of[r] == self.group_of[d])
        remote = {}  # (receiving actor, donor) -> its receivers
        for receiver in sorted(set(donor_of) - set(local)):
            remote.setdefault((self.group_of[receiver], donor_of[receiver]), []).append(receiver)
        states = {donor: self.actors[self.group_of[donor]].call.remote(donor, "export_portable")
                  for donor in {donor for _, donor in remote}}
        local_donors = sorted({donor_of[r] for r in local})
        calls = [(d, "stash", ()) for d in local_donors] + [(r, "import_stashed", (donor_of[r],)) for r in local]
        for (_, donor), (first, *others) in remote.items():
            calls.append((first, "import_portable", (states[donor], donor if others else None)))
            calls.extend((r, "import_stashed", (donor,)) for r in others)
        stashing = {self.group_of[d]: d for d in local_donors}  # a member of each actor that stashed
        stashing.update({group: receivers[0] for (group, _), receivers in remote.items() if len(receivers) > 1})
        self._calls(calls + [(slot, "drop_stash", ()) for slot in stashing.values()])

    def set_hyperparameters(self, per_slot: dict[int, dict]) -> None:
        self._call(list(per_slot), "set_hyperparameters", lambda slot: (per_slot[slot],))

    def save(self, directory: Path) -> "ActorWrites":
        """One call per actor, which copies all of its members and returns; they are written
        while the actors go on, and `wait()` on the result returns once all are."""
        self._call([group[0] for group in self.groups], "save_members", lambda slot: (str(directory),))
        self.saved_at = [len(log) for log in self.since_checkpoint]
        return ActorWrites({tuple(group): actor.wait_saved.remote() for group, actor in zip(self.groups, self.actors)})

    def load(self, directory: Path) -> None:
        self._call(list(range(self.size)), "load", lambda slot: (str(directory),))

    def export_adapter(self, slot: int, directory: Path) -> str:
        return self._call([slot], "export_adapter", lambda s: (str(directory),))[0]

    def locations(self) -> list[dict]:
        """Where each slot's member runs: {node_id, pid} of its actor."""
        per_actor = ray.get([actor.location.remote() for actor in self.actors])
        return [per_actor[self.group_of[slot]] for slot in range(self.size)]

    def close(self) -> None:
        for group in range(len(self.actors)):
            self._stop_actor(group)
