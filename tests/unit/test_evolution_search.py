"""What makes the search more than a greedy hill climb, in the pure evolution layer: founders
spread by a Latin hypercube, the prior's quantiles, PBT's explore of every hyperparameter at once,
and model-guided mutation (a Gaussian process of fitness gains, PB2's idea)."""
import math

import numpy as np
import pytest

from evo_sft.evolution import Explore, HyperparameterConfig, Lineage, Mutations, RLChoice, RLParameter
from evo_sft.evolution.founders import latin_hypercube
from evo_sft.evolution.guided import GainModel, GuidedExplore, Observation, gains, position

SPACE = HyperparameterConfig(lr=RLParameter(1e-5, 1e-1, scale="log"), batch_size=RLParameter(8, 32, dtype=int),
                             scheduler=RLChoice(("constant", "cosine", "linear")))
START = {"lr": 1e-3, "batch_size": 16, "scheduler": "constant", "weight_decay": 0.01}


def test_the_prior_at_a_quantile_is_that_far_along_its_scale():
    lr = SPACE["lr"]
    assert lr.at(0.0) == pytest.approx(1e-5) and lr.at(1.0) == pytest.approx(1e-1)
    assert lr.at(0.5) == pytest.approx(1e-3)  # the middle of four decades on a log scale
    assert RLParameter(0.0, 0.1).at(0.25) == pytest.approx(0.025)
    # the allowed multiples of 8 in [8, 32] take equal shares of [0, 1]
    assert [SPACE["batch_size"].at(q, 8) for q in (0.0, 0.24, 0.25, 0.5, 0.74, 0.75, 1.0)] == [8, 8, 16, 24, 24, 32, 32]
    assert [SPACE["scheduler"].at(q) for q in (0.0, 0.34, 0.99, 1.0)] == ["constant", "cosine", "linear", "linear"]


def test_sampling_draws_from_the_prior_as_before_its_quantiles_were_named():
    """`sample` is the value at a uniform quantile: the same draws as numpy's uniform on the scale."""
    rng, reference = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(20):
        assert SPACE["lr"].sample(rng) == pytest.approx(math.exp(reference.uniform(math.log(1e-5), math.log(1e-1))))
    drawn = [SPACE["batch_size"].sample(np.random.default_rng(seed), 8) for seed in range(800)]
    assert {value: drawn.count(value) for value in (8, 16, 24, 32)} == pytest.approx(
        {8: 200, 16: 200, 24: 200, 32: 200}, abs=45)  # every allowed multiple as likely as the next


@pytest.mark.parametrize("size", [4, 7])
def test_founders_fill_every_stratum_of_every_hyperparameter_once(size):
    founders = latin_hypercube(SPACE, START, size, np.random.default_rng(3), {"batch_size": 8})
    assert len(founders) == size and all(f["weight_decay"] == 0.01 for f in founders)  # unsearched: the config's
    decades = sorted(math.floor(size * math.log(f["lr"] / 1e-5) / math.log(1e4)) for f in founders)
    assert decades == list(range(size))  # one founder in each of `size` equal shares of the log range
    if size == 4:
        assert sorted(f["batch_size"] for f in founders) == [8, 16, 24, 32]
        assert sorted(f["scheduler"] for f in founders).count("constant") in (1, 2)
    again = latin_hypercube(SPACE, START, size, np.random.default_rng(3), {"batch_size": 8})
    assert again == founders != latin_hypercube(SPACE, START, size, np.random.default_rng(4), {"batch_size": 8})


def test_exploring_every_hyperparameter_moves_each_of_them():
    mutations = Mutations(no_mutation=0.0, rl_hp=1.0, explore=Explore(resample_probability=0.0, every=True))
    rng = np.random.default_rng(0)
    for _ in range(50):
        new, mutated = mutations.mutate(START, SPACE, rng, {"batch_size": 8})
        assert new["lr"] / START["lr"] in (pytest.approx(0.8), pytest.approx(1.2))
        assert new["batch_size"] in (8, 24) and new["scheduler"] == "cosine"  # a step either way; the neighbour
        assert mutated == "lr+batch_size+scheduler" and new["weight_decay"] == 0.01
    one = Mutations(no_mutation=0.0, rl_hp=1.0, explore=Explore(resample_probability=0.0))
    assert all(sum(new[k] != START[k] for k in SPACE) == 1
               for new, _ in (one.mutate(START, SPACE, rng, {"batch_size": 8}) for _ in range(50)))


def quadratic_family(best_lr: float, lrs: list[float], batch_sizes: list[int]):
    """Founders in slots 0..n-1 whose fitness after generation 1 peaks at log10(lr) = log10(best_lr)."""
    lineage, fitness = Lineage(), {}
    for slot, (lr, batch) in enumerate(zip(lrs, batch_sizes)):
        member = lineage.found({**START, "lr": lr, "batch_size": batch}, slot=slot)
        fitness[member] = [-(math.log10(lr) - math.log10(best_lr)) ** 2]
    return lineage, fitness


def test_the_gain_model_interpolates_what_it_was_fitted_to():
    points = np.random.default_rng(0).random((12, 2))
    truth = np.sin(3 * points[:, 0]) + points[:, 1]
    model = GainModel(points, truth)
    mean, std = model.predict(points)
    standardised = (truth - truth.mean()) / truth.std()
    assert np.corrcoef(mean, standardised)[0, 1] > 0.95
    far = model.predict(np.array([[5.0, 5.0]]))
    assert far[1][0] > 0.99 and std.max() < far[1][0]  # unknown far away, known where it was fitted


def test_guided_mutation_moves_a_clone_to_where_the_gains_were_highest():
    """Six founders around lr 1e-3: the proposals concentrate near 1e-3 (with kappa 0, the mean alone)."""
    lrs = [1e-5, 1e-4, 3e-4, 3e-3, 1e-2, 1e-1]
    lineage, fitness = quadratic_family(1e-3, lrs, [8, 16, 24, 32, 8, 16])
    propose = GuidedExplore(kappa=0.0).proposer(SPACE, lineage, fitness, generation=2)
    rng = np.random.default_rng(1)
    proposed = [propose({**START, "lr": 1e-1}, rng, {"batch_size": 8}) for _ in range(10)]
    assert all(abs(math.log10(p["lr"]) + 3) < 0.6 for p in proposed), [p["lr"] for p in proposed]
    assert all(p["weight_decay"] == 0.01 for p in proposed)  # what is not searched is kept


def test_gains_are_what_each_slot_gained_in_the_last_generations():
    lineage, fitness = Lineage(), {}
    a = lineage.found({"lr": 1e-3}, slot=0)
    b = lineage.found({"lr": 1e-2}, slot=1)
    fitness[a], fitness[b] = [-3.0, -2.5, -2.0], [-2.8, -2.7, -2.9]
    child = lineage.clone(a, 3, {"lr": 2e-3}, "lr", slot=1)  # opened generation 3 in b's slot
    fitness[child] = [-3.0, -2.5, -2.2]
    assert gains(lineage, fitness, generation=2, window=3) == [  # only generation 1 is complete: its fitness
        Observation({"lr": 1e-3}, -3.0), Observation({"lr": 1e-2}, -2.8)]
    found = [(o.hyperparameters["lr"], round(o.gain, 6)) for o in gains(lineage, fitness, generation=4, window=2)]
    assert found == [(1e-3, 0.5), (1e-2, 0.1), (1e-3, 0.5), (2e-3, 0.3)]  # generations 2 and 3, slot by slot
    assert position(HyperparameterConfig(lr=RLParameter(1e-4, 1e-2, scale="log")), {"lr": 1e-3}) == pytest.approx([0.5])


def test_with_too_little_to_fit_the_guide_proposes_nothing():
    lineage, fitness = quadratic_family(1e-3, [1e-3], [8])
    assert GuidedExplore().proposer(SPACE, lineage, fitness, generation=2) is None
    lineage, fitness = quadratic_family(1e-3, [1e-3, 1e-3], [8, 8])  # no spread in the gains
    assert GuidedExplore().proposer(SPACE, lineage, fitness, generation=2) is None
    with pytest.raises(ValueError, match="kappa"):
        GuidedExplore(kappa=-1.0)
