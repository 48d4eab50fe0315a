"""End-to-end tests of the in-process evolution (issue 3): `finetune_llm_sft` and the generation
loop it runs (`Controller` over a `LocalPopulation`), on tiny real models, on the CPU.

What is checked is what the population *does*: which lineages survive, what the fitness
measures, which rows each member trains on, what the optimizer does after a mutation.
"""
import copy
import json
import math
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file

from evo_sft import SFT, HyperparameterConfig, Mutations, RLParameter, SFTGym, TournamentSelection
from evo_sft.controller import Controller
from evo_sft.data.demo import build_model, build_tokenizer, demo_dataset
from evo_sft.finetune import _ElitePerStep, finetune_llm_sft
from evo_sft.population.local import LocalPopulation
from evo_sft.population.member import MemberHost, stream_seed
from tests.helpers.evolution_run import controller_over
from tests.helpers.reference import hand_loss_sum, reference_ids

TRAIN_ROWS, TEST_ROWS = 48, 12
SEED = 0
HP = HyperparameterConfig(lr=RLParameter(min=1e-6, max=1e-1), batch_size=RLParameter(min=4, max=8, dtype=int))
HP_LR = HyperparameterConfig(lr=RLParameter(min=1e-6, max=1e-1))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def rows():
    """(train, test) datasets of the built-in reverse-a-word task."""
    return demo_dataset(TRAIN_ROWS, seed=0), demo_dataset(TEST_ROWS, seed=1)


@pytest.fixture
def make_gym(tok, rows):
    def make(gym_class=SFTGym):
        return gym_class(rows[0], rows[1], tok, data_batch_size_per_gpu=4, max_length=64, seed=SEED)

    return make


@pytest.fixture
def make_agents(tok):
    """`make_agents(lrs, **overrides)`: one tiny LoRA agent per learning rate. Every agent starts
    from the same base weights and the same adapter initialisation; lm_head is a LoRA target so
    that learning shows within a few steps."""

    def make(lrs, hp_config=HP, batch_size=4, **overrides):
        agents = []
        for index, lr in enumerate(lrs):
            kwargs = dict(
                pad_token_id=tok.pad_token_id, pad_token=tok.pad_token,
                actor_network=build_model(len(tok), seed=0, hidden_size=32, num_layers=1),
                lora_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                       target_modules=["q_proj", "v_proj", "lm_head"]),
                lr=lr, batch_size=batch_size, hp_config=hp_config, index=index,
                gradient_checkpointing=False, max_grad_norm=1.0, seed=42,
            )
            kwargs.update(overrides)
            agents.append(SFT(**kwargs))
        return agents

    return make


def founder_of(controller, member_id) -> int:
    return controller.lineage.ancestry(member_id)[-1]


def consumed(stream) -> int:
    """Rows a stream has handed out since it started."""
    return stream.epoch * stream.num_rows + stream.position


# ----------------------------------------------------------------------- independent references
@torch.no_grad()
def hand_test_loss(agent, tok, dataset) -> float:
    """Token-weighted mean response cross-entropy over every row of `dataset`."""
    model = copy.deepcopy(agent.actor).eval()
    total, count = 0.0, 0
    for prompt, response in zip(dataset["prompt"], dataset["response"]):
        loss, n = hand_loss_sum(model, *reference_ids(tok, prompt, response))
        total, count = total + float(loss), count + n
    return total / count


# ----------------------------------------------------------------------- end to end
def test_population_keeps_the_better_learning_rates(make_agents, make_gym):
    lrs = [1e-5, 1e-4, 1e-3, 1e-2]
    steps, generations = 5, 5
    tournament = lambda: TournamentSelection(2, True, 4)  # noqa: E731
    mutation = lambda: Mutations(no_mutation=0.5, rl_hp=0.5, rand_seed=1)  # noqa: E731

    agents, histories = finetune_llm_sft(make_agents(lrs), make_gym(), evo_steps=steps, max_steps=steps * generations,
                                         tournament=tournament(), mutation=mutation(), verbose=False, seed=SEED)
    assert len(agents) == 4 and all(len(h) == generations for h in histories)

    # The same run through the controller, for its lineage: same decisions, same numbers.
    controller = controller_over(make_agents(lrs), make_gym(), steps, tournament(), mutation())
    controller.run(generations)
    assert [controller.fitness[m] for m in controller.slot_ids] == histories
    assert [host.agent.lr for host in controller.population.hosts] == [a.lr for a in agents]

    founders = {founder_of(controller, m) for m in controller.slot_ids}
    assert founders <= {2, 3}, f"survivors descend from founders {founders} (lrs {[lrs[f] for f in founders]})"
    assert all(a.lr > 1e-4 for a in agents), [a.lr for a in agents]
    # a clone inherits its parent's fitness history, so each history starts at its founder's first score
    first = {founder: controller.fitness[founder][0] for founder in range(4)}
    assert all(h[0] == first[founder_of(controller, m)] for h, m in zip(histories, controller.slot_ids))

    # The best founder trained alone (same slot, hence the same stream) for the same steps.
    best = max(range(4), key=lambda s: first[s])
    assert lrs[best] == 1e-2
    alone_agent = make_agents([lrs[best]])[0]
    alone_pop = LocalPopulation([MemberHost(best, alone_agent, make_gym(), SEED)])
    alone = Controller(alone_pop, HP, steps, seed=SEED)
    alone.run(generations)
    alone_history = alone.fitness[0]
    # Its first score is the one it had in the population: members do not disturb each other.
    assert alone_history[0] == first[best]
    best_final = max(h[-1] for h in histories)
    assert best_final >= alone_history[-1], (best_final, alone_history)
    # learning is visible: the population improved a lot over its own start
    assert best_final > max(first.values()) + 0.5


def test_same_seed_same_fitness_and_lineage(make_agents, make_gym):
    def run():
        controller = controller_over(make_agents([1e-4, 1e-3, 1e-2]), make_gym(), 3, TournamentSelection(2, True, 3),
                                     Mutations(no_mutation=0.2, rl_hp=0.8, rand_seed=7))
        controller.run(4)
        return controller

    first, second = run(), run()
    assert first.fitness == second.fitness
    assert first.lineage.to_dict() == second.lineage.to_dict()
    assert first.slot_ids == second.slot_ids
    assert sum(e["kind"] in ("clone", "mutate") for e in first.lineage.events) > 0  # decisions were taken
    other = controller_over(make_agents([1e-4, 1e-3, 1e-2]), make_gym(), 3, TournamentSelection(2, True, 3),
                            Mutations(no_mutation=0.2, rl_hp=0.8, rand_seed=8))
    other.run(4)
    assert other.lineage.to_dict() != first.lineage.to_dict()  # the seed matters, so the comparison can fail


# ----------------------------------------------------------------------- fairness
def test_fitness_is_the_whole_test_set_loss_just_before_selection(make_agents, make_gym, tok, rows):
    checked = []

    def check_before_selection(controller, elite_slot):
        """Runs after scoring and before selection (the save_elite hook)."""
        for slot, host in enumerate(controller.population.hosts):
            fitness = controller.fitness[controller.slot_ids[slot]][-1]
            assert -fitness == pytest.approx(hand_test_loss(host.agent, tok, rows[1]), rel=1e-5, abs=1e-6)
            checked.append((controller.generation, slot))
        assert elite_slot == int(np.argmax([controller.fitness[m][-1] for m in controller.slot_ids]))

    controller = controller_over(make_agents([1e-3, 3e-3, 1e-2]), make_gym(), 3, TournamentSelection(2, True, 3),
                                 Mutations(no_mutation=0.5, rl_hp=0.5, rand_seed=3), save_elite=check_before_selection)
    controller.run(3)
    assert checked == [(g, s) for g in range(1, 4) for s in range(3)]
    # the fitness moved between generations: never a stale score
    assert all(len(set(history)) == len(history) for history in (controller.fitness[m] for m in controller.slot_ids))


class RecordingGym(SFTGym):
    """An SFTGym that remembers which training sequences it handed to which stream."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handed = {}

    def batch(self, stream, num_rows):
        batch = super().batch(stream, num_rows)
        sequences = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        self.handed.setdefault(stream.seed, []).extend(sequences)
        return batch


def test_each_member_draws_its_own_stream_and_skips_no_rows(make_agents, make_gym):
    gym = make_gym(RecordingGym)
    steps, generations = 4, 4
    expected = [0, 0, 0]

    def count_rows(controller, record):
        for slot, host in enumerate(controller.population.hosts):
            # trained in this generation with the hyperparameters it was scored with
            expected[slot] += steps * record.hyperparameters[slot]["batch_size"]
            assert consumed(host.stream) == expected[slot]

    controller = controller_over(make_agents([1e-3, 3e-3, 1e-2]), gym, steps, TournamentSelection(2, True, 3),
                                 Mutations(no_mutation=0.0, rl_hp=1.0, rand_seed=5), observers=[count_rows])
    controller.run(generations)
    assert any(e["kind"] in ("clone", "mutate") and e["mutation"] == "batch_size" for e in controller.lineage.events)

    all_rows = Counter(tuple(ids) for ids in gym.train.input_ids)
    orders = []
    for slot, host in enumerate(controller.population.hosts):
        handed = gym.handed[stream_seed(SEED, slot)]
        assert host.stream.seed == stream_seed(SEED, slot)
        assert len(handed) == consumed(host.stream) == expected[slot]  # every row counted was trained on
        assert len(handed) >= TRAIN_ROWS
        assert Counter(handed[:TRAIN_ROWS]) == all_rows  # the first epoch is every row exactly once
        orders.append(handed[:TRAIN_ROWS])
    assert len(gym.handed) == 3  # one stream per slot, none shared
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]


# ----------------------------------------------------------------------- faults
def test_a_nan_member_gets_minus_inf_and_is_replaced(make_agents, make_gym):
    poisoned = {}

    records = []
    controller = controller_over(make_agents([1e-3, 3e-3, 1e-2, 5e-3]), make_gym(), 3, TournamentSelection(2, True, 4),
                                 Mutations(no_mutation=0.5, rl_hp=0.5, rand_seed=2),
                                 observers=[lambda c, r: records.append(r)])
    train = controller.population.train

    def diverge_in_generation_2(steps, max_tokens=None):
        """Slot 2's weights turn NaN as generation 2 starts training (after its clones)."""
        if controller.generation == 1:
            host = controller.population.hosts[2]
            name, weight = next((n, p) for n, p in host.agent.trainable_parameters().items() if "lora_B" in n)
            with torch.no_grad():
                weight.fill_(float("nan"))
            poisoned.update(slot=2, member=controller.slot_ids[2])
        return train(steps, max_tokens)

    controller.population.train = diverge_in_generation_2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        controller.run(3)

    member = poisoned["member"]
    named = [str(w.message) for w in caught if f"member {member} " in str(w.message)]
    assert named and "non-finite" in named[0], [str(w.message) for w in caught]
    generation_2, generation_3 = records[1], records[2]
    assert generation_2.member_ids[2] == member
    assert generation_2.fitness[2] == -math.inf
    assert all(math.isfinite(f) for s, f in enumerate(generation_2.fitness) if s != 2)
    decision = generation_3.decisions[2]  # generation 3 opens with the selection on generation 2's scores
    assert decision.clone and decision.parent_id != member  # replaced by a clone of a finite member
    assert member in generation_3.retired_ids
    assert {"kind": "nonfinite", "generation": 2, "member_id": member, "slot": 2} in controller.lineage.events
    # the run went on: the clone in slot 2 trains normally
    assert len(records) == 3 and all(math.isfinite(f) for f in records[2].fitness)
    assert all(torch.isfinite(p).all() for p in controller.population.hosts[2].agent.trainable_parameters().values())


# ----------------------------------------------------------------------- checkpoints
def adapter_weights(agent) -> dict:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(agent.actor, adapter_name="actor").items()}


def test_checkpoint_steps_save_the_elite_as_evaluated_under_step_paths(make_agents, make_gym, tmp_path):
    seen, records = [], []

    def remember_elite(controller, record):
        host = controller.population.hosts[record.elite_slot]
        records.append(record)
        seen.append(dict(path=record.elite_adapter, slot=record.elite_slot,
                         evaluated=record.hyperparameters[record.elite_slot], weights=adapter_weights(host.agent)))

    steps = 5
    controller = controller_over(
        make_agents([1e-3, 3e-3, 1e-2], hp_config=HP_LR), make_gym(), steps, TournamentSelection(2, True, 3),
        Mutations(no_mutation=0.0, rl_hp=1.0, mutate_elite=True, rand_seed=4),
        observers=[remember_elite], save_elite=_ElitePerStep(steps, tmp_path / "elite"))
    controller.run(3)

    assert sorted(p.name for p in (tmp_path / "elite").iterdir()) == ["step_10", "step_15", "step_5"]
    for generation, elite in enumerate(seen):
        path = tmp_path / "elite" / f"step_{(generation + 1) * steps}"
        assert elite["path"] == str(path)
        attributes = json.loads((path / "attributes.json").read_text())["attributes"]
        assert attributes["lr"] == elite["evaluated"]["lr"]
        if generation + 1 < len(records):  # the elite was mutated after it was saved, opening the next generation
            assert attributes["lr"] != records[generation + 1].hyperparameters[elite["slot"]]["lr"]
        saved = load_file(path / "actor" / "adapter_model.safetensors")
        assert saved.keys() == elite["weights"].keys()
        assert all(torch.equal(saved[k], elite["weights"][k]) for k in saved)
        assert not (path / "optimizer.safetensors").exists()  # save_llm_checkpoint: adapter and attributes only
    first = load_file(tmp_path / "elite" / "step_5" / "actor" / "adapter_model.safetensors")
    last = load_file(tmp_path / "elite" / "step_15" / "actor" / "adapter_model.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in first)  # later saves did not overwrite earlier ones


def test_finetune_checkpoint_steps_not_a_multiple_of_evo_steps(make_agents, make_gym, tmp_path):
    finetune_llm_sft(make_agents([1e-3, 1e-2]), make_gym(), evo_steps=3, max_steps=12, checkpoint_steps=5,
                     checkpoint_path=str(tmp_path), tournament=TournamentSelection(2, True, 2),
                     mutation=Mutations(rand_seed=0), verbose=False)
    # the elite is saved at the first evaluation after each multiple of 5: steps 6 (>5) and 12 (>10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_12", "step_6"]
    for step in (6, 12):
        assert (tmp_path / f"step_{step}" / "actor" / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------- mutations, by behaviour
def adamw_reference(param, grad, state, lr, group) -> torch.Tensor:
    """One AdamW step written out by hand, from the optimizer moments before the step."""
    beta1, beta2 = group["betas"]
    step = float(state["step"]) + 1
    exp_avg = beta1 * state["exp_avg"] + (1 - beta1) * grad
    exp_avg_sq = beta2 * state["exp_avg_sq"] + (1 - beta2) * grad * grad
    denominator = (exp_avg_sq / (1 - beta2 ** step)).sqrt() + group["eps"]
    return param * (1 - lr * group["weight_decay"]) - lr * (exp_avg / (1 - beta1 ** step)) / denominator


def test_lr_mutation_of_a_clone_sets_the_next_adamw_step(make_agents, make_gym):
    agents = make_agents([1e-3, 2e-3])
    population = LocalPopulation([MemberHost(slot, agent, make_gym(), SEED) for slot, agent in enumerate(agents)])
    population.train(3)  # non-trivial Adam moments
    donor = agents[0]
    params_before = {n: p.detach().clone() for n, p in donor.trainable_parameters().items()}
    state_before = copy.deepcopy(donor.optimizer.state_dict()["state"])
    group = dict(donor.optimizer.param_groups[0])

    new_lr = 7.5e-3
    population.clone([(1, 0)])
    population.set_hyperparameters({1: {"lr": new_lr, "batch_size": 4}})
    population.hosts[1].train(1)

    receiver = agents[1]
    assert receiver.lr_scheduler.get_last_lr() == [new_lr]
    for index, (name, param) in enumerate(receiver.trainable_parameters().items()):
        expected = adamw_reference(params_before[name], param.grad, state_before[index], new_lr, group)
        assert torch.allclose(param.detach(), expected, atol=1e-7, rtol=1e-5), name
        if index == 0:
            at_old_lr = adamw_reference(params_before[name], param.grad, state_before[index], 1e-3, group)
            assert not torch.allclose(param.detach(), at_old_lr, atol=1e-7, rtol=1e-5)
    # the donor did not move with its clone: no shared storage
    assert all(torch.equal(p, params_before[n]) for n, p in donor.trainable_parameters().items())


def test_batch_size_mutation_changes_the_rows_of_the_next_step(make_agents, make_gym, tok):
    agent = make_agents([1e-3], micro_batch_size_per_gpu=2, max_grad_norm=1e6)[0]
    gym = make_gym()
    host = MemberHost(0, agent, gym, SEED)
    host.train(2)
    assert consumed(host.stream) == 8

    host.set_hyperparameters({"lr": 1e-3, "batch_size": 6})
    replay = type(host.stream).from_state_dict(len(gym.train), host.stream.state_dict())
    rows = replay.take(6)
    before = copy.deepcopy(agent.actor)
    steps_before = agent.optimizer_steps
    result = host.train(1)

    assert consumed(host.stream) == 8 + 6
    assert agent.optimizer_steps == steps_before + 1  # three micro-batches of 2, one optimizer step
    sequences = [(gym.train.input_ids[r], gym.train.prompt_lengths[r]) for r in rows]
    assert result.tokens == sum(len(ids) - prompt_len for ids, prompt_len in sequences)
    # the step's gradient is that of the token mean over all six rows
    before.train()
    losses = [hand_loss_sum(before, ids, prompt_len) for ids, prompt_len in sequences]
    (sum(loss for loss, _ in losses) / sum(n for _, n in losses)).backward()
    reference = {n: p.grad for n, p in before.named_parameters() if p.requires_grad}
    for name, param in agent.trainable_parameters().items():
        assert torch.allclose(param.grad, reference[name], atol=1e-6, rtol=1e-4), name
