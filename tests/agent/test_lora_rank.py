"""LoRA rank, alpha and dropout as hyperparameters of one agent: a mutation keeps the member's
function (grown rank: padded; shrunk rank: truncated SVD; another alpha: B rescaled), the optimizer
follows, and clones and checkpoints carry the member's own rank. References are computed here by
hand: padded tensors, AdamW's arithmetic, torch.linalg.svd of the whole dW."""
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.testing import assert_close

from evo_sft import SFT
from tests.agent.conftest import LORA_TARGETS

BETAS, EPS = (0.9, 0.999), 1e-8


def lora(r: int, alpha: float, rslora: bool = False) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0, use_rslora=rslora)


@pytest.fixture
def trained(make_agent, uneven_batch):
    """`trained(lora_config, steps=3)`: an agent whose adapter (B non-zero) and Adam moments are
    non-trivial after `steps` optimizer steps on the uneven batch."""

    def make(lora_config=None, steps: int = 3, **kwargs):
        agent = make_agent(lr=1e-2, **({"lora_config": lora_config} if lora_config else {}), **kwargs)
        for _ in range(steps):
            agent.learn(uneven_batch)
        return agent

    return make


def layers(agent: SFT) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (A, B)} of the actor adapter, copied."""
    params = agent.trainable_parameters()
    return {name[: -len(".lora_A.actor.weight")]: (p.detach().clone(), params[name.replace("lora_A", "lora_B")].detach().clone())
            for name, p in params.items() if ".lora_A." in name}


def delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return scaling * (b.double() @ a.double())


def moments(agent: SFT) -> dict[str, dict]:
    params = agent.trainable_parameters()
    return {name: {k: v.clone() for k, v in agent.optimizer.state[p].items()} for name, p in params.items()
            if p in agent.optimizer.state}


def scalings(agent: SFT) -> set[float]:
    return {module.scaling["actor"] for module in agent.actor.modules() if "actor" in getattr(module, "lora_A", {})}


# ----------------------------------------------------------------------- growing the rank
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_a_grown_rank_keeps_the_logits_and_its_next_step_is_adamw_on_the_padded_tensors(
        rslora, trained, uneven_batch, uneven_rows, tokenizer, make_model, reference, logits_of, probe_ids):
    agent = trained(lora(4, 8, rslora))
    old_layers, old_moments, old_scaling = layers(agent), moments(agent), 8 / (math.sqrt(4) if rslora else 4)
    new_scaling = 8 / (math.sqrt(8) if rslora else 8)
    before = logits_of(agent, probe_ids)

    agent.set_hyperparameters(lora_r=8)

    assert_close(logits_of(agent, probe_ids), before, atol=1e-6, rtol=0)
    assert agent.lora_r == 8 and scalings(agent) == {new_scaling}
    config = agent.actor.peft_config["actor"]
    assert (config.r, config.lora_alpha, agent.lora_config.r) == (8, 8, 8)
    # the padded tensors, by hand: old rows of A kept, B in its new units with zero columns
    factor = old_scaling / new_scaling
    padded = {}
    for name, (a, b) in layers(agent).items():
        old_a, old_b = old_layers[name]
        assert a.shape == (8, old_a.shape[1]) and b.shape == (old_b.shape[0], 8)
        assert torch.equal(a[:4], old_a)
        bound = 1 / math.sqrt(a.shape[1])  # kaiming-uniform with a=sqrt(5), as PEFT draws A
        assert (a[4:].abs() <= bound).all() and a[4:].abs().max() > bound / 4
        assert_close(b, torch.cat([old_b * factor, torch.zeros(old_b.shape[0], 4)], dim=1), atol=1e-7, rtol=0)
        padded[f"{name}.lora_A.actor.weight"] = a
        padded[f"{name}.lora_B.actor.weight"] = b
    hand_moments = {}
    for name, state in old_moments.items():
        dim, scale = (0, 1.0) if ".lora_A." in name else (1, factor)
        pad = lambda t: torch.cat([t, torch.zeros_like(t)], dim=dim)  # noqa: E731 (rank 4 -> 8)
        hand_moments[name] = {"step": state["step"].item(), "exp_avg": pad(state["exp_avg"] / scale),
                              "exp_avg_sq": pad(state["exp_avg_sq"] / scale ** 2)}

    # the gradient of the padded adapter, on a PEFT model of rank 8 built here, from the hand loss
    model = get_peft_model(make_model(0), lora(8, 8, rslora), adapter_name="actor")
    model.load_state_dict(padded, strict=False)
    grads = reference.step_grads(model, tokenizer, [uneven_rows])
    agent.learn(uneven_batch)

    lr, weight_decay = agent.lr, agent.weight_decay
    for name, param in agent.trainable_parameters().items():
        state = hand_moments[name]
        step = state["step"] + 1
        p = padded[name] * (1 - lr * weight_decay)
        exp_avg = BETAS[0] * state["exp_avg"] + (1 - BETAS[0]) * grads[name]
        exp_avg_sq = BETAS[1] * state["exp_avg_sq"] + (1 - BETAS[1]) * grads[name] ** 2
        denominator = (exp_avg_sq / (1 - BETAS[1] ** step)).sqrt() + EPS
        expected = p - lr * (exp_avg / (1 - BETAS[0] ** step)) / denominator
        assert_close(param.detach(), expected, atol=1e-6, rtol=1e-5, msg=name)


def test_growth_draws_from_the_generator_it_is_given(make_agent):
    """The new rows of A come from torch's current generator (a member's own, see MemberHost):
    the same seed, the same rows; another seed, other rows."""
    rows = []
    for seed in (1, 1, 2):
        agent = make_agent()
        torch.manual_seed(seed)
        agent.set_hyperparameters(lora_r=6)
        rows.append(torch.cat([a[4:] for a, _ in layers(agent).values()]))
    assert torch.equal(rows[0], rows[1]) and not torch.equal(rows[0], rows[2])


# ----------------------------------------------------------------------- shrinking the rank
def test_a_shrunk_rank_keeps_the_truncated_svd_of_dw_and_resets_the_moments(trained, uneven_batch):
    agent = trained(lora(8, 16), steps=4)
    old = {name: delta(a, b, 16 / 8) for name, (a, b) in layers(agent).items()}
    assert all(torch.linalg.matrix_rank(d) > 3 for d in old.values())  # a real truncation

    agent.set_hyperparameters(lora_r=3)

    assert agent.lora_r == 3 and scalings(agent) == {16 / 3}
    for name, (a, b) in layers(agent).items():
        u, s, vh = torch.linalg.svd(old[name], full_matrices=False)
        truncated = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        assert_close(delta(a, b, 16 / 3), truncated, atol=1e-6, rtol=1e-5)
        # split evenly: B^T B = A A^T = diag(s / scaling), both sides hold sqrt of the singular values
        expected = torch.diag(s[:3] / (16 / 3))
        assert_close(b.double().T @ b.double(), expected, atol=1e-6, rtol=1e-5)
        assert_close(a.double() @ a.double().T, expected, atol=1e-6, rtol=1e-5)
    assert moments(agent) == {}
    agent.learn(uneven_batch)  # Adam starts again on the new tensors
    assert {state["step"].item() for state in moments(agent).values()} == {1.0}


def test_a_shrunk_adapter_that_has_not_trained_is_a_fresh_one_that_learns(make_agent, uneven_batch, logits_of,
                                                                         probe_ids):
    """B = 0: dW = 0 has no direction to keep; the rank-2 adapter gets fresh A rows and zero B, like
    PEFT's, and every one of its rank components trains (none is a dead zero row and column)."""
    agent = make_agent()
    before = logits_of(agent, probe_ids)
    agent.set_hyperparameters(lora_r=2)
    assert torch.equal(logits_of(agent, probe_ids), before)
    for a, b in layers(agent).values():
        assert a.shape[0] == 2 and (a.abs().sum(dim=1) > 0).all() and (b == 0).all()
    agent.learn(uneven_batch)
    for a, b in layers(agent).values():
        assert (b.abs().sum(dim=0) > 0).all()


def test_the_same_rank_changes_nothing_and_a_shrink_to_the_rank_of_dw_keeps_it(
        trained, logits_of, probe_ids, snapshot, assert_same):
    agent = trained(lora(4, 8))
    params, optimizer, before = snapshot.params(agent), snapshot.optimizer(agent), logits_of(agent, probe_ids)
    agent.set_hyperparameters(lora_r=4, lora_alpha=8.0, lora_dropout=0.0)
    assert_same(snapshot.params(agent), params)
    assert_same(snapshot.optimizer(agent), optimizer)
    assert torch.equal(logits_of(agent, probe_ids), before)

    agent.set_hyperparameters(lora_r=8)  # dW keeps rank <= 4 (the new columns of B are zero) ...
    agent.set_hyperparameters(lora_r=4)  # ... so its rank-4 approximation is dW itself
    assert_close(logits_of(agent, probe_ids), before, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------- alpha and dropout
def test_a_mutated_alpha_keeps_the_function_and_rescales_b_and_its_moments(trained, logits_of, probe_ids):
    """Documented choice: alpha does not change what the member computes; B is rescaled so that
    s' B' A = s B A, and B's moments follow its new units (Adam's step on B is unchanged, so dW
    moves s'/s as fast)."""
    agent = trained(lora(4, 8))
    old_layers, old_moments, before = layers(agent), moments(agent), logits_of(agent, probe_ids)
    agent.set_hyperparameters(lora_alpha=32.0)
    assert_close(logits_of(agent, probe_ids), before, atol=1e-6, rtol=0)
    assert scalings(agent) == {8.0} and agent.actor.peft_config["actor"].lora_alpha == 32.0
    new_moments = moments(agent)
    for name, (a, b) in layers(agent).items():
        assert torch.equal(a, old_layers[name][0])
        assert_close(b, old_layers[name][1] / 4, atol=1e-8, rtol=0)
        b_name = f"{name}.lora_B.actor.weight"
        assert_close(new_moments[b_name]["exp_avg"], old_moments[b_name]["exp_avg"] * 4, atol=1e-9, rtol=1e-6)
        assert_close(new_moments[b_name]["exp_avg_sq"], old_moments[b_name]["exp_avg_sq"] * 16, atol=1e-12, rtol=1e-6)


def test_a_mutated_dropout_reaches_every_lora_layer(make_agent):
    agent = make_agent()
    agent.set_hyperparameters(lora_dropout=0.25)
    dropouts = [module.lora_dropout["actor"] for module in agent.actor.modules() if "actor" in getattr(module, "lora_A", {})]
    assert dropouts and all(isinstance(d, torch.nn.Dropout) and d.p == 0.25 for d in dropouts)
    agent.set_hyperparameters(lora_dropout=0.0)
    assert all(isinstance(module.lora_dropout["actor"], torch.nn.Identity)
               for module in agent.actor.modules() if "actor" in getattr(module, "lora_A", {}))


def test_lora_settings_are_refused_without_lora(make_agent):
    agent = make_agent(lora_config=None)
    assert "lora_r" not in agent.hyperparameters
    with pytest.raises(ValueError, match="lora_r applies to LoRA agents"):
        agent.set_hyperparameters(lora_r=8)
    with pytest.raises(ValueError, match="lora_r must be >= 1, got 0"):
        make_agent().set_hyperparameters(lora_r=0)


# ----------------------------------------------------------------------- clones and checkpoints
def test_a_clone_takes_the_donors_rank(trained, make_agent, uneven_batch, logits_of, probe_ids, snapshot, assert_same):
    donor = trained(lora(4, 8))
    donor.set_hyperparameters(lora_r=8, lora_alpha=12.0)
    receiver = make_agent()
    receiver.import_state(*donor.export_state())
    assert (receiver.lora_r, receiver.lora_alpha) == (8, 12.0) and scalings(receiver) == {1.5}
    assert receiver.actor.peft_config["actor"].r == 8
    assert torch.equal(logits_of(receiver, probe_ids), logits_of(donor, probe_ids))
    donor.learn(uneven_batch)
    receiver.learn(uneven_batch)
    assert_same(snapshot.params(receiver), snapshot.params(donor))
    assert_same(snapshot.optimizer(receiver), snapshot.optimizer(donor))
    smaller = make_agent()  # and back to rank 4 from a donor of that rank
    donor.import_state(*smaller.export_state())
    assert (donor.lora_r, donor.lora_alpha, scalings(donor)) == (4, 8.0, {2.0})
    assert torch.equal(logits_of(donor, probe_ids), logits_of(smaller, probe_ids))


def test_a_checkpoint_of_another_rank_is_loaded_at_its_rank(trained, make_agent, make_model, uneven_batch, tmp_path,
                                                          logits_of, probe_ids, snapshot, assert_same):
    agent = trained(lora(4, 8))
    agent.set_hyperparameters(lora_r=6, lora_alpha=10.0)
    path = tmp_path / "ckpt"
    agent.save_checkpoint(path)
    config = json.loads((path / "actor" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (6, 10.0)
    peft_model = PeftModel.from_pretrained(make_model(0), path / "actor")
    assert_close(logits_of(peft_model, probe_ids), logits_of(agent, probe_ids), atol=1e-6, rtol=0)

    loaded = make_agent()  # rank 4
    loaded.load_checkpoint(path, load_optimizer=True)
    assert (loaded.lora_r, loaded.lora_alpha, loaded.actor.peft_config["actor"].r) == (6, 10.0, 6)
    assert scalings(loaded) == {10 / 6}
    assert torch.equal(logits_of(loaded, probe_ids), logits_of(agent, probe_ids))
    assert_same(snapshot.optimizer(loaded), snapshot.optimizer(agent))
    loaded.learn(uneven_batch)
    agent.learn(uneven_batch)
    assert_same(snapshot.params(loaded), snapshot.params(agent))
