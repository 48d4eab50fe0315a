"""Members on one base model stepped together (one forward and backward for all of their
micro-batches) train as they would alone: same losses, weights and optimizer state as members
on agents of their own trained with padded batches, and the same evolution decisions."""
import warnings

import pytest
import torch
import torch._dynamo

from evo_sft import build
from evo_sft.config import config_from_dict
from evo_sft.population.local import LocalPopulation
from evo_sft.sft import step
from tests.helpers.evolution_run import assert_same_run, experiment, pieces, run_local
from tests.helpers.torch_setup import reset_dynamo

# Per slot: the batch size (micro-batches of 4 rows, so slots 1 and 2 need two rounds, slot 2's
# second one short) and the learning rate.
HYPERPARAMETERS = {0: {"batch_size": 4, "lr": 3e-3}, 1: {"batch_size": 8, "lr": 1e-3}, 2: {"batch_size": 6, "lr": 2e-2}}


def hosts_of(tmp_path, config_dict: dict) -> list:
    config = config_from_dict(config_dict)
    model_path, prepared, founders = pieces(config, tmp_path)
    hosts = build.local_hosts(config, model_path, prepared, founders)
    for slot, hyperparameters in HYPERPARAMETERS.items():
        hosts[slot].set_hyperparameters(hyperparameters)
    return hosts


def count_decoder_forwards(hosts) -> list[int]:
    calls = [0]
    for agent in {id(host.agent): host.agent for host in hosts}.values():
        step.decoder_and_head(agent)[0].register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("gradient_checkpointing, compile_layers", [(False, False), (True, False), (True, True)])
def test_members_stepped_together_train_as_members_alone_with_padded_batches(tmp_path, gradient_checkpointing,
                                                                            compile_layers):
    together_config = experiment("local", tmp_path / "together", members_per_actor=3, step_together=True)
    alone_config = experiment("local", tmp_path / "alone", members_per_actor=1, step_together=True)
    for config in (together_config, alone_config):
        config["agent"]["gradient_checkpointing"] = gradient_checkpointing
    together_config["agent"]["compile_layers"] = compile_layers
    reset_dynamo()
    alone_config["agent"]["packing"] = False  # the reference: padded batches, PEFT's own LoRA forward
    together, alone = hosts_of(tmp_path, together_config), hosts_of(tmp_path, alone_config)
    assert together[0].base.together_blocker is None
    assert not alone[0].agent.packing
    forwards = count_decoder_forwards(together)
    steps = 3

    together_results = LocalPopulation(together).train(steps)
    alone_results = LocalPopulation(alone).train(steps)

    assert forwards[0] == 2 * steps  # every member's i-th micro-batch in one forward: two rounds per step
    if compile_layers:  # each decoder layer ran as one compiled graph, stacked adapters included
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
        assert not torch._dynamo.utils.counters["graph_break"]
    for slot, (got, want) in enumerate(zip(together_results, alone_results)):
        assert got.tokens == want.tokens > 0
        assert got.train_loss == pytest.approx(want.train_loss, rel=1e-5)
        assert got.optimizer_step == want.optimizer_step == steps
        got_agent, want_agent = together[slot], alone[slot]
        got_agent.base.make_live(slot)
        got_params, want_params = got_agent.agent.trainable_parameters(), want_agent.agent.trainable_parameters()
        assert got_params.keys() == want_params.keys()
        for name, want_param in want_params.items():
            torch.testing.assert_close(got_params[name].detach(), want_param.detach(), rtol=1e-4, atol=1e-6)
            got_moments = got_agent.agent.optimizer.state[got_params[name]]
            want_moments = want_agent.agent.optimizer.state[want_param]
            torch.testing.assert_close(got_moments["exp_avg_sq"], want_moments["exp_avg_sq"], rtol=1e-3, atol=1e-12)
        assert got_agent.agent.lr == HYPERPARAMETERS[slot]["lr"]
    # members with different learning rates and data did not train alike
    assert len({round(r.train_loss, 6) for r in together_results}) == 3


def test_an_evolution_stepped_together_decides_as_members_on_their_own(tmp_path):
    """Selection, clones (on the device) and mutated batch sizes between generations: the run
    with three members stepped together decides as the run with one agent per member."""
    _, together = run_local(experiment("local", tmp_path / "together", members_per_actor=3, step_together=True),
                            tmp_path)
    _, alone = run_local(experiment("local", tmp_path / "alone", members_per_actor=1, step_together=True), tmp_path)
    assert_same_run(together, alone, rel=1e-5)


@pytest.mark.parametrize("change, reason", [
    (lambda c: c["lora"].update(lora_dropout=0.1), "lora.lora_dropout > 0"),
    (lambda c: c["lora"].update(target_modules=["q_proj", "lm_head"]), "the output head is trained"),
    (lambda c: c["agent"].update(packing=False), "packed batches are off"),
    (lambda c: c["population"].update(step_together=False), "population.step_together is off"),
])
def test_members_that_cannot_step_together_say_why_and_train_one_after_another(tmp_path, change, reason):
    config_dict = experiment("local", tmp_path / "run", members_per_actor=3, step_together=True)
    change(config_dict)
    config = config_from_dict(config_dict)
    model_path, prepared, founders = pieces(config, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hosts = build.local_hosts(config, model_path, prepared, founders)
    assert reason in hosts[0].base.together_blocker
    if "step_together" not in reason:  # the user asked for it and does not get it: say so
        assert any(reason in str(w.message) and "one after another" in str(w.message) for w in caught)
    forwards = count_decoder_forwards(hosts)
    LocalPopulation(hosts).train(1)
    assert forwards[0] == 3


def test_a_member_gone_nan_does_not_reach_the_members_stepped_with_it(tmp_path):
    """Member 1's adapter holds a NaN: stepped together, the NaN would reach the others through
    the stacked matmuls (0 * NaN), so the step is redone member by member. The others train
    exactly as alone; member 1 reports a non-finite loss."""
    together_config = experiment("local", tmp_path / "together", members_per_actor=3, step_together=True)
    alone_config = experiment("local", tmp_path / "alone", members_per_actor=1, step_together=True)
    together, alone = hosts_of(tmp_path, together_config), hosts_of(tmp_path, alone_config)
    for hosts in (together, alone):
        if hasattr(hosts[1], "base"):
            hosts[1].base.make_live(1)
        with torch.no_grad():
            next(iter(hosts[1].agent.trainable_parameters().values()))[0, 0] = float("nan")

    together_results = LocalPopulation(together).train(2)
    alone_results = LocalPopulation(alone).train(2)

    assert not together_results[1].finite and not alone_results[1].finite
    for slot in (0, 2):
        assert together_results[slot].train_loss == pytest.approx(alone_results[slot].train_loss, rel=1e-5)
        together[slot].base.make_live(slot)
        for name, want in alone[slot].agent.trainable_parameters().items():
            got = together[slot].agent.trainable_parameters()[name]
            assert torch.isfinite(got).all(), name
            torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-4, atol=1e-6)


def test_members_of_mixed_ranks_and_alphas_stepped_together_train_as_members_alone(tmp_path):
    """Ranks and alphas mutate between steps (a grown rank, a shrunk one with another alpha, one
    unchanged): the stacked adapters give each member its own rows of A and its own scaling, and
    every member trains exactly as on an agent of its own with PEFT's LoRA forward."""
    together_config = experiment("local", tmp_path / "together", members_per_actor=3, step_together=True)
    alone_config = experiment("local", tmp_path / "alone", members_per_actor=1, step_together=True)
    alone_config["agent"]["packing"] = False
    together, alone = hosts_of(tmp_path, together_config), hosts_of(tmp_path, alone_config)
    forwards = count_decoder_forwards(together)
    changes = {1: {"lora_r": 8}, 2: {"lora_r": 2, "lora_alpha": 5.0}}
    results = []
    for hosts in (together, alone):
        population = LocalPopulation(hosts)
        population.train(2)
        population.set_hyperparameters(changes)
        results.append(population.train(2))
    assert forwards[0] == 2 * 4  # all four steps stepped together, two rounds each

    for slot, (got, want) in enumerate(zip(*results)):
        assert got.tokens == want.tokens > 0
        assert got.train_loss == pytest.approx(want.train_loss, rel=1e-5)
        together[slot].base.make_live(slot)
        got_agent, want_agent = together[slot].agent, alone[slot].agent
        assert (got_agent.lora_r, got_agent.lora_alpha) == (want_agent.lora_r, want_agent.lora_alpha) == \
            (changes.get(slot, {}).get("lora_r", 4), changes.get(slot, {}).get("lora_alpha", 8.0))
        want_params = want_agent.trainable_parameters()
        for name, got_param in got_agent.trainable_parameters().items():
            assert got_param.shape[0 if ".lora_A." in name else 1] == got_agent.lora_r
            torch.testing.assert_close(got_param.detach(), want_params[name].detach(), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got_agent.optimizer.state[got_param]["exp_avg"],
                                       want_agent.optimizer.state[want_params[name]]["exp_avg"], rtol=1e-3, atol=1e-9)
