"""The Ray Tune trainable of the baselines: one member, built as a run builds its members (the
same recipe, data, fitness and test set), trained an iteration at a time on tokens drawn from the
strategy's `TokenBank` (an iteration is what one generation of the evolution gives a member at the
config's batch size, whatever the trial's own), scored after each iteration. With `checkpoints`
(PBT, PB2) every report carries the member as safetensors and JSON files: adapter, optimizer,
scheduler, data stream, generator. With a `deadline` an iteration takes only the steps that fit
before it, as the evolution's generations do (`evo_sft.time_budget.Deadline`, its forecast carried
in the checkpoint)."""
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune
from ray.tune.stopper import Stopper

from evo_sft.console import quiet_libraries
from evo_sft.io import storage
from evo_sft.population.hosting import MemberRecipe, build_hosts
from evo_sft.time_budget import Deadline

WAIT_FOR_TOKENS_S = 0.2


@dataclass(frozen=True)
class TrialPlan:
    tokens: int  # supervised tokens of one iteration: what a member trains on in one generation of the evolution
    checkpoints: bool  # report the member with each result (PBT's exploit copies it)
    deadline: float | None = None  # time.time() by which the strategy's time budget is spent


def trial_slot(trial_id: str) -> int:
    """The trial's number within its experiment (Tune's ids end with it): its data stream's slot."""
    return int(trial_id.rsplit("_", 1)[-1])


def train_trial(config: dict, recipe: MemberRecipe, prepared: dict, plan: TrialPlan, bank) -> None:
    quiet_libraries()  # in the trial's process, as in a member's actor
    logging.getLogger("ray").setLevel(logging.WARNING)  # not Ray Train's INFO line for each checkpoint
    trial = tune.get_context().get_trial_id()
    if plan.deadline is not None and time.time() >= plan.deadline:
        return  # started when the time was spent: ends without a result, like one the tokens ran out for
    slot = trial_slot(trial)
    host = build_hosts(recipe, prepared, {slot: config["hyperparameters"]})[slot]
    checkpoint = tune.get_checkpoint()
    donor = restore(host, checkpoint, trial, config["hyperparameters"])
    if donor is not None:
        ray.get(bank.exploited.remote(trial, donor))
    deadline = None if plan.deadline is None else Deadline(plan.deadline, **saved_forecast(checkpoint))
    while True:
        # a step trains at least one token, so an iteration takes at most as many steps as it has tokens
        most_steps = plan.tokens if deadline is None else deadline.steps_that_fit(plan.tokens)
        if most_steps == 0:
            return
        grant = ray.get(bank.draw.remote(trial, plan.tokens))
        if grant == 0:
            if ray.get(bank.trial_done.remote(trial)) or ray.get(bank.exhausted.remote()):
                return
            time.sleep(WAIT_FOR_TOKENS_S)  # the other trials hold what is left; they may give some back
            continue
        started = time.time()
        result = host.train(min(most_steps, grant), grant)
        total = ray.get(bank.settle.remote(trial, grant, result.tokens))
        evaluation = host.evaluate()
        ray.get(bank.evaluated.remote(trial, total, evaluation.fitness))
        metrics = {"fitness": evaluation.fitness, "test_loss": evaluation.test_loss, "tokens": result.tokens,
                   "total_tokens": total, "train_seconds": result.seconds, **host.hyperparameters()}
        if not plan.checkpoints:
            tune.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as directory:
                save(host, trial, Path(directory), deadline)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        if deadline is not None:
            deadline.measured(len(result.step_losses), result.seconds, time.time() - started - result.seconds)


def save(host, trial: str, directory: Path, deadline: Deadline | None = None) -> None:
    host.snapshot().write(directory)
    storage.save_json(directory / "trial.json", {"trial_id": trial, "slot": host.slot,
                                                 "forecast": {} if deadline is None else deadline.state_dict()})


def restore(host, checkpoint, trial: str, hyperparameters: dict) -> str | None:
    """Continue from `checkpoint` (this trial's own, or a better trial's that PBT's exploit chose):
    its weights, optimizer and scheduler; this trial's own data stream goes on where it was, a
    copied member's starts this trial's stream afresh. Then this trial's (explored) hyperparameters.
    Returns the donor's trial id where the checkpoint is another trial's."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        saved = storage.load_json(directory / "trial.json")
        if saved["trial_id"] == trial:
            host.load(directory)
        else:
            host.agent.load_checkpoint(directory / f"slot_{saved['slot']}", load_optimizer=True)
    host.set_hyperparameters(hyperparameters)
    return None if saved["trial_id"] == trial else saved["trial_id"]


def saved_forecast(checkpoint) -> dict:
    """The time forecast (`Deadline.state_dict()`) a checkpoint carries: {} without a checkpoint,
    or one written without a time budget."""
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as directory:
        return storage.load_json(Path(directory) / "trial.json")["forecast"]


class BudgetSpent(Stopper):
    """Stops every trial once the strategy's tokens are consumed (ASHA would start more) or, with
    a `deadline` (a `time.time()`), once it has passed: a trial still training then loses what it
    trained since its last report."""

    def __init__(self, bank, deadline: float | None = None):
        self.bank, self.deadline = bank, deadline

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return (self.deadline is not None and time.time() >= self.deadline) or ray.get(self.bank.exhausted.remote())
