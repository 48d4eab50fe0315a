"""Every mutable optimizer hyperparameter, once mutated, is what the optimizer's param groups hold
(not only an attribute): on the live agent, in a clone (another agent importing it) and after a
checkpoint is loaded into a fresh agent (a resume). The learning rate a schedule gives is
written out here by hand."""
import math

import pytest

from evo_sft import LRSchedule

TOTAL = 12


def hand_factor(kind: str, warmup: int, step: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / (TOTAL - warmup))
    decay = (1 + math.cos(math.pi * progress)) / 2 if kind == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


MUTATIONS = {
    "lr": {"lr": 3e-3},
    "weight_decay": {"weight_decay": 0.2},
    "scheduler": {"scheduler": "linear"},
    "warmup_steps": {"warmup_steps": 5},
    "scheduler-and-warmup": {"scheduler": "cosine", "warmup_steps": 2, "lr": 5e-4},
}


def expected_groups(hyperparameters: dict, step: int) -> dict:
    factor = hand_factor(hyperparameters["scheduler"], hyperparameters["warmup_steps"], step)
    return {"lr": pytest.approx(hyperparameters["lr"] * factor, rel=1e-12),
            "initial_lr": hyperparameters["lr"], "weight_decay": hyperparameters["weight_decay"]}


def groups_of(agent) -> list[dict]:
    return [{key: group[key] for key in ("lr", "initial_lr", "weight_decay")} for group in agent.optimizer.param_groups]


@pytest.mark.parametrize("mutation", list(MUTATIONS.values()), ids=list(MUTATIONS))
def test_a_mutated_optimizer_hyperparameter_is_in_the_param_groups_after_clone_and_resume(
        mutation, make_agent, uneven_batch, tmp_path):
    schedule = LRSchedule(total_steps=TOTAL, warmup_steps=0, min_lr_ratio=0.1, kind="constant")
    agent = make_agent(lr=1e-3, lr_schedule=schedule)
    for _ in range(3):
        agent.learn(uneven_batch)
    agent.set_hyperparameters(**mutation)
    hyperparameters = {"lr": 1e-3, "weight_decay": 0.01, "scheduler": "constant", "warmup_steps": 0, **mutation}
    assert {name: agent.hyperparameters[name] for name in hyperparameters} == hyperparameters

    clone = make_agent(lr=7e-3, lr_schedule=LRSchedule(total_steps=TOTAL, warmup_steps=6, kind="cosine"))
    clone.set_hyperparameters(weight_decay=0.5)
    clone.import_state(*agent.export_state())
    agent.save_checkpoint(tmp_path / "ckpt")
    resumed = make_agent(lr=7e-3)
    resumed.load_checkpoint(tmp_path / "ckpt", load_optimizer=True)

    for member in (agent, clone, resumed):
        assert member.lr_scheduler.last_epoch == 3
        assert groups_of(member) == [expected_groups(hyperparameters, 3)] * len(member.optimizer.param_groups)
        assert member.lr_scheduler.get_last_lr() == [g["lr"] for g in member.optimizer.param_groups]
        member.learn(uneven_batch)  # the schedule goes on from there
        assert groups_of(member) == [expected_groups(hyperparameters, 4)] * len(member.optimizer.param_groups)


def test_a_step_hyperparameter_travels_as_an_attribute(make_agent, tmp_path):
    """max_grad_norm is read by each optimizer step (not kept by AdamW): the attribute carries it."""
    agent = make_agent()
    agent.set_hyperparameters(max_grad_norm=0.5)
    clone = make_agent()
    clone.import_state(*agent.export_state())
    agent.save_checkpoint(tmp_path / "ckpt")
    resumed = make_agent()
    resumed.load_checkpoint(tmp_path / "ckpt", load_optimizer=True)
    assert agent.max_grad_norm == clone.max_grad_norm == resumed.max_grad_norm == 0.5


def test_a_schedule_that_cannot_be_is_refused_and_changes_nothing(make_agent):
    agent = make_agent(lr=1e-3)  # no schedule length: constant only
    with pytest.raises(ValueError, match="a cosine schedule needs total_steps"):
        agent.set_hyperparameters(scheduler="cosine", lr=2e-3)
    assert (agent.scheduler, agent.lr) == ("constant", 1e-3)
    assert {g["lr"] for g in agent.optimizer.param_groups} == {1e-3}
    with pytest.raises(ValueError, match="scheduler must be one of constant, cosine, linear, got 'step'"):
        agent.set_hyperparameters(scheduler="step")


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_each_schedule_kind_gives_the_factor_written_out_by_hand(kind):
    schedule = LRSchedule(total_steps=TOTAL, warmup_steps=3, min_lr_ratio=0.1, kind=kind)
    for step in range(TOTAL + 3):
        assert schedule(step) == pytest.approx(hand_factor(kind, 3, step), rel=1e-12), step
