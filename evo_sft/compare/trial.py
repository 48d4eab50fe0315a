"""The Ray Tune trainable of the baselines: one member, built as a run builds its members (the
same recipe, data, fitness and test set), trained an iteration at a time on tokens drawn from the
strategy's `TokenBank` (an iteration is what one generation of the evolution gives a member at the
config's batch size, whatever the trial's own), scored after each iteration. With `checkpoints`
(PBT, PB2) every report carries the member as safetensors and JSON files: adapter, optimizer,
scheduler, data stream, generator."""
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

WAIT_FOR_TOKENS_S = 0.2


@dataclass(frozen=True)
class TrialPlan:
    tokens: int  # supervised tokens of one iteration: what a member trains on in one generation of the evolution
    checkpoints: bool  # report the member with each result (PBT's exploit copies it)


def trial_slot(trial_id: str) -> int:
    """The trial's number within its experiment (Tune's ids end with it): its data stream's slot."""
    return int(trial_id.rsplit("_", 1)[-1])


def train_trial(config: dict, recipe: MemberRecipe, prepared: dict, plan: TrialPlan, bank) -> None:
    quiet_libraries()  # in the trial's process, as in a member's actor
    logging.getLogger("ray").setLevel(logging.WARNING)  # not Ray Train's INFO line for each checkpoint
    trial = tune.get_context().get_trial_id()
    slot = trial_slot(trial)
    host = build_hosts(recipe, prepared, {slot: config["hyperparameters"]})[slot]
    donor = restore(host, tune.get_checkpoint(), trial, config["hyperparameters"])
    if donor is not None:
        ray.get(bank.exploited.remote(trial, donor))
    while True:
        grant = ray.get(bank.draw.remote(trial, plan.tokens))
        if grant == 0:
            if ray.get(bank.trial_done.remote(trial)) or ray.get(bank.exhausted.remote()):
                return
            time.sleep(WAIT_FOR_TOKENS_S)  # the other trials hold what is left; they may give some back
            continue
        result = host.train(grant, grant)  # a step trains at least one token
        total = ray.get(bank.settle.remote(trial, grant, result.tokens))
        evaluation = host.evaluate()
        ray.get(bank.evaluated.remote(trial, total, evaluation.fitness))
        metrics = {"fitness": evaluation.fitness, "test_loss": evaluation.test_loss, "tokens": result.tokens,
                   "total_tokens": total, "train_seconds": result.seconds, **host.hyperparameters()}
        if not plan.checkpoints:
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as directory:
            save(host, trial, Path(directory))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def save(host, trial: str, directory: Path) -> None:
    host.snapshot().write(directory)
    storage.save_json(directory / "trial.json", {"trial_id": trial, "slot": host.slot})


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


class BudgetSpent(Stopper):
    """Stops every trial once the strategy's budget is consumed (ASHA would start more)."""

    def __init__(self, bank):
        self.bank = bank

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return ray.get(self.bank.exhausted.remote())
