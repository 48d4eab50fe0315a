"""Members on two processes each (`population.gpus_per_member: 2`: gangs of two Ray actors in a
placement group, gloo on the CPU) decide the same evolution as the same members in one process,
even when one process of a member is killed mid-training."""
import json
import os
import signal
import threading
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from evo_sft import run
from evo_sft.config import ConfigError, config_from_dict
from evo_sft.population import ray_backend
from tests.helpers.evolution_run import assert_same_run, experiment, last_controller_state, run_local

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.integration  # a Ray session, six member processes: about a minute


def spanning(backend: str, run_dir, gpus_per_member: int = 1) -> dict:
    """The tiny experiment with two micro-batches in a step of 4 rows (so both processes of a
    member train) and no LoRA dropout (processes draw their own masks, so only then is the step
    the one-process step to the last bit)."""
    config = experiment(backend, run_dir)
    config["lora"]["lora_dropout"] = 0.0
    config["agent"]["micro_batch_size_per_gpu"] = 2
    config["population"]["gpus_per_member"] = gpus_per_member
    return config


class KillingSecondRank(ray_backend.RayPopulation):
    """SIGKILLs the second process of slot 1's member 0.01 s after generation 2's training was sent."""

    killed: list[int] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trainings = 0

    def train(self, *args, **kwargs):
        self.trainings += 1
        if self.trainings == 2:
            pid = ray.get(self.actors[1].actors[1].location.remote())["pid"]
            self.killed.append(pid)
            threading.Timer(0.01, os.kill, (pid, signal.SIGKILL)).start()
        return super().train(*args, **kwargs)


def test_members_on_two_processes_decide_as_members_in_one(ray_session, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in an actor with num_cpus < 1
    try:
        _, reference = run_local(spanning("local", tmp_path / "local"), tmp_path / "local")
    finally:
        torch.set_num_threads(threads)

    monkeypatch.setattr(ray_backend, "RayPopulation", KillingSecondRank)  # what run.start builds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run.start(config_from_dict(spanning("ray", tmp_path / "gang", gpus_per_member=2)))

    state = last_controller_state(tmp_path / "gang")
    assert len(KillingSecondRank.killed) == 1
    restarts = [(e["generation"], e["slot"]) for e in state["lineage"]["events"] if e["kind"] == "restart"]
    assert restarts == [(2, 1)]  # the whole member was rebuilt from checkpoint 1 and its calls replayed
    assert_same_run(state, json.loads(json.dumps(reference)), rel=1e-5)
    # rank 0 wrote each checkpoint's members and the best adapter as PEFT folders that load
    members = sorted((tmp_path / "gang" / "checkpoints").glob("generation_*/members/slot_*/actor"))
    assert len(members) == 3 * 3
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "gang" / "base_model")
    model = PeftModel.from_pretrained(base, result.best_adapter)
    assert any(p.abs().max() > 0 for name, p in model.named_parameters() if "lora_B" in name)  # trained


def test_a_member_larger_than_every_node_is_refused(ray_session, tmp_path):
    config = config_from_dict(spanning("ray", tmp_path / "big", gpus_per_member=2))
    config.population.num_gpus = 1.0  # the local cluster has no GPU
    with pytest.raises(ConfigError, match=r"population.gpus_per_member: 2 processes .* need 2 GPUs on one node; "
                                          r"the largest node of the Ray cluster has 0"):
        run.start(config)
    assert not (tmp_path / "big" / "checkpoints").exists()
