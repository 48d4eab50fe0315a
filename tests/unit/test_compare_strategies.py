"""`evo-sft compare`'s pure parts: strategy names, the baselines' configurations, the token bank
that shares a budget between trials, and what the report computes from measured runs."""
import math

import numpy as np
import pytest

from evo_sft.compare import strategies
from evo_sft.compare.budget import TokenBank
from evo_sft.compare.report import StrategyRun, summary
from evo_sft.config import config_from_dict
from evo_sft.fitness import NegativeTestLoss


def config(size: int = 4):
    return config_from_dict({
        "agent": {"lr": 1.0e-3, "batch_size": 8, "micro_batch_size_per_gpu": 4},
        "population": {"size": size},
        "evolution": {"hyperparameters": {"lr": {"min": 1.0e-4, "max": 1.0e-2},
                                          "batch_size": {"min": 4, "max": 32}}},
    })


def test_unknown_or_repeated_strategies_are_refused_by_name():
    assert strategies.parse("grid, evolution") == ["grid", "evolution"]
    with pytest.raises(ValueError, match="unknown strategy 'hyperband'.*known: evolution, pbt, pb2, asha, random, grid"):
        strategies.parse("evolution,hyperband")
    with pytest.raises(ValueError, match="twice"):
        strategies.parse("pbt,pbt")


def test_the_grid_is_log_spaced_over_the_lr_bounds_at_the_founders_batch_size():
    grid = strategies.lr_grid(config())
    lrs = [c["lr"] for c in grid]
    assert lrs[0] == pytest.approx(1.0e-4) and lrs[-1] == pytest.approx(1.0e-2)
    assert np.diff(np.log(lrs)) == pytest.approx([math.log(100) / 3] * 3)
    assert {c["batch_size"] for c in grid} == {8}


def test_random_configurations_come_from_the_search_space_on_its_scale():
    drawn = strategies.sampled(config(), 200, seed=1)
    assert all(1.0e-4 <= c["lr"] <= 1.0e-2 and c["batch_size"] % 4 == 0 and 4 <= c["batch_size"] <= 32 for c in drawn)
    assert np.median(np.log10([c["lr"] for c in drawn])) == pytest.approx(-3, abs=0.25)  # log-uniform
    assert drawn == strategies.sampled(config(), 200, seed=1) != strategies.sampled(config(), 200, seed=2)
    assert len(strategies.configurations("asha", config(), 1)) == 4 * strategies.ASHA_CONFIGS_PER_MEMBER


def test_pbt_explored_values_are_kept_within_bounds_and_multiples():
    space = strategies.build.hp_config(config())
    assert strategies.bounded(space["lr"], 0.5) == 1.0e-2
    assert strategies.bounded(space["batch_size"], 38.4, multiple_of=4) == 32
    assert strategies.bounded(space["batch_size"], 9.6, multiple_of=4) == 8


def test_the_bank_gives_no_trial_more_than_its_share_and_all_no_more_than_the_budget():
    bank = TokenBank(budget=100, per_trial=60)
    assert bank.draw("a", 80) == 60  # its share
    assert bank.draw("b", 80) == 40  # what is left of the budget
    assert bank.draw("c", 10) == 0
    assert bank.settle("a", 60, 50) == 50  # 10 tokens go back
    assert bank.draw("c", 30) == 10 and bank.draw("a", 30) == 0  # the 10 given back, then nothing is left
    assert not bank.exhausted()
    bank.settle("b", 40, 43)  # a last step may pass the grant
    bank.settle("c", 10, 12)
    assert bank.exhausted() and bank.spent() == 105 and bank.draw("d", 5) == 0


def test_tokens_to_a_target_and_the_paired_comparison_use_the_measured_curves():
    loss = NegativeTestLoss()
    evolution = StrategyRun("evolution", 1, [(10, -3.0), (20, -2.0), (30, -2.5)], [-2.5, -2.2], 30, 1.0, 3, 0)
    grid = StrategyRun("grid", 1, [(15, -2.8), (30, -2.4)], [-2.4, -2.8], 30, 1.0, 2, 0)
    assert evolution.best_final == -2.2 and evolution.tokens_to(-2.4) == 20 and grid.tokens_to(-2.0) is None
    rows = {row["strategy"]: row for row in summary([evolution, grid], loss, {1: grid.best_final})}
    assert rows["grid"]["minus_evolution"] == pytest.approx(-0.2)  # the grid's best is worse by 0.2
    assert rows["grid"]["beats_evolution"] == "0/1" and rows["evolution"]["reached_target"] == "1/1"
    assert rows["evolution"]["mean"] == pytest.approx(2.2)  # shown as the test loss


def test_a_token_budget_must_be_positive():
    from evo_sft.config import ConfigError

    assert config_from_dict({"evolution": {"token_budget": 5000}}).evolution.token_budget == 5000
    with pytest.raises(ConfigError, match="evolution.token_budget: must be >= 1 or null"):
        config_from_dict({"evolution": {"token_budget": 0}})


def test_a_fixed_population_draws_as_often_per_trial_while_the_budget_lasts():
    """iterations=3 (PBT's synchronous mode needs every trial to report as often): a trial that
    overshot its share still draws one token a time; once the budget is spent no trial draws,
    draws left or not, and the total passes the budget by less than a batch per trial."""
    bank = TokenBank(budget=120, per_trial=60, iterations=3)
    grants = {"a": [], "b": []}
    used = {"a": iter([65, 10, 10]), "b": iter([20, 20])}  # a's first draw passes its share; then a batch each
    for _ in range(3):
        for trial in ("a", "b"):
            grant = bank.draw(trial, 20)
            grants[trial].append(grant)
            if grant:
                bank.settle(trial, grant, next(used[trial]))
    assert grants == {"a": [20, 1, 1], "b": [20, 20, 0]}  # a overshot its share at once; b's last draw finds none left
    assert bank.spent() == 125 and bank.exhausted() and not bank.trial_done("b")
    assert bank.draw("b", 20) == 0 and bank.draw("a", 20) == 0 and bank.trial_done("a")


def test_pb2_searches_numeric_hyperparameters_only():
    strategies.check("pb2", config())
    with_choices = config_from_dict({**config().to_dict(), "evolution": {
        **config().to_dict()["evolution"], "hyperparameters": {"scheduler": {"choices": ["constant", "cosine"]}}}})
    with pytest.raises(ValueError, match="pb2 searches numeric hyperparameters only; "
                                         "evolution.hyperparameters.scheduler has choices"):
        strategies.check("pb2", with_choices)
