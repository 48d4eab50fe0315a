"""The Ray backend (issue 4) on a local Ray cluster: the same decisions as the in-process
backend for the same seed, and survival of actors killed in the middle of a generation.

One Ray session serves the whole module (starting Ray costs seconds); every run is tiny.
"""
import json
import math
import os
import signal
import threading
import time
import warnings

import psutil
import pytest
import torch

ray = pytest.importorskip("ray")

from evo_sft import build, run  # noqa: E402
from evo_sft.config import config_from_dict  # noqa: E402
from evo_sft.io.checkpoint import checkpoint_dirs  # noqa: E402
from evo_sft.population.ray_backend import RayPopulation, from_portable  # noqa: E402
from tests.helpers.evolution_run import (  # noqa: E402
    GENERATIONS, assert_same_run, experiment, last_controller_state, make_controller, pieces, run_local,
)

pytestmark = pytest.mark.integration  # a Ray session and actors killed mid-run: about a minute


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One sqlite MLflow store for the module (creating its tables once costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The same experiment with the in-process backend (what `run.start` builds for backend=local)."""
    run_dir = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in an actor with num_cpus < 1
    try:
        _, state = run_local(experiment("local", run_dir), run_dir)
    finally:
        torch.set_num_threads(threads)
    return json.loads(json.dumps(state))


def test_ray_run_decides_as_the_local_backend(ray_session, local_reference, tracking_uri, tmp_path):
    config = config_from_dict(experiment("ray", tmp_path / "ray", tracking_uri))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run.start(config)
    assert ray.is_initialized()  # run.start leaves a Ray session it did not start running
    assert_same_run(last_controller_state(tmp_path / "ray"), local_reference)
    assert (result.best_adapter / "adapter_config.json").exists()


class KillingPopulation(RayPopulation):
    """A RayPopulation that SIGKILLs member actors by PID at chosen moments:
    `kill_in_train[generation] = (slot, delay_s)` kills that slot's actor `delay_s` seconds
    after the generation's training was sent (from a background thread, while it trains);
    `kill_after_clone_in=generation` kills a slot that received a clone in that generation,
    between the clone and the mutations (only a replay of the clone recovers that member);
    `kill_after_copy_in=(generation, slot)` kills that slot's actor once it has copied its
    members for that generation's checkpoint, before it can report them written. Generations are
    numbered from 1, as the controller numbers them. It records where each death was found
    (`restored_in`)."""

    def __init__(self, *args, kill_in_train=None, kill_after_clone_in=None, kill_after_copy_in=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_in_train, self.kill_after_clone_in = kill_in_train or {}, kill_after_clone_in
        self.kill_after_copy_in = kill_after_copy_in
        self.generation, self.killed, self.receivers_of = 1, [], {}  # the generation under way
        self.phase, self.restored_in, self.clone_pairs = None, [], []

    def _calls(self, calls, while_waiting=None):
        self.phase = ",".join(dict.fromkeys(method for _, method, _ in calls))
        results = super()._calls(calls, while_waiting)
        copy_kill = self.kill_after_copy_in
        if self.phase == "save_members" and copy_kill and copy_kill[0] == self.generation - 1:
            self._kill(self.generation - 1, copy_kill[1], wait=True)
        return results

    def _restore(self, slot, error):
        self.restored_in.append(self.phase)
        super()._restore(slot, error)

    def _kill(self, generation: int, slot: int, delay: float = 0.0, wait: bool = False) -> None:
        """SIGKILL the slot's actor now, or `delay` seconds from now; with `wait`, return once it is gone."""
        pid = self.locations()[slot]["pid"]
        self.killed.append({"generation": generation, "slot": slot, "pid": pid})
        if delay:
            threading.Timer(delay, os.kill, (pid, signal.SIGKILL)).start()
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while wait and psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"actor process {pid} outlived SIGKILL"
            time.sleep(0.01)

    def train(self, steps, max_tokens=None, report=None):
        if self.generation in self.kill_in_train:
            self._kill(self.generation, *self.kill_in_train[self.generation])
        try:
            return super().train(steps, max_tokens, report)
        finally:
            self.generation += 1

    def clone(self, pairs):
        self.receivers_of[self.generation] = [receiver for receiver, _ in pairs]
        self.clone_pairs.extend(pairs)
        super().clone(pairs)

    def set_hyperparameters(self, per_slot):
        if self.generation == self.kill_after_clone_in:
            receivers = self.receivers_of.get(self.generation)
            assert receivers, "the plan of this generation cloned nothing; pick another generation"
            self._kill(self.generation, receivers[0])
        super().set_hyperparameters(per_slot)


def killing_run(run_dir, members_per_actor: int = 1, step_together: bool = False, **kills):
    """(population, controller) of the tiny experiment on a `KillingPopulation`."""
    config = config_from_dict(experiment("ray", run_dir, members_per_actor=members_per_actor,
                                         step_together=step_together))
    model_path, prepared, founders = pieces(config, run_dir)
    population = KillingPopulation(build.member_recipe(config, model_path), prepared, founders,
                                   num_cpus=config.population.num_cpus, members_per_actor=members_per_actor, **kills)
    return population, make_controller(config, population, run_dir)


def test_killed_actors_are_restarted_and_the_run_decides_as_without_them(ray_session, local_reference, tmp_path):
    """run.start's controller, on a population whose actors are SIGKILLed twice: between a clone
    and its mutation that open generation 2, and in the middle of generation 3's training."""
    population, controller = killing_run(tmp_path / "killed", kill_in_train={3: (1, 0.01)}, kill_after_clone_in=2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            controller.run(GENERATIONS)
        locations = population.locations()  # every member answers
    finally:
        population.close()

    assert controller.generation == GENERATIONS
    assert [k["generation"] for k in population.killed] == [2, 3]
    assert population.killed[0]["slot"] in population.receivers_of[2]
    assert population.restored_in == ["set_hyperparameters", "train_group"]  # each death found where it happened
    restarts = [e for e in controller.lineage.events if e["kind"] == "restart"]
    assert [(e["generation"], e["slot"]) for e in restarts] == [(k["generation"], k["slot"]) for k in population.killed]
    assert all(e["member_id"] in controller.lineage.members and e["error"] for e in restarts)
    assert sum("restarting it" in str(w.message) for w in caught) == 2
    # a checkpoint whose writer was killed before writing it is abandoned, and the run decides the same
    abandoned = [str(w.message) for w in caught if "abandoned" in str(w.message)]
    assert all("died before its members were written" in message for message in abandoned)
    for killed in population.killed:
        assert locations[killed["slot"]]["pid"] != killed["pid"]
    assert all(math.isfinite(f) for m in controller.slot_ids for f in controller.fitness[m])
    # Restored from the last checkpoint with every later call replayed, the members are the ones
    # that died: the run decides exactly as the uninterrupted in-process run.
    assert_same_run(controller.state_dict(), local_reference)


def run_to_the_end(population, controller) -> list[str]:
    """Run the experiment's generations, then stop the actors; the warnings it gave."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            controller.run(GENERATIONS)
    finally:
        population.close()
    return [str(w.message) for w in caught]


def test_a_checkpoint_whose_actor_dies_before_writing_is_abandoned_and_the_run_decides_the_same(
        ray_session, local_reference, tmp_path):
    """The actor of slot 1 is SIGKILLed once it has copied its members for checkpoint 2 (taken at
    the end of generation 2), before it reports them written. That checkpoint is abandoned with
    a warning; generation 3 finds the death as it opens, restores the actor from checkpoint 1 and replays
    everything since (generation 2 included), and the run decides as the uninterrupted one."""
    population, controller = killing_run(tmp_path / "copy", kill_after_copy_in=(2, 1))
    caught = run_to_the_end(population, controller)

    abandoned = [message for message in caught if "abandoned" in message]
    assert len(abandoned) == 1 and abandoned[0].startswith("checkpoint generation_00002 is abandoned: ")
    assert "the actor of slots [1] died before its members were written" in abandoned[0]
    assert sorted(p.name for p in (tmp_path / "copy" / "checkpoints").iterdir()) == ["generation_00001",
                                                                                    "generation_00003"]
    restarts = [(e["generation"], e["slot"]) for e in controller.lineage.events if e["kind"] == "restart"]
    assert restarts == [(3, 1)] and population.restored_in == ["hyperparameters"]  # read as generation 3 opens
    assert_same_run(controller.state_dict(), local_reference)


def test_a_member_that_keeps_dying_is_replaced_by_a_clone_of_the_elite(ray_session, tmp_path):
    """With no restart allowed, the actor killed in generation 1 is lost: its member scores -inf,
    the lineage says so, and the plan that opens generation 2 fills its slot with a clone of the elite."""
    population, controller = killing_run(tmp_path / "lost", kill_in_train={1: (2, 0.01)},
                                         max_restarts_per_generation=0)
    records = []
    controller.observers.append(lambda _, record: records.append(record))
    caught = run_to_the_end(population, controller)

    lost_id = records[0].member_ids[2]
    lost = [e for e in controller.lineage.events if e["kind"] == "lost"]
    assert [(e["generation"], e["slot"], e["member_id"]) for e in lost] == [(1, 2, lost_id)]
    assert not any(e["kind"] == "restart" for e in controller.lineage.events)
    assert any("replaced by clones of the elite" in message for message in caught)
    assert records[0].fitness[2] == -math.inf and not records[0].train[2].finite
    assert controller.fitness[lost_id][-1] == -math.inf
    replacement = records[1].decisions[2]
    assert (replacement.parent_id, replacement.clone) == (records[0].elite_id, True)
    # the clone trained on from the elite's weights: its score is finite and close to the
    # elite's own (both trained one generation from the same weights)
    assert math.isfinite(records[1].fitness[2])
    assert abs(records[1].fitness[2] - records[1].fitness[records[1].member_ids.index(records[0].elite_id)]) < 0.5
    assert controller.generation == GENERATIONS


def test_members_sharing_actors_decide_as_members_on_their_own_and_survive_a_kill(ray_session, local_reference,
                                                                                  tmp_path):
    """Slots 0 and 1 share one actor and base model, slot 2 has its own; the shared actor is
    SIGKILLed in the middle of generation 2's training. The run decides exactly as the
    in-process run with one agent per member."""
    population, controller = killing_run(tmp_path / "shared", members_per_actor=2, kill_in_train={2: (0, 0.01)})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            controller.run(GENERATIONS)
        locations = population.locations()
    finally:
        population.close()

    assert locations[0]["pid"] == locations[1]["pid"] != locations[2]["pid"]
    assert locations[0]["pid"] != population.killed[0]["pid"]
    restarts = [(e["generation"], e["slot"]) for e in controller.lineage.events if e["kind"] == "restart"]
    assert restarts == [(2, 0), (2, 1)]  # both members of the killed actor were restored
    kinds = {population.group_of[r] == population.group_of[d] for r, d in population.clone_pairs}
    assert kinds == {True, False}, "the run made no clone within an actor, or none between actors"
    assert_same_run(controller.state_dict(), local_reference)


def test_members_stepped_together_on_an_actor_decide_as_members_alone_and_survive_a_kill(ray_session, tmp_path):
    """All three members on one actor, stepped together; the actor is SIGKILLed in the middle of
    generation 2's training and rebuilt by a replay of its joint training calls. The run decides
    as the in-process run with one agent per member."""
    _, alone = run_local(experiment("local", tmp_path / "alone", step_together=True), tmp_path / "alone")
    population, together = killing_run(tmp_path / "together", members_per_actor=3, step_together=True,
                                       kill_in_train={2: (0, 0.01)})
    records = []
    together.observers.append(lambda _, record: records.append(record))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            together.run(GENERATIONS)
    finally:
        population.close()

    # one joint call trained all three: they report the same seconds (alone, each has its own)
    assert all(len({result.seconds for result in record.train}) == 1 for record in records)
    assert [k["generation"] for k in population.killed] == [2]
    assert population.restored_in == ["train_group"]
    assert_same_run(together.state_dict(), json.loads(json.dumps(alone)), rel=1e-5)


def member_states(population) -> list[tuple[dict, dict]]:
    return [from_portable(payload) for payload in population._call(list(range(population.size)), "export_portable")]


def assert_same_state(state, expected) -> None:
    (tensors, meta), (expected_tensors, expected_meta) = state, expected
    assert tensors.keys() == expected_tensors.keys()
    for name, tensor in expected_tensors.items():
        torch.testing.assert_close(tensors[name], tensor, rtol=0, atol=0, msg=name)
    assert meta == expected_meta


def stash_sizes(population) -> list[int]:
    return ray.get([actor.__ray_call__.remote(lambda actor: len(actor.stashed)) for actor in population.actors])


def adapter(state) -> torch.Tensor:
    tensors, _ = state
    return torch.cat([t.flatten() for name, t in sorted(tensors.items()) if name.startswith("param/")])


def test_clones_within_and_between_actors_copy_each_donor_as_it_was(ray_session, tmp_path):
    """Four members on two actors, slots {0, 1} and {2, 3}, report their progress and clone in a ring where every donor is
    also a receiver: 0 <- 1 on one actor; 1 <- 2 and 2, 3 <- 0 between actors, where 3 copies on
    its actor what 2 imported. Each receiver becomes its donor as it was before the clone and
    stays a member of its own; the actor of 2 and 3, killed after the clone, is rebuilt by
    replaying it."""
    config_dict = experiment("ray", tmp_path, members_per_actor=2)
    config_dict["population"]["size"] = 4
    config = config_from_dict(config_dict)
    model_path, prepared, founders = pieces(config, tmp_path)
    population = RayPopulation(build.member_recipe(config, model_path), prepared, founders, num_cpus=0.5, members_per_actor=2)
    pairs = [(0, 1), (1, 2), (2, 0), (3, 0)]
    reports = []
    try:
        first = population.train(1, report=reports.append)
        progress = population._progress()  # what the actors report beside training, read after it
        before = member_states(population)
        population.clone(pairs)
        after = member_states(population)
        stashed = stash_sizes(population)
        population.set_hyperparameters({2: {**population.hyperparameters()[2], "lr": 3e-2}})
        population.train(1)
        trained = member_states(population)
        pid = population.locations()[2]["pid"]
        os.kill(pid, signal.SIGKILL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            replayed = member_states(population)
        locations, stashed_after_replay = population.locations(), stash_sizes(population)
    finally:
        population.close()

    assert all(not torch.equal(adapter(before[a]), adapter(before[b])) for a, b in [(0, 1), (1, 2), (0, 2)])
    assert reports[-1] == progress == {r.slot: (1, r.tokens) for r in first} and first[0].tokens > 0
    for receiver, donor in pairs:
        assert_same_state(after[receiver], before[donor])
    assert stashed == stashed_after_replay == [0, 0]  # donors stashed for the clone are freed
    # 2 and 3 trained from the same state with their own learning rates: no tensor is shared
    assert not torch.equal(adapter(trained[2]), adapter(trained[3]))
    assert locations[2]["pid"] == locations[3]["pid"] != pid
    for slot in range(4):
        assert_same_state(replayed[slot], trained[slot])


def test_clones_between_actors_of_other_ranks_take_the_donors_rank(ray_session, tmp_path):
    """Four members of LoRA ranks 8, 2, 4 and 6 on two actors, stepped together: after a ring of
    clones within and between actors each receiver holds its donor's state at the donor's rank
    (the tensors travel with their shapes), the members of mixed ranks train together, and an
    actor killed afterwards is rebuilt by replaying the rank changes and clones."""
    config_dict = experiment("ray", tmp_path, members_per_actor=2, step_together=True)
    config_dict["population"]["size"] = 4
    config = config_from_dict(config_dict)
    model_path, prepared, founders = pieces(config, tmp_path)
    population = RayPopulation(build.member_recipe(config, model_path), prepared, founders, num_cpus=0.5,
                               members_per_actor=2)
    pairs = [(0, 1), (1, 2), (2, 0), (3, 0)]
    try:
        population.set_hyperparameters({0: {"lora_r": 8}, 1: {"lora_r": 2, "lora_alpha": 5.0}, 3: {"lora_r": 6}})
        population.train(1)
        before = member_states(population)
        population.clone(pairs)
        after = member_states(population)
        population.train(1)
        trained, ranks = member_states(population), [hp["lora_r"] for hp in population.hyperparameters()]
        os.kill(population.locations()[2]["pid"], signal.SIGKILL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            replayed = member_states(population)
    finally:
        population.close()

    assert [state[1]["attributes"]["lora_r"] for state in before] == [8, 2, 4, 6]
    for receiver, donor in pairs:
        assert_same_state(after[receiver], before[donor])
    assert ranks == [2, 4, 8, 8]
    for slot in range(4):
        tensors, meta = trained[slot]
        assert all(t.shape[0 if ".lora_A." in name else 1] == ranks[slot]
                   for name, t in tensors.items() if name.startswith("param/"))
        assert_same_state(replayed[slot], trained[slot])


def test_a_time_budget_ends_the_run_at_its_deadline_while_its_members_wait_for_resources(ray_session, tmp_path):
    """Actors that cannot start (each asks for more CPUs than the cluster has, as on a cluster
    waiting for nodes, or on a machine too busy to build them) do not hold a budgeted run past its
    deadline: it ends then, having trained nothing, and says where its time went."""
    d = experiment("ray", tmp_path / "run")
    d["population"]["num_cpus"] = 8  # the module's Ray session has 4
    d["evolution"]["time_budget_s"] = 5
    ended = {}

    def start():
        began = time.time()
        try:
            run.start(config_from_dict(d))
        except run.TimeBudgetSpent as error:
            ended.update(seconds=time.time() - began, error=str(error))

    attempt = threading.Thread(target=start, daemon=True)
    attempt.start()
    attempt.join(60)
    assert ended, "the run went on waiting for its members past its deadline"
    assert 5 <= ended["seconds"] < 25  # its deadline, and the few seconds of a busy machine past it
    assert "its 5 s went to loading the model and starting the members" in ended["error"]
    assert checkpoint_dirs(tmp_path / "run") == []
