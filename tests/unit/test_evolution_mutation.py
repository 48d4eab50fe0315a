import copy
from collections import Counter

import numpy as np
import pytest

from evo_sft.evolution import HyperparameterConfig, Mutations, RLParameter

CONFIG = HyperparameterConfig(
    lr=RLParameter(min=1e-5, max=1e-2),
    batch_size=RLParameter(min=1, max=64, dtype=int),
)
HP = {"lr": 1e-3, "batch_size": 8, "max_grad_norm": 1.0}


@pytest.mark.parametrize("kind", ["architecture", "new_layer_prob", "parameters", "activation"])
def test_rl_only_kinds_raise(kind):
    with pytest.raises(ValueError) as info:
        Mutations(**{kind: 0.2})
    message = str(info.value)
    assert f"Mutations({kind}=0.2)" in message
    assert "does not apply to LLM agents" in message and "set it to 0" in message


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(no_mutation=-0.1), "no_mutation=-0.1"),
        (dict(rl_hp=float("nan")), "rl_hp=nan"),
        (dict(no_mutation=0.0, rl_hp=0.0), "sum must be > 0"),
    ],
)
def test_invalid_probabilities_raise(kwargs, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(")):
        Mutations(**kwargs)


def test_constructor_arguments_are_kept():
    m = Mutations(no_mutation=0.3, rl_hp=0.5, mutation_sd=0.2, mutate_elite=False, rand_seed=42, device="cuda")
    assert (m.no_mutation, m.rl_hp, m.mutate_elite, m.rand_seed) == (0.3, 0.5, False, 42)


def test_agilerl_keyword_call_is_accepted():
    """AgileRL's documented LLM call, every keyword by AgileRL's name."""
    m = Mutations(no_mutation=0.4, architecture=0, new_layer_prob=0, parameters=0, activation=0, rl_hp=0.6,
                  mutation_sd=0.1, activation_selection=None, mutate_elite=True, rand_seed=1, device="cpu",
                  accelerator=None)
    assert (m.no_mutation, m.rl_hp, m.rand_seed) == (0.4, 0.6, 1)


def test_mutation_odds_and_uniform_choice_of_hyperparameter():
    mutations = Mutations(no_mutation=0.4, rl_hp=0.2)
    rng = np.random.default_rng(0)
    counts = Counter(mutations.mutate(HP, CONFIG, rng)[1] for _ in range(6000))
    assert counts["none"] / 6000 == pytest.approx(2 / 3, abs=0.02)
    assert counts["lr"] / 6000 == pytest.approx(1 / 6, abs=0.02)
    assert counts["batch_size"] / 6000 == pytest.approx(1 / 6, abs=0.02)


def test_only_the_named_hyperparameter_changes_and_the_input_is_untouched():
    mutations = Mutations(no_mutation=0.0, rl_hp=1.0)
    rng = np.random.default_rng(1)
    before = copy.deepcopy(HP)
    for _ in range(100):
        new, name = mutations.mutate(HP, CONFIG, rng)
        assert new is not HP
        changed = {k for k in HP if new[k] != HP[k]}
        assert changed == {name}
    assert HP == before


def test_no_rl_hp_means_no_mutation():
    mutations = Mutations(no_mutation=1.0, rl_hp=0.0)
    rng = np.random.default_rng(2)
    for _ in range(100):
        new, name = mutations.mutate(HP, CONFIG, rng)
        assert (new, name) == (HP, "none")
        assert new is not HP


def test_multiple_of_is_applied_per_name():
    mutations = Mutations(no_mutation=0.0, rl_hp=1.0)
    rng = np.random.default_rng(3)
    hp = dict(HP)
    for _ in range(300):
        hp, _ = mutations.mutate(hp, CONFIG, rng, multiple_of={"batch_size": 4})
        assert hp["batch_size"] % 4 == 0 and 4 <= hp["batch_size"] <= 64
        CONFIG.check(hp)


def test_empty_config_never_mutates():
    new, name = Mutations(no_mutation=0.0, rl_hp=1.0).mutate(HP, HyperparameterConfig(), np.random.default_rng(0))
    assert (new, name) == (HP, "none")
