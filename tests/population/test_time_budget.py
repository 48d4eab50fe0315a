"""A wall-clock budget for the evolution (`evo_sft.time_budget.Deadline` in the controller): a
generation takes only the steps its forecast fits before the deadline, the next is forecast from
what it measured, and no generation starts once not one step fits."""
import time
import warnings

import pytest

from evo_sft import build
from evo_sft.config import config_from_dict
from evo_sft.controller import Controller
from evo_sft.io.checkpoint import checkpoint_dirs
from evo_sft.population.local import LocalPopulation
from evo_sft.run import TimeBudgetSpent, start
from evo_sft.time_budget import Deadline
from tests.helpers.evolution_run import GENERATIONS, experiment, make_controller, pieces


def controller_of(tmp_path) -> Controller:
    d = experiment("local", tmp_path / "run")
    d["evolution"]["interval"] = "steps"  # each generation's steps are then the interval's, or what fits
    config = config_from_dict(d)
    model_path, prepared, founders = pieces(config, tmp_path)
    return make_controller(config, LocalPopulation(build.local_hosts(config, model_path, prepared, founders)))


def test_a_generation_takes_the_steps_that_fit_and_the_next_is_forecast_from_what_it_measured(tmp_path):
    controller = controller_of(tmp_path)
    started = time.time()
    # Forecast: 400 s a step and 500 s besides, so of 6 steps one fits in the 1000 s left.
    controller.deadline = Deadline(started + 1000, step_s=400.0, other_s=500.0)
    steps = []
    controller.observers.append(lambda c, record: steps.append([len(r.step_losses) for r in record.train]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controller.run(GENERATIONS)
    assert steps == [[1, 1, 1], [6, 6, 6], [6, 6, 6]]
    assert controller.deadline.step_s < 100  # measured on the tiny model, no longer the 400 s given
    assert started <= controller.finished_at[0] <= controller.finished_at[1] <= controller.finished_at[2] <= time.time()
    resumed = controller_of(tmp_path / "again")
    resumed.load_state_dict(controller.state_dict())
    assert resumed.finished_at == controller.finished_at


@pytest.mark.parametrize("deadline", [lambda now: Deadline(now - 1), lambda now: Deadline(now + 1000, step_s=2000.0)],
                         ids=["passed", "not one step fits"])
def test_no_generation_starts_once_not_one_step_fits(tmp_path, deadline):
    controller = controller_of(tmp_path)
    controller.deadline = deadline(time.time())
    controller.run(GENERATIONS)
    assert controller.generation == 0 and controller.tokens == [] and controller.finished_at == []


def test_a_run_whose_time_budget_goes_to_start_up_trains_nothing_and_says_so(tmp_path):
    d = experiment("local", tmp_path / "run")
    d["evolution"]["time_budget_s"] = 0.01
    with pytest.raises(TimeBudgetSpent, match=r"evolution.time_budget_s: its 0.01 s went to loading the model and "
                                              r"starting the members, before the first generation; nothing was trained"):
        start(config_from_dict(d))
    assert checkpoint_dirs(tmp_path / "run") == [] and not (tmp_path / "run" / "best_adapter").exists()
