"""PBT's explore step in the pure evolution layer: perturb by a factor or resample from the prior,
neighbouring or resampled choices, integers that never stick, multiples kept; all seeded."""
import math
from collections import Counter

import numpy as np
import pytest

from evo_sft.evolution import Explore, HyperparameterConfig, Mutations, RLChoice, RLParameter

SCHEDULERS = RLChoice(("constant", "cosine", "linear"))


def outcomes(explore, param, value, n=400, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    return [explore.apply(param, value, rng, **kwargs) for _ in range(n)]


def test_without_resampling_a_value_is_multiplied_by_one_of_the_factors():
    explore = Explore(perturb_factors=(0.5, 0.8, 1.2, 2.0), resample_probability=0.0)
    counts = Counter(outcomes(explore, RLParameter(1e-6, 1.0), 1e-3, n=4000))
    assert sorted(counts) == pytest.approx([5e-4, 8e-4, 1.2e-3, 2e-3])
    assert all(abs(c / 4000 - 0.25) < 0.03 for c in counts.values())


def test_resampling_draws_from_the_range_on_its_scale():
    """With resample_probability 1 every value is a draw from the prior: log-uniform over
    [1e-6, 1e-2] has median 1e-4 and a quarter of its mass in each decade; linear has median 0.5."""
    explore = Explore(resample_probability=1.0)
    log_draws = np.array(outcomes(explore, RLParameter(1e-6, 1e-2, scale="log"), 1e-3, n=4000))
    assert log_draws.min() >= 1e-6 and log_draws.max() <= 1e-2
    assert np.median(np.log10(log_draws)) == pytest.approx(-4, abs=0.1)
    assert np.mean(log_draws < 1e-5) == pytest.approx(0.25, abs=0.03)
    linear_draws = np.array(outcomes(explore, RLParameter(0.0, 1.0), 0.3, n=4000))
    assert np.median(linear_draws) == pytest.approx(0.5, abs=0.03) and len(set(linear_draws)) == 4000


def test_resample_probability_is_the_share_of_resampled_values():
    explore = Explore(perturb_factors=(0.8, 1.2), resample_probability=0.25)
    values = outcomes(explore, RLParameter(0.0, 1.0), 0.5, n=8000)
    perturbed = sum(v in (pytest.approx(0.4), pytest.approx(0.6)) for v in values)
    assert perturbed / 8000 == pytest.approx(0.75, abs=0.02)


def test_an_integer_never_sticks_and_keeps_its_multiple():
    """int(1 * 1.2) == 1: a perturbed integer still moves, by one step of its multiple."""
    explore = Explore(perturb_factors=(0.8, 1.2), resample_probability=0.0)
    assert set(outcomes(explore, RLParameter(1, 64, dtype=int), 1)) == {2}
    assert set(outcomes(explore, RLParameter(1, 64, dtype=int), 2)) == {1, 3}
    rank = RLParameter(4, 64, dtype=int, multiple_of=4, scale="log")
    assert set(outcomes(explore, rank, 8)) == {4, 12}
    resampled = outcomes(Explore(resample_probability=1.0), rank, 8, n=2000)
    assert set(resampled) <= set(range(4, 65, 4)) and {4, 64} <= set(resampled)
    # a batch size: the parameter's own multiple and the micro-batch's, both
    batch = RLParameter(4, 64, dtype=int, multiple_of=4)
    assert set(outcomes(Explore(resample_probability=1.0), batch, 24, multiple_of=6)) <= {12, 24, 36, 48, 60}


def test_a_choice_moves_to_a_neighbour_or_is_resampled():
    perturb = Explore(resample_probability=0.0)
    assert Counter(outcomes(perturb, SCHEDULERS, "cosine")).keys() == {"constant", "linear"}
    assert set(outcomes(perturb, SCHEDULERS, "constant")) == {"cosine"}
    assert set(outcomes(perturb, RLChoice((8,)), 8)) == {8}
    counts = Counter(outcomes(Explore(resample_probability=1.0), SCHEDULERS, "constant", n=3000))
    assert all(abs(c / 3000 - 1 / 3) < 0.03 for c in counts.values()) and len(counts) == 3
    # AgileRL's mutation (no explore) moves a choice to a neighbour too
    assert set(SCHEDULERS.mutate("linear", np.random.default_rng(0)) for _ in range(50)) == {"cosine"}


def test_mutations_with_explore_are_deterministic_for_a_seed_and_stay_in_the_space():
    space = HyperparameterConfig(lr=RLParameter(1e-6, 1e-2, scale="log"),
                                 lora_r=RLChoice((2, 4, 8, 16)), scheduler=SCHEDULERS,
                                 warmup_steps=RLParameter(0, 100, dtype=int, multiple_of=10))
    mutations = Mutations(no_mutation=0.0, rl_hp=1.0, explore=Explore())

    def walk(seed):
        rng, hp, seen = np.random.default_rng(seed), {"lr": 1e-4, "lora_r": 4, "scheduler": "constant",
                                                      "warmup_steps": 20}, []
        for _ in range(300):
            hp, name = mutations.mutate(hp, space, rng)
            space.check(hp)
            seen.append((name, dict(hp)))
        return seen

    assert walk(1) == walk(1) and walk(1) != walk(2)
    assert {name for name, _ in walk(1)} == {"lr", "lora_r", "scheduler", "warmup_steps"}


@pytest.mark.parametrize("kwargs, text", [
    (dict(perturb_factors=()), "must not be empty"),
    (dict(perturb_factors=(0.8, 1.0)), "other than 1, got 1.0"),
    (dict(perturb_factors=(-0.5,)), "> 0"),
    (dict(perturb_factors=(math.inf,)), "finite"),
    (dict(resample_probability=1.5), r"resample_probability must be in \[0, 1\]"),
])
def test_impossible_explore_settings_raise(kwargs, text):
    with pytest.raises(ValueError, match=text):
        Explore(**kwargs)


@pytest.mark.parametrize("choices, text", [((), "must not be empty"), ((1, 1), "distinct"), ((True,), "string or a number")])
def test_impossible_choices_raise(choices, text):
    with pytest.raises(ValueError, match=text):
        RLChoice(choices)


def test_choices_check_and_json_round_trip():
    space = HyperparameterConfig(scheduler=SCHEDULERS, lora_r=RLChoice((4, 8)),
                                 warmup=RLParameter(0, 10, dtype=int, multiple_of=5))
    assert HyperparameterConfig.from_dict(space.to_dict()).to_dict() == space.to_dict()
    with pytest.raises(ValueError, match="'scheduler'='step' is not one of"):
        space.check({"scheduler": "step", "lora_r": 4, "warmup": 5})
    with pytest.raises(ValueError, match="no multiple of 7"):
        RLParameter(1, 6, dtype=int, multiple_of=7)
    with pytest.raises(ValueError, match="int parameters only"):
        RLParameter(0.1, 1.0, multiple_of=2)
