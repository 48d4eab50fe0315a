import json

import numpy as np
import pytest

from evo_sft.evolution import HyperparameterConfig, RLParameter


def outcomes(param, value, n=200, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    return {param.mutate(value, rng, **kwargs) for _ in range(n)}


def test_float_grows_or_shrinks_by_its_factors():
    param = RLParameter(min=1e-6, max=1.0, shrink_factor=0.5, grow_factor=2.0)
    assert sorted(outcomes(param, 1e-3)) == pytest.approx([5e-4, 2e-3])


def test_float_is_clipped_to_bounds():
    param = RLParameter(min=1e-4, max=1e-2)
    assert sorted(outcomes(param, 1e-2)) == pytest.approx([0.8e-2, 1e-2])
    assert sorted(outcomes(param, 1e-4)) == pytest.approx([1e-4, 1.2e-4])


def test_float_random_walk_stays_in_bounds():
    param = RLParameter(min=1e-4, max=1e-2)
    rng = np.random.default_rng(1)
    value = 1e-3
    for _ in range(2000):
        value = param.mutate(value, rng)
        assert 1e-4 <= value <= 1e-2
        assert isinstance(value, float)


def test_int_small_value_still_moves_both_ways():
    # 2 * 1.2 and 2 * 0.8 both round back to 2: the value must still move by one.
    param = RLParameter(min=1, max=100, dtype=int)
    results = outcomes(param, 2)
    assert results == {1, 3}
    assert all(type(v) is int for v in results)


def test_int_rounds_when_the_factor_is_large_enough():
    param = RLParameter(min=1, max=100, dtype=int)
    assert outcomes(param, 10) == {8, 12}


def test_int_pinned_at_a_bound_moves_the_other_way():
    param = RLParameter(min=1, max=8, dtype=int)
    assert outcomes(param, 8) == {6, 7}
    assert outcomes(param, 1) == {2}


def test_int_with_a_single_allowed_value_stays():
    assert outcomes(RLParameter(min=4, max=4, dtype=int), 4) == {4}


def test_multiple_of_rounds_and_steps_by_the_multiple():
    param = RLParameter(min=1, max=64, dtype=int)
    # 8 * 1.2 = 9.6 and 8 * 0.8 = 6.4 both round to 8: step by 4.
    assert outcomes(param, 8, multiple_of=4) == {4, 12}
    # 4 is the smallest multiple of 4 >= min: shrinking is pinned, so it grows.
    assert outcomes(param, 4, multiple_of=4) == {8}
    assert outcomes(param, 40, multiple_of=4) == {32, 48}


def test_multiple_of_walk_uses_multiples_inside_bounds_only():
    param = RLParameter(min=3, max=30, dtype=int)
    rng = np.random.default_rng(2)
    value, seen = 8, set()
    for _ in range(500):
        value = param.mutate(value, rng, multiple_of=8)
        seen.add(value)
    assert seen == {8, 16, 24}


def test_multiple_of_clips_to_the_smallest_multiple_above_min():
    # 16 * 0.25 = 4 rounds to 0 multiples of 8; the smallest multiple of 8 >= 3 is 8.
    param = RLParameter(min=3, max=30, shrink_factor=0.25, dtype=int)
    assert outcomes(param, 16, multiple_of=8) == {8, 24}


def test_multiple_of_without_a_multiple_in_bounds_raises():
    with pytest.raises(ValueError, match="no multiple of 8"):
        RLParameter(min=5, max=7, dtype=int).mutate(6, np.random.default_rng(0), multiple_of=8)


def test_multiple_of_on_a_float_parameter_raises():
    with pytest.raises(ValueError, match="int parameters only"):
        RLParameter(min=0.1, max=1.0).mutate(0.5, np.random.default_rng(0), multiple_of=2)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(min=2, max=1), "min"),
        (dict(min=0, max=1, shrink_factor=0), "shrink_factor"),
        (dict(min=0, max=1, grow_factor=-1.0), "grow_factor"),
        (dict(min=0, max=1, dtype=str), "dtype"),
        (dict(min=1.5, max=4, dtype=int), "integer bounds"),
        (dict(min=0, max=float("inf")), "max"),
    ],
)
def test_invalid_parameter_raises_naming_the_problem(kwargs, text):
    with pytest.raises(ValueError, match=text):
        RLParameter(**kwargs)


def test_parameter_json_round_trip():
    for param in (RLParameter(1e-5, 1e-2, 0.7, 1.3), RLParameter(1, 64, dtype=int)):
        d = json.loads(json.dumps(param.to_dict()))
        assert RLParameter.from_dict(d) == param
    assert RLParameter(1, 64, dtype=int).to_dict()["dtype"] == "int"


def make_config():
    return HyperparameterConfig(
        lr=RLParameter(min=1e-5, max=1e-2),
        batch_size=RLParameter(min=1, max=64, dtype=int),
    )


def test_config_is_mapping_like():
    config = make_config()
    assert config.names() == ["lr", "batch_size"]
    assert "lr" in config and "warmup" not in config
    assert len(config) == 2
    assert config["batch_size"].max == 64
    assert dict(config.items())["lr"] == RLParameter(min=1e-5, max=1e-2)


def test_config_json_round_trip():
    config = make_config()
    restored = HyperparameterConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored.to_dict() == config.to_dict()
    assert restored.names() == config.names()


@pytest.mark.parametrize(
    "params, key",
    [
        (dict(lr=0.001), "'lr'"),
        (dict(lr=RLParameter(min=0.0, max=1e-2)), "'lr'"),
        (dict(batch_size=RLParameter(min=1, max=8)), "'batch_size'"),
        (dict(batch_size=RLParameter(min=0, max=8, dtype=int)), "'batch_size'"),
    ],
)
def test_invalid_config_raises_naming_the_key(params, key):
    with pytest.raises(ValueError) as info:
        HyperparameterConfig(**params)
    assert key in str(info.value)


def test_check_accepts_values_in_bounds_and_ignores_extra_keys():
    make_config().check({"lr": 1e-3, "batch_size": 8, "max_grad_norm": 1.0})


@pytest.mark.parametrize(
    "hyperparameters, key",
    [
        ({"lr": 1.0, "batch_size": 8}, "'lr'"),
        ({"lr": 1e-3, "batch_size": 0}, "'batch_size'"),
        ({"lr": 1e-3, "batch_size": 4.5}, "'batch_size'"),
        ({"lr": float("nan"), "batch_size": 8}, "'lr'"),
        ({"lr": 1e-3}, "'batch_size'"),
    ],
)
def test_check_raises_naming_the_key(hyperparameters, key):
    with pytest.raises(ValueError) as info:
        make_config().check(hyperparameters)
    assert key in str(info.value)
