"""The Ray backend on a simulated two-node cluster (issue 4): members spread over both nodes,
and losing a node in the middle of a run is survived. Its own module: a `Cluster` is its own
Ray session, which cannot share a process with another one.
"""
import json
import math
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from evo_sft import build  # noqa: E402
from evo_sft.data.sources import load_tokenizer  # noqa: E402
from evo_sft.config import config_from_dict  # noqa: E402
from evo_sft.population.local import LocalPopulation  # noqa: E402
from evo_sft.population.ray_backend import RayPopulation  # noqa: E402
from tests.helpers.evolution_run import make_controller  # noqa: E402

GENERATIONS = 3
CPUS_PER_NODE = 2


def experiment(backend: str, run_dir: Path) -> dict:
    """Two members of one CPU each, on nodes of two CPUs: one member per node, and room on the
    head node for the member of a lost node."""
    return {
        "name": "clustertest",
        "seed": 5,
        "run_dir": str(run_dir),
        "model": {"name": "demo"},
        "data": {"source": "demo", "num_rows": 48, "test_size": 8, "max_length": 64},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]},
        "agent": {"lr": 1.0e-3, "batch_size": 4, "micro_batch_size_per_gpu": 4, "max_grad_norm": 1.0},
        "population": {"size": 2, "backend": backend, "num_cpus": 1},
        "evolution": {
            "generations": GENERATIONS, "steps_per_generation": 6, "tournament_size": 2,
            "mutation": {"no_mutation": 0.2, "rl_hp": 0.8},
            "hyperparameters": {"lr": {"min": 1.0e-4, "max": 3.0e-2}, "batch_size": {"min": 4, "max": 8}},
        },
        "checkpoint": {"every": 1, "keep": 5},
    }


@pytest.fixture(scope="module")
def cluster():
    """A head node and one worker node, each with two CPUs, in a private temp folder (RAY_TMPDIR
    keeps the cluster's address file away from other Ray sessions on this machine)."""
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_TMPDIR")}
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=temp_dir)
    os.makedirs(os.path.join(temp_dir, "ray"))
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": CPUS_PER_NODE, "include_dashboard": False, "temp_dir": os.path.join(temp_dir, "ray"),
        # notice a lost node within about a second
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200,
                           "health_check_failure_threshold": 3},
    })
    worker = cluster.add_node(num_cpus=CPUS_PER_NODE)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class NodeLosingPopulation(RayPopulation):
    """Removes `node` from `cluster` (from a background thread, `delay` s after the training of
    `generation` was sent); remembers where the members were before and where deaths were found."""

    def __init__(self, *args, cluster, node, generation: int, delay: float = 0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self.cluster, self.node, self.remove_in, self.delay = cluster, node, generation, delay
        self.generation, self.phase, self.restored_in, self.before = 1, None, [], None  # generations from 1
        self.remover = None

    def _calls(self, calls, while_waiting=None):
        self.phase = ",".join(dict.fromkeys(method for _, method, _ in calls))
        return super()._calls(calls, while_waiting)

    def _restore(self, slot, error):
        self.restored_in.append((self.phase, slot))
        super()._restore(slot, error)

    def train(self, steps, max_tokens=None, report=None):
        if self.generation == self.remove_in:
            self.before = self.locations()
            self.remover = threading.Timer(self.delay, self.cluster.remove_node, (self.node,))
            self.remover.start()
        try:
            return super().train(steps, max_tokens, report)
        finally:
            self.generation += 1


def test_members_spread_over_nodes_and_survive_losing_one(cluster, tmp_path):
    ray_cluster, worker = cluster
    head_id = ray_cluster.head_node.node_id
    assert {n["NodeID"] for n in ray.nodes() if n["Alive"]} == {head_id, worker.node_id}

    run_dir = tmp_path / "ray"
    config = config_from_dict(experiment("ray", run_dir))
    model_path = build.resolve_model_path(config, run_dir)
    prepared = build.prepare_data(config, load_tokenizer(model_path))
    founders = build.founder_hyperparameters(config)
    population = NodeLosingPopulation(build.member_recipe(config, model_path), prepared, founders,
                                      num_cpus=config.population.num_cpus,
                                      cluster=ray_cluster, node=worker, generation=2)
    controller = make_controller(config, population, run_dir)
    start = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            controller.run(GENERATIONS)
        after = population.locations()
    finally:
        if population.remover is not None:
            population.remover.join()
        population.close()
    elapsed = time.monotonic() - start

    # Before the loss: one member on each node, the one lost is on the worker.
    nodes_before = [location["node_id"] for location in population.before]
    assert set(nodes_before) == {head_id, worker.node_id}
    lost = [slot for slot, node in enumerate(nodes_before) if node == worker.node_id]
    assert [slot for phase, slot in population.restored_in] == lost
    assert all(phase == "train_group" for phase, _ in population.restored_in)
    # After: the run completed on the head node, with the restart in the lineage.
    assert controller.generation == GENERATIONS
    assert {location["node_id"] for location in after} == {head_id}
    assert worker.node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    restarts = [e for e in controller.lineage.events if e["kind"] == "restart"]
    assert [(e["generation"], e["slot"]) for e in restarts] == [(2, slot) for slot in lost]
    assert all(math.isfinite(f) for m in controller.slot_ids for f in controller.fitness[m])
    assert elapsed < 120

    # The same experiment in one process decides exactly the same.
    local_dir = tmp_path / "local"
    local_config = config_from_dict(experiment("local", local_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a one-CPU actor
    try:
        local = make_controller(local_config, LocalPopulation(build.local_hosts(local_config, model_path, prepared,
                                                                                founders)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            local.run(GENERATIONS)
    finally:
        torch.set_num_threads(threads)
    mine, theirs = json.loads(json.dumps(controller.state_dict())), json.loads(json.dumps(local.state_dict()))
    assert mine["slot_ids"] == theirs["slot_ids"]
    assert mine["lineage"]["members"] == theirs["lineage"]["members"]
    assert [e for e in mine["lineage"]["events"] if e["kind"] != "restart"] == theirs["lineage"]["events"]
    for (member_id, history), (other_id, expected) in zip(mine["fitness"], theirs["fitness"]):
        assert member_id == other_id and history == pytest.approx(expected, abs=1e-6, rel=1e-6)
