"""A wider search space in a population: LoRA rank and alpha, the schedule and weight decay mutate
(PBT's explore: perturbed or resampled), members of different ranks clone into each other on one
base model, step together, and resume from a checkpoint at their own ranks."""
import warnings

import pytest
import torch

from evo_sft import build
from evo_sft.config import config_from_dict
from evo_sft.io.checkpoint import checkpoint_dirs
from evo_sft.population.local import LocalPopulation
from tests.helpers.evolution_run import assert_same_run, experiment, make_controller, pieces, run_local

SEARCH_SPACE = {
    "lr": {"min": 1.0e-4, "max": 3.0e-2},
    "lora_r": {"choices": [2, 4, 8]},
    "lora_alpha": {"min": 4.0, "max": 16.0},
    "scheduler": {"choices": ["constant", "cosine", "linear"]},
    "warmup_steps": {"min": 0, "max": 6, "multiple_of": 2},
    "weight_decay": {"min": 0.0, "max": 0.1},
}


def wide(config: dict) -> dict:
    """The tiny experiment with the wide search space; its seed makes the run change ranks and alphas."""
    config["seed"] = 5
    config["evolution"]["hyperparameters"] = SEARCH_SPACE
    config["evolution"]["mutation"] = {"no_mutation": 0.0, "rl_hp": 1.0,
                                       "explore": {"perturb_factors": [0.8, 1.2], "resample_probability": 0.5}}
    return config


def mutated(state: dict) -> set[str]:
    return {event["mutation"] for event in state["lineage"]["events"]}


def test_a_wide_search_stepped_together_decides_as_members_on_their_own(tmp_path):
    _, alone = run_local(wide(experiment("local", tmp_path / "alone", members_per_actor=1, step_together=True)),
                         tmp_path)
    together_population, together = run_local(
        wide(experiment("local", tmp_path / "together", members_per_actor=3, step_together=True)), tmp_path)
    assert together_population.hosts[0].base.together_blocker is None
    assert_same_run(together, alone, rel=1e-5)
    assert {"lora_r", "lora_alpha"} <= mutated(together)  # the run did change ranks and alphas
    ranks = {host.hyperparameters()["lora_r"] for host in together_population.hosts}
    for host in together_population.hosts:  # each member's tensors have its own rank
        for name, p in host.agent.trainable_parameters().items():
            assert p.shape[0 if ".lora_A." in name else 1] == host.hyperparameters()["lora_r"]
    assert len(ranks) > 1 and ranks <= {2, 4, 8}


@pytest.mark.parametrize("members_per_actor", [1, 3])
def test_members_of_mutated_ranks_resume_from_a_checkpoint_at_their_ranks(tmp_path, members_per_actor):
    config = config_from_dict(wide(experiment("local", tmp_path / "run", members_per_actor=members_per_actor,
                                              step_together=True)))
    model_path, prepared, founders = pieces(config, tmp_path)
    population = LocalPopulation(build.local_hosts(config, model_path, prepared, founders))
    controller = make_controller(config, population, config.resolved_run_dir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controller.run(3)
    assert "lora_r" in {e["mutation"] for e in controller.lineage.to_dict()["events"]}

    resumed = LocalPopulation(build.local_hosts(config, model_path, prepared, founders))  # founders: rank 4
    resumed.load(checkpoint_dirs(config.resolved_run_dir())[0] / "members")
    assert resumed.hyperparameters() == population.hyperparameters()
    for got, want in zip(resumed.hosts, population.hosts):
        got_params = {n: p.detach().clone() for n, p in got.agent.trainable_parameters().items()}
        want_params = {n: p.detach().clone() for n, p in want.agent.trainable_parameters().items()}
        assert got_params.keys() == want_params.keys()
        for name, tensor in want_params.items():
            assert torch.equal(got_params[name], tensor), name
        assert [g["lr"] for g in got.agent.optimizer.param_groups] == [g["lr"] for g in want.agent.optimizer.param_groups]
        assert got.agent.lr_scheduler.last_epoch == want.agent.lr_scheduler.last_epoch
    # and they go on training alike
    for got, want in zip(resumed.train(1), population.train(1)):
        assert got.train_loss == pytest.approx(want.train_loss, rel=1e-6)
