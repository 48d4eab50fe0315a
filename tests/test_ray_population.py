"""The Ray backend (issue 4) on a local Ray cluster: the same decisions as the in-process
backend for the same seed, and survival of actors killed in the middle of a generation.

One Ray session serves the whole module (starting Ray costs seconds); every run is tiny.
"""
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import warnings
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from evo_sft import build, run  # noqa: E402
from evo_sft.checkpoint import EvolutionCheckpointer, checkpoint_dirs  # noqa: E402
from evo_sft.config import config_from_dict  # noqa: E402
from evo_sft.controller import Controller  # noqa: E402
from evo_sft.population.local import LocalPopulation  # noqa: E402
from evo_sft.population.ray_backend import RayPopulation  # noqa: E402

GENERATIONS = 3


def experiment(backend: str, run_dir: Path, tracking_uri: str | None = None) -> dict:
    """A tiny experiment: 3 members of the demo model, 3 generations of 6 steps."""
    return {
        "name": "raytest",
        "seed": 3,
        "run_dir": str(run_dir),
        "model": {"name": "demo"},
        "data": {"source": "demo", "num_rows": 60, "test_size": 12, "max_length": 64},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]},
        "agent": {"lr": 1.0e-3, "batch_size": 4, "micro_batch_size_per_gpu": 4, "max_grad_norm": 1.0},
        "population": {"size": 3, "backend": backend, "num_cpus": 0.5},
        "evolution": {
            "generations": GENERATIONS, "steps_per_generation": 6, "tournament_size": 2,
            "mutation": {"no_mutation": 0.2, "rl_hp": 0.8},
            "bounds": {"lr": {"min": 1.0e-4, "max": 3.0e-2}, "batch_size": {"min": 4, "max": 8}},
        },
        "tracking": {"uri": tracking_uri, "experiment": "raytest"},
        "checkpoint": {"every": 1, "keep": 5},
    }


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray cluster for the module, its temp folder under a short /tmp path
    (Ray's socket paths must stay under ~107 characters)."""
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    ray.init(num_cpus=4, _temp_dir=temp_dir, include_dashboard=False, log_to_driver=False)
    yield temp_dir
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    if previous is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = previous


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One sqlite MLflow store for the module (creating its tables once costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def last_controller_state(run_dir: Path) -> dict:
    return json.loads((checkpoint_dirs(run_dir)[0] / "controller.json").read_text())["controller"]


def pieces(config, run_dir: Path) -> tuple[str, dict, list[dict]]:
    """(model path, tokenised data, founders' hyperparameters), as `run.start` prepares them."""
    model_path = build.resolve_model_path(config, run_dir)
    prepared = build.prepare_data(config, build.load_tokenizer(config.tokenizer or model_path))
    return model_path, prepared, build.founder_hyperparameters(config)


def make_controller(config, population, run_dir: Path | None = None) -> Controller:
    """The controller exactly as `run.start` builds it (less tracking and elite export)."""
    selection, mutations = build.selection_and_mutations(config)
    checkpointer = EvolutionCheckpointer(run_dir, config.checkpoint.every, config.checkpoint.keep) if run_dir else None
    return Controller(population, build.hp_config(config), config.evolution.steps_per_generation, config.seed,
                      selection=selection, mutations=mutations,
                      micro_batch_size=config.agent.micro_batch_size_per_gpu, checkpointer=checkpointer)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The same experiment with the in-process backend (what `run.start` builds for backend=local)."""
    run_dir = tmp_path_factory.mktemp("local")
    config = config_from_dict(experiment("local", run_dir))
    model_path, prepared, founders = pieces(config, run_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in an actor with num_cpus < 1
    try:
        population = LocalPopulation([build.build_host(config.to_dict(), model_path, prepared, slot, hp)
                                      for slot, hp in enumerate(founders)])
        controller = make_controller(config, population)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            controller.run(GENERATIONS)
    finally:
        torch.set_num_threads(threads)
    return json.loads(json.dumps(controller.state_dict()))


def decisions(state: dict) -> dict:
    """What a run decided, without the fitness values (compared to a tolerance) or restarts."""
    lineage = state["lineage"]
    return {
        "generation": state["generation"],
        "slot_ids": state["slot_ids"],
        "members": lineage["members"],
        "events": [e for e in lineage["events"] if e["kind"] != "restart"],
    }


def assert_same_run(state: dict, reference: dict) -> None:
    assert decisions(state) == decisions(reference)
    fitness, expected = dict(map(tuple, state["fitness"])), dict(map(tuple, reference["fitness"]))
    assert fitness.keys() == expected.keys()
    for member_id, history in expected.items():
        assert fitness[member_id] == pytest.approx(history, abs=1e-6, rel=1e-6), member_id
    assert any(e["kind"] == "clone" for e in state["lineage"]["events"])  # there were decisions to compare


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
    between the clone and the mutations (only a replay of the clone recovers that member).
    It records where each death was found (`restored_in`)."""

    def __init__(self, *args, kill_in_train=None, kill_after_clone_in=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_in_train, self.kill_after_clone_in = kill_in_train or {}, kill_after_clone_in
        self.generation, self.killed, self.receivers_of = 0, [], {}
        self.phase, self.restored_in = None, []

    def _call(self, slots, method, args_of=lambda slot: ()):
        self.phase = method
        return super()._call(slots, method, args_of)

    def _restore(self, slot, error):
        self.restored_in.append(self.phase)
        super()._restore(slot, error)

    def _kill(self, generation: int, slot: int, delay: float = 0.0) -> None:
        pid = self.locations()[slot]["pid"]
        self.killed.append({"generation": generation, "slot": slot, "pid": pid})
        if delay:
            threading.Timer(delay, os.kill, (pid, signal.SIGKILL)).start()
        else:
            os.kill(pid, signal.SIGKILL)

    def train(self, steps):
        if self.generation in self.kill_in_train:
            self._kill(self.generation, *self.kill_in_train[self.generation])
        try:
            return super().train(steps)
        finally:
            self.generation += 1

    def clone(self, pairs):
        self.receivers_of[self.generation - 1] = [receiver for receiver, _ in pairs]
        super().clone(pairs)

    def set_hyperparameters(self, per_slot):
        if self.generation - 1 == self.kill_after_clone_in:
            receivers = self.receivers_of.get(self.generation - 1)
            assert receivers, "the plan of this generation cloned nothing; pick another generation"
            self._kill(self.generation - 1, receivers[0])
        super().set_hyperparameters(per_slot)


def test_killed_actors_are_restarted_and_the_run_decides_as_without_them(ray_session, local_reference, tmp_path):
    """run.start's controller, on a population whose actors are SIGKILLed twice: between a clone
    and its mutation in generation 1, and in the middle of generation 2's training."""
    run_dir = tmp_path / "killed"
    config = config_from_dict(experiment("ray", run_dir))
    model_path, prepared, founders = pieces(config, run_dir)
    population = KillingPopulation(config.to_dict(), model_path, prepared, founders,
                                   num_cpus=config.population.num_cpus, kill_in_train={2: (1, 0.01)},
                                   kill_after_clone_in=1)
    controller = make_controller(config, population, run_dir)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            controller.run(GENERATIONS)
        locations = population.locations()  # every member answers
    finally:
        population.close()

    assert controller.generation == GENERATIONS
    assert [k["generation"] for k in population.killed] == [1, 2]
    assert population.killed[0]["slot"] in population.receivers_of[1]
    assert population.restored_in == ["set_hyperparameters", "train"]  # each death found where it happened
    restarts = [e for e in controller.lineage.events if e["kind"] == "restart"]
    assert [(e["generation"], e["slot"]) for e in restarts] == [(k["generation"], k["slot"]) for k in population.killed]
    assert all(e["member_id"] in controller.lineage.members and e["error"] for e in restarts)
    assert sum("died" in str(w.message) for w in caught) == 2
    for killed in population.killed:
        assert locations[killed["slot"]]["pid"] != killed["pid"]
    assert all(math.isfinite(f) for m in controller.slot_ids for f in controller.fitness[m])
    # Restored from the last checkpoint with every later call replayed, the members are the ones
    # that died: the run decides exactly as the uninterrupted in-process run.
    assert_same_run(controller.state_dict(), local_reference)


def test_a_member_that_keeps_dying_is_replaced_by_a_clone_of_the_elite(ray_session, tmp_path):
    """With no restart allowed, the actor killed in generation 1 is lost: its member scores -inf,
    the lineage says so, and the generation's plan fills its slot with a clone of the elite."""
    run_dir = tmp_path / "lost"
    config = config_from_dict(experiment("ray", run_dir))
    model_path, prepared, founders = pieces(config, run_dir)
    population = KillingPopulation(config.to_dict(), model_path, prepared, founders,
                                   num_cpus=config.population.num_cpus, kill_in_train={1: (2, 0.01)},
                                   max_restarts_per_generation=0)
    controller = make_controller(config, population, run_dir)
    records = []
    controller.observers.append(lambda _, record: records.append(record))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            controller.run(GENERATIONS)
    finally:
        population.close()

    lost_id = records[1].member_ids[2]
    lost = [e for e in controller.lineage.events if e["kind"] == "lost"]
    assert [(e["generation"], e["slot"], e["member_id"]) for e in lost] == [(1, 2, lost_id)]
    assert not any(e["kind"] == "restart" for e in controller.lineage.events)
    assert any("replaced by a clone of the elite" in str(w.message) for w in caught)
    assert records[1].fitness[2] == -math.inf and not records[1].train[2]["finite"]
    assert controller.fitness[lost_id][-1] == -math.inf
    replacement = records[1].decisions[2]
    assert (replacement.parent_id, replacement.clone) == (records[1].elite_id, True)
    # the clone trained on from the elite's weights: its next score is finite and close to the elite's
    assert math.isfinite(records[2].fitness[2])
    assert abs(records[2].fitness[2] - records[1].fitness[records[1].elite_slot]) < 0.5
    assert controller.generation == GENERATIONS
