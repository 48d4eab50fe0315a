"""The SFT agent: loss and fitness against hand computations, gradient accumulation,
gradient checkpointing, learning-rate mutation, clones, adapters and the rest of the API."""
import copy
import math
import warnings

import pytest
import torch
from torch.testing import assert_close

from evo_sft import SFT, LRSchedule
from evo_sft.data import IGNORE_INDEX
from evo_sft.data.demo import build_tokenizer, demo_dataset

GRAD_TOL = dict(atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------- loss and fitness
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_loss_equals_hand_computation(chat, lora, make_agent, make_gym, uneven_dataset, uneven_rows, reference,
                                      snapshot):
    tok = build_tokenizer(chat_template=chat)
    agent = make_agent(**({} if lora else {"lora_config": None}))
    if lora:  # make the adapter non-trivial (lora_B starts at zero)
        with torch.no_grad():
            for name, p in agent.trainable_parameters().items():
                p.add_(0.05 * torch.randn_like(p))
    (batch,) = make_gym(uneven_dataset, tokenizer_=tok).test_batches(batch_size=4)
    before = snapshot.params(agent)
    result = agent.learn(batch, training=False)
    with torch.no_grad():
        expected = reference.token_mean_loss(agent.actor, tok, *uneven_rows)
    assert result["mean_loss"] == pytest.approx(float(expected), rel=1e-6)
    assert result["mean_perplexity"] == pytest.approx(math.exp(float(expected)), rel=1e-6)
    assert_close(snapshot.params(agent), before, atol=0, rtol=0)  # training=False changes nothing


def test_fitness_is_token_weighted_mean_over_the_whole_test_set(make_agent, make_gym, tokenizer, reference):
    test = demo_dataset(7, seed=1)
    gym = make_gym(demo_dataset(8, seed=0), test, data_batch_size_per_gpu=4)
    agent = make_agent()
    agent.learn(gym.reset())
    agent.learn(gym.step())
    with torch.no_grad():
        expected = -float(reference.token_mean_loss(agent.actor, tokenizer, test["prompt"], test["response"]))
    values = [agent.test(gym, batch_size=bs) for bs in (1, 2, 3, 7, 100)]
    gym.step()  # the training stream does not move the test set
    values += [agent.test(gym), agent.test(gym, loop=3, batch_size=2)]
    for value in values:
        assert value == pytest.approx(expected, rel=1e-6)
    assert agent.fitness[-len(values):] == values


# ----------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("max_grad_norm", [1e6, 0.01], ids=["no-clip", "clip"])
def test_accumulation_gives_the_token_mean_gradient_of_the_whole_step(
        max_grad_norm, make_agent, uneven_batch, uneven_rows, tokenizer, reference, snapshot):
    prompts, responses = uneven_rows
    agents = {micro: make_agent(micro_batch_size_per_gpu=micro, max_grad_norm=max_grad_norm) for micro in (4, 2, 1)}
    initial = agents[4].actor
    assert_close(snapshot.params(agents[1]), snapshot.params(agents[4]), atol=0, rtol=0)

    token_mean = reference.step_grads(initial, tokenizer, [(prompts, responses)])
    mean_of_means = reference.step_grads(initial, tokenizer, [(prompts[:2], responses[:2]),
                                                              (prompts[2:], responses[2:])])
    # the rows are uneven enough that the wrong normalisation gives a visibly different gradient
    difference = max(float((token_mean[n] - mean_of_means[n]).abs().max()) for n in token_mean)
    assert difference > 1e-3

    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in token_mean.values()))
    expected = {n: g * min(1.0, max_grad_norm / (float(norm) + 1e-6)) for n, g in token_mean.items()}
    if max_grad_norm < 1:
        assert float(norm) > 10 * max_grad_norm  # clipping is active

    for micro, agent in agents.items():
        agent.learn(uneven_batch)
        assert_close(snapshot.grads(agent), expected, **GRAD_TOL, msg=lambda m: f"micro={micro}: {m}")
    assert_close(snapshot.params(agents[2]), snapshot.params(agents[4]), **GRAD_TOL)
    assert_close(snapshot.params(agents[1]), snapshot.params(agents[4]), **GRAD_TOL)


def test_micro_batch_without_supervised_tokens_gives_finite_correct_gradient(
        make_agent, uneven_batch, uneven_rows, tokenizer, reference, snapshot):
    prompts, responses = uneven_rows
    batch = {k: v.clone() for k, v in uneven_batch.items()}
    batch["labels"][1] = IGNORE_INDEX  # row 1 (its own micro-batch below) has nothing to learn
    agent_full, agent_micro = make_agent(), make_agent(micro_batch_size_per_gpu=1)
    kept = (0, 2, 3)
    expected = reference.step_grads(agent_full.actor, tokenizer,
                                    [([prompts[i] for i in kept], [responses[i] for i in kept])])
    for agent in (agent_full, agent_micro):
        result = agent.learn(batch)
        assert math.isfinite(result["mean_loss"])
        assert_close(snapshot.grads(agent), expected, **GRAD_TOL)
        assert all(torch.isfinite(p).all() for p in agent.trainable_parameters().values())


def test_step_without_supervised_tokens_is_skipped_not_nan(make_agent, uneven_batch, snapshot):
    agent = make_agent(batch_size=2, micro_batch_size_per_gpu=1)
    batch = {k: v.clone() for k, v in uneven_batch.items()}
    batch["labels"][:2] = IGNORE_INDEX  # the first optimizer step (rows 0-1) has no label at all
    only_second = {k: v[2:] for k, v in batch.items()}
    reference_agent = make_agent(batch_size=2, micro_batch_size_per_gpu=1)
    expected = reference_agent.learn(only_second)
    with pytest.warns(UserWarning, match="no supervised tokens"):
        result = agent.learn(batch)
    assert result["mean_loss"] == pytest.approx(expected["mean_loss"], rel=1e-6)
    assert agent.optimizer_steps == 1
    assert_close(snapshot.params(agent), snapshot.params(reference_agent), atol=1e-7, rtol=0)


# ----------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_with_lora_trains_and_matches(make_agent, uneven_batch, snapshot):
    plain, checkpointed = make_agent(), make_agent(gradient_checkpointing=True)
    base = checkpointed.actor.get_base_model()
    assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in plain.actor.modules())
    assert not base.get_input_embeddings().weight.requires_grad  # the frozen-embedding case
    assert_close(snapshot.params(checkpointed), snapshot.params(plain), atol=0, rtol=0)

    result_plain = plain.learn(uneven_batch)
    result_ckpt = checkpointed.learn(uneven_batch)
    assert result_ckpt["mean_loss"] == pytest.approx(result_plain["mean_loss"], rel=1e-6)
    grads = snapshot.grads(checkpointed)
    assert_close(grads, snapshot.grads(plain), **GRAD_TOL)
    lora_b = [g for name, g in grads.items() if "lora_B" in name]
    assert lora_b and all(g.abs().sum() > 0 for g in lora_b)

    for _ in range(5):
        checkpointed.learn(uneven_batch)
    grads = snapshot.grads(checkpointed)
    assert all(g.abs().sum() > 0 for g in grads.values()), "every LoRA matrix gets a gradient"
    assert checkpointed.learn(uneven_batch, training=False)["mean_loss"] < result_ckpt["mean_loss"]


# ----------------------------------------------------------------------- learning
@pytest.mark.parametrize("lora,lr,margin", [(True, 3e-2, 0.15), (False, 3e-3, 1.0)], ids=["lora", "full"])
def test_learning_reduces_test_loss_on_the_demo_task(lora, lr, margin, make_agent, make_gym):
    # (A random-init base with LoRA on attention only learns slowly; full fine-tuning learns fast.)
    gym = make_gym(demo_dataset(64, seed=0), demo_dataset(16, seed=1), data_batch_size_per_gpu=8)
    agent = make_agent(lr=lr, batch_size=8, max_grad_norm=1.0, **({} if lora else {"lora_config": None}))
    before = agent.test(gym)
    batch = gym.reset()
    for _ in range(40):
        agent.learn(batch)
        batch = gym.step()
    after = agent.test(gym)
    assert after > before + margin, (before, after)
    assert gym.num_epochs == 5


# ----------------------------------------------------------------------- learning-rate mutation
def schedule_factor(step, total, warmup, min_ratio):
    """Warm-up + cosine, written out independently of LRSchedule."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def assert_lr(agent, base_lr, factor=1.0):
    for group in agent.optimizer.param_groups:
        assert group["lr"] == pytest.approx(base_lr * factor, rel=1e-12)
    assert agent.lr_scheduler.base_lrs == pytest.approx([base_lr] * len(agent.optimizer.param_groups), rel=1e-12)
    assert agent.lr_scheduler.get_last_lr() == pytest.approx([base_lr * factor], rel=1e-12)
    assert agent.lr == base_lr


def test_mutated_lr_is_held_by_optimizer_and_scheduler(make_agent, demo_gym):
    agent = make_agent(lr=1e-3)
    agent.learn(demo_gym.reset())
    agent.set_hyperparameters(lr=5e-3)
    assert_lr(agent, 5e-3)
    agent.learn(demo_gym.step())  # a scheduler step does not bring the old rate back
    assert_lr(agent, 5e-3)

    clone = agent.clone()
    assert_lr(clone, 5e-3)
    clone.update_lr(2e-3)
    assert_lr(clone, 2e-3)
    assert_lr(agent, 5e-3)

    other = make_agent(lr=1e-4)
    other.import_state(*agent.export_state())
    assert_lr(other, 5e-3)


def test_mutated_lr_with_schedule_keeps_the_schedule_position(make_agent, demo_gym):
    schedule = dict(total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    agent = make_agent(lr=1e-3, lr_schedule=LRSchedule(**schedule))
    assert_lr(agent, 1e-3, schedule_factor(0, **_args(schedule)))
    for _ in range(4):
        agent.learn(demo_gym.step())
    assert_lr(agent, 1e-3, schedule_factor(4, **_args(schedule)))
    agent.set_hyperparameters(lr=4e-3)
    assert_lr(agent, 4e-3, schedule_factor(4, **_args(schedule)))
    agent.learn(demo_gym.step())
    assert_lr(agent, 4e-3, schedule_factor(5, **_args(schedule)))

    clone = agent.clone()
    assert clone.lr_scheduler.last_epoch == 5
    assert_lr(clone, 4e-3, schedule_factor(5, **_args(schedule)))
    clone.update_lr(1e-2)
    assert_lr(clone, 1e-2, schedule_factor(5, **_args(schedule)))


def _args(schedule):
    return dict(total=schedule["total_steps"], warmup=schedule["warmup_steps"], min_ratio=schedule["min_lr_ratio"])


def reference_adamw_params(params_before, optimizer_state_before, grads, lr):
    """One torch.optim.AdamW step (the agent's defaults) on copies of the parameters."""
    names = list(params_before)
    copies = [params_before[n].clone().requires_grad_(True) for n in names]
    optimizer = torch.optim.AdamW(copies, lr=lr)
    for i, (name, p) in enumerate(zip(names, copies)):
        p.grad = grads[name].clone()
        optimizer.state[p] = copy.deepcopy(optimizer_state_before[i])
    optimizer.step()
    return {n: p.detach() for n, p in zip(names, copies)}


@pytest.mark.parametrize("scenario", ["mutate", "clone-then-mutate", "mutate-then-clone", "import-state", "schedule"])
def test_next_step_uses_the_mutated_lr(scenario, make_agent, demo_gym, snapshot):
    old_lr, new_lr = 1e-3, 1e-2
    schedule = LRSchedule(total_steps=10, warmup_steps=2) if scenario == "schedule" else None
    donor = make_agent(lr=old_lr, lr_schedule=schedule)
    for _ in range(3):  # the optimizer has moments and the schedule has moved
        donor.learn(demo_gym.step())
    if scenario in ("mutate", "schedule"):
        agent = donor
        agent.set_hyperparameters(lr=new_lr)
    elif scenario == "clone-then-mutate":
        agent = donor.clone()
        agent.set_hyperparameters(lr=new_lr)
    elif scenario == "mutate-then-clone":
        donor.set_hyperparameters(lr=new_lr)
        agent = donor.clone()
    else:
        donor.set_hyperparameters(lr=new_lr)
        agent = make_agent(lr=old_lr)
        agent.import_state(*donor.export_state())
    factor = schedule_factor(3, total=10, warmup=2, min_ratio=0.0) if schedule else 1.0

    params_before, state_before = snapshot.params(agent), snapshot.optimizer(agent)
    agent.learn(demo_gym.step())
    grads = snapshot.grads(agent)  # unclipped: max_grad_norm is huge
    after = snapshot.params(agent)
    expected = reference_adamw_params(params_before, state_before, grads, lr=new_lr * factor)
    assert_close(after, expected, atol=1e-7, rtol=1e-5)
    with_old_lr = reference_adamw_params(params_before, state_before, grads, lr=old_lr * factor)
    assert max(float((after[n] - with_old_lr[n]).abs().max()) for n in after) > 1e-5


# ----------------------------------------------------------------------- clones share nothing
def test_clone_shares_no_storage_with_donor(make_agent, demo_gym, snapshot, assert_same, logits_of, probe_ids):
    donor = make_agent()
    donor.learn(demo_gym.step())
    donor.fitness.append(-1.0)
    clone = donor.clone(index=7)
    assert clone.index == 7 and donor.index == 0
    assert_same(snapshot.params(clone), snapshot.params(donor))
    assert_same(snapshot.optimizer(clone), snapshot.optimizer(donor))
    assert torch.equal(logits_of(clone, probe_ids), logits_of(donor, probe_ids))
    assert clone.lr_scheduler.last_epoch == donor.lr_scheduler.last_epoch
    assert clone.fitness == [-1.0] and clone.fitness is not donor.fitness

    clone_params, clone_state, clone_logits = snapshot.params(clone), snapshot.optimizer(clone), logits_of(clone, probe_ids)
    donor.learn(demo_gym.step())
    donor.learn(demo_gym.step())
    donor.fitness.append(-2.0)
    assert_same(snapshot.params(clone), clone_params)
    assert_same(snapshot.optimizer(clone), clone_state)
    assert torch.equal(logits_of(clone, probe_ids), clone_logits)
    assert clone.fitness == [-1.0]
    assert not torch.equal(logits_of(donor, probe_ids), clone_logits)  # the donor did move

    donor_params, donor_state = snapshot.params(donor), snapshot.optimizer(donor)
    clone.learn(demo_gym.step())
    assert_same(snapshot.params(donor), donor_params)
    assert_same(snapshot.optimizer(donor), donor_state)


def test_exported_state_shares_no_storage(make_agent, demo_gym, snapshot, assert_same):
    donor = make_agent()
    donor.learn(demo_gym.step())
    tensors, meta = donor.export_state()
    exported = {k: v.clone() for k, v in tensors.items()}
    donor.learn(demo_gym.step())
    assert_same(tensors, exported)  # training the donor does not move what it exported

    receiver = make_agent(model_seed=0)
    receiver.import_state(tensors, meta)
    received_params, received_state = snapshot.params(receiver), snapshot.optimizer(receiver)
    donor.learn(demo_gym.step())
    assert_same(snapshot.params(receiver), received_params)
    assert_same(snapshot.optimizer(receiver), received_state)
    receiver.learn(demo_gym.step())
    assert_same(tensors, exported)  # nor does training the receiver


# ----------------------------------------------------------------------- the rest of the API
def test_select_adapter_restores_actor_and_reference_policy_copies(
        make_agent, make_model, demo_gym, logits_of, probe_ids):
    agent = make_agent(use_separate_reference_adapter=True)
    base_logits = logits_of(make_model(0), probe_ids)
    trainable = set(agent.trainable_parameters())
    assert trainable and not any(".reference." in n for n in trainable)
    for _ in range(2):
        agent.learn(demo_gym.step())
    actor_logits = logits_of(agent, probe_ids)
    assert not torch.allclose(actor_logits, base_logits, atol=1e-4)

    with agent.select_adapter("reference"):
        assert agent.actor.active_adapter == "reference"
        # the reference adapter still holds the initial actor (lora_B = 0): the base model
        assert_close(logits_of(agent, probe_ids), base_logits, atol=1e-6, rtol=0)
    assert agent.actor.active_adapter == "actor"
    assert torch.equal(logits_of(agent, probe_ids), actor_logits)
    with pytest.raises(RuntimeError, match="inside"):
        with agent.select_adapter("reference"):
            raise RuntimeError("inside")
    assert agent.actor.active_adapter == "actor"
    assert set(agent.trainable_parameters()) == trainable

    agent.set_reference_policy()
    params = dict(agent.actor.named_parameters())
    actor_lora = {n: p for n, p in params.items() if ".actor." in n}
    for name, p in actor_lora.items():
        reference = params[name.replace(".actor.", ".reference.")]
        assert torch.equal(reference, p) and reference.data_ptr() != p.data_ptr()
    with agent.select_adapter("reference"):
        assert torch.equal(logits_of(agent, probe_ids), actor_logits)
    agent.learn(demo_gym.step())  # training the actor leaves the copied reference alone
    with agent.select_adapter("reference"):
        assert torch.equal(logits_of(agent, probe_ids), actor_logits)
    assert agent.actor.active_adapter == "actor"


def test_population_gives_indexed_independent_agents(tokenizer, make_model, lora_config, demo_gym, logits_of, probe_ids):
    population = SFT.population(
        3, pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, actor_network=make_model(0),
        lora_config=lora_config, gradient_checkpointing=False, batch_size=4, lr=1e-3,
    )
    assert [agent.index for agent in population] == [0, 1, 2]
    pointers = [{p.data_ptr() for p in agent.actor.parameters()} for agent in population]
    assert not (pointers[0] & pointers[1]) and not (pointers[1] & pointers[2]) and not (pointers[0] & pointers[2])
    initial = [logits_of(agent, probe_ids) for agent in population]
    assert torch.equal(initial[0], initial[1])
    population[0].learn(demo_gym.step())
    assert not torch.equal(logits_of(population[0], probe_ids), initial[0])
    assert torch.equal(logits_of(population[1], probe_ids), initial[1])
    assert torch.equal(logits_of(population[2], probe_ids), initial[2])


def test_inspect_and_copy_attributes(make_agent):
    agent = make_agent(lr=2e-3, batch_size=3, micro_batch_size_per_gpu=1)
    agent.fitness.append(-1.5)
    attributes = agent.inspect_attributes()
    assert attributes["lr"] == 2e-3 and attributes["batch_size"] == 3
    assert attributes["micro_batch_size_per_gpu"] == 1 and attributes["fitness"] == [-1.5]
    attributes["fitness"].append(0.0)
    assert agent.fitness == [-1.5], "inspect_attributes returns copies"
    assert "fitness" not in agent.inspect_attributes(input_args_only=True)
    assert agent.evolvable_attributes() == agent.hyperparameters == {
        "lr": 2e-3, "batch_size": 3, "max_grad_norm": 1e6, "weight_decay": 0.01, "warmup_steps": 0,
        "scheduler": "constant", "lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0}

    other = make_agent(lr=1e-4, batch_size=8)
    result = agent.copy_attributes(agent, other)
    assert result is other
    assert other.lr == 2e-3 and other.batch_size == 3 and other.fitness == [-1.5]
    assert other.fitness is not agent.fitness


def test_liger_loss_on_cpu_warns_once_and_falls_back(make_agent, uneven_batch, snapshot):
    with pytest.warns(UserWarning, match="liger"):
        liger = make_agent(use_liger_loss=True)
    plain = make_agent()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = liger.learn(uneven_batch)
    assert not [w for w in caught if "liger" in str(w.message).lower()]
    assert result["mean_loss"] == pytest.approx(plain.learn(uneven_batch)["mean_loss"], rel=1e-6)
    assert_close(snapshot.params(liger), snapshot.params(plain), atol=1e-7, rtol=0)


def test_a_mutated_weight_decay_is_what_adamw_applies_after_clone_and_checkpoint(make_agent, tmp_path):
    """weight_decay is declared once (evo_sft.hyperparameters) and reaches AdamW's param groups on a
    live agent, in a clone and after a checkpoint. With zero gradients AdamW's step is the decay
    alone: p <- p * (1 - lr * weight_decay)."""
    agent = make_agent(lr=1e-2)
    assert {g["weight_decay"] for g in agent.optimizer.param_groups} == {0.01}
    agent.set_hyperparameters(weight_decay=0.25)
    assert agent.weight_decay == 0.25 and {g["weight_decay"] for g in agent.optimizer.param_groups} == {0.25}

    clone = make_agent(lr=1e-3)
    clone.import_state(*agent.export_state())
    agent.save_checkpoint(tmp_path / "ckpt")
    restored = make_agent(lr=1e-3)
    restored.load_checkpoint(tmp_path / "ckpt", load_optimizer=True)
    for member in (agent, clone, restored):
        assert {g["weight_decay"] for g in member.optimizer.param_groups} == {0.25}
        before = {n: p.detach().clone() for n, p in member.trainable_parameters().items()}
        for p in member.trainable_parameters().values():
            p.grad = torch.zeros_like(p)
        member.optimizer.step()
        for name, p in member.trainable_parameters().items():
            assert torch.allclose(p, before[name] * (1 - 1e-2 * 0.25), rtol=0, atol=1e-7), name


def test_an_unknown_or_impossible_hyperparameter_is_refused_and_changes_nothing(make_agent):
    agent = make_agent(lr=1e-3)
    with pytest.raises(ValueError, match="unknown hyperparameter 'momentum'"):
        agent.set_hyperparameters(lr=5e-3, momentum=0.9)
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -1"):
        agent.set_hyperparameters(weight_decay=-1)
    assert agent.lr == 1e-3 and {g["lr"] for g in agent.optimizer.param_groups} == {1e-3}
    assert not hasattr(agent, "momentum")


# ----------------------------------------------------------------------- AgileRL's `clone` flag (issue 30, item 5)
def test_the_constructor_takes_agilerls_clone_flag_where_agilerl_has_it():
    import inspect

    parameters = inspect.signature(SFT.__init__).parameters
    clone = parameters["clone"]
    assert (clone.default, clone.annotation, clone.kind) == (False, bool, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = list(parameters)
    assert names.index("wrap") + 1 == names.index("clone") == names.index("seed") - 1  # AgileRL's order


def _trained_peft_model(make_model, lora_config):
    """A PEFT model with an `actor` adapter whose B matrices are not zero (so it changes the output)."""
    from peft import get_peft_model

    model = get_peft_model(make_model(0), copy.deepcopy(lora_config), adapter_name="actor")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def test_clone_keeps_the_given_peft_models_adapter_and_without_it_the_adapter_is_merged_and_fresh(
        tokenizer, make_model, lora_config, logits_of, probe_ids):
    given = _trained_peft_model(make_model, lora_config)
    expected_logits = logits_of(given, probe_ids)
    adapter = {name: p.detach().clone() for name, p in given.named_parameters() if "lora_" in name}
    base = dict(pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, gradient_checkpointing=False)

    cloned = SFT(**base, actor_network=given, clone=True)
    assert cloned.actor is given and cloned.lora_r == lora_config.r and cloned.lora_alpha == lora_config.lora_alpha
    assert {name: p.detach() for name, p in cloned.actor.named_parameters() if "lora_" in name}.keys() == adapter.keys()
    for name, p in cloned.actor.named_parameters():
        if "lora_" in name:
            assert torch.equal(p.detach(), adapter[name]), name
    assert set(cloned.trainable_parameters()) == set(adapter)

    fresh = SFT(**base, actor_network=_trained_peft_model(make_model, lora_config))
    assert_close(logits_of(fresh, probe_ids), expected_logits, atol=1e-5, rtol=1e-5)  # the old adapter merged
    b_matrices = {name: p for name, p in fresh.actor.named_parameters() if "lora_B" in name}
    assert b_matrices and all(not p.any() for p in b_matrices.values()), "a fresh adapter starts with B = 0"
    assert list(fresh.actor.peft_config) == ["actor"] and fresh.lora_r == lora_config.r


def test_clone_of_a_network_without_adapters_is_refused(tokenizer, make_model, lora_config):
    with pytest.raises(ValueError, match="clone=True keeps the adapters of actor_network, which has none"):
        SFT(pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, actor_network=make_model(0),
            lora_config=lora_config, clone=True)
