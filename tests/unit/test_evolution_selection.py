import math
from collections import Counter

import numpy as np
import pytest

from evo_sft.evolution import TournamentSelection, TruncationSelection

NAN, INF = float("nan"), float("inf")


def parent_frequencies(selection, fitnesses, calls, seed=0):
    """Frequency of each slot among the parents of non-elite slots."""
    rng = np.random.default_rng(seed)
    counts, total = Counter(), 0
    for _ in range(calls):
        elite, parents = selection.select(fitnesses, rng)
        for slot, parent in enumerate(parents):
            if selection.elitism and slot == elite:
                continue
            counts[parent] += 1
            total += 1
    return {slot: counts[slot] / total for slot in range(len(fitnesses))}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(tournament_size=0, elitism=True, population_size=4), "tournament_size"),
        (dict(tournament_size=5, elitism=True, population_size=4), "tournament_size"),
        (dict(tournament_size=1, elitism=True, population_size=0), "population_size"),
        (dict(tournament_size=2, elitism=True, population_size=4, eval_loop=0), "eval_loop"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TournamentSelection(**kwargs)


def test_score_averages_the_last_eval_loop_values():
    selection = TournamentSelection(2, True, 4, eval_loop=3)
    assert selection.score([100.0, -1.0, -2.0, -3.0]) == pytest.approx(-2.0)
    assert selection.score([-4.0]) == pytest.approx(-4.0)
    assert selection.score([NAN, -1.0, -2.0, -3.0]) == pytest.approx(-2.0)


@pytest.mark.parametrize("history", [[], [-1.0, NAN], [-1.0, INF], [-INF, -1.0]])
def test_score_is_minus_inf_when_empty_or_non_finite(history):
    assert TournamentSelection(2, True, 4, eval_loop=2).score(history) == -math.inf


def test_elite_keeps_its_own_slot():
    selection = TournamentSelection(2, True, 4)
    rng = np.random.default_rng(0)
    for _ in range(200):
        elite, parents = selection.select([-3.0, -2.0, -1.0, -5.0], rng)
        assert elite == 2
        assert parents[2] == 2


def test_tournament_odds_without_elitism():
    # Two of four drawn without replacement: 6 equally likely pairs. The best is in 3 of them,
    # the second best wins the 2 pairs without the best, the third wins 1, the worst never wins.
    selection = TournamentSelection(tournament_size=2, elitism=False, population_size=4)
    freq = parent_frequencies(selection, [0.1, 0.4, 0.3, 0.2], calls=5000)
    expected = {1: 3 / 6, 2: 2 / 6, 3: 1 / 6, 0: 0.0}
    for slot, p in expected.items():
        assert freq[slot] == pytest.approx(p, abs=0.02)


def test_tournament_odds_with_elitism_cover_non_elite_slots():
    selection = TournamentSelection(tournament_size=3, elitism=True, population_size=5)
    freq = parent_frequencies(selection, [0.5, 0.1, 0.4, 0.3, 0.2], calls=2500)
    # Three of five: the best is in C(4,2)/C(5,3) = 6/10 of the triples, the second best wins
    # the C(3,2) = 3 triples without the best, the third best wins the single remaining one.
    expected = {0: 6 / 10, 2: 3 / 10, 3: 1 / 10, 4: 0.0, 1: 0.0}
    for slot, p in expected.items():
        assert freq[slot] == pytest.approx(p, abs=0.02)


def test_ties_go_to_the_lowest_slot():
    selection = TournamentSelection(tournament_size=4, elitism=True, population_size=4)
    elite, parents = selection.select([1.0, 5.0, 5.0, 0.0], np.random.default_rng(0))
    assert elite == 1
    assert parents == [1, 1, 1, 1]


def test_all_tied_pairs_go_to_the_lower_slot():
    selection = TournamentSelection(tournament_size=2, elitism=False, population_size=4)
    freq = parent_frequencies(selection, [5.0] * 4, calls=2500)
    for slot, p in {0: 3 / 6, 1: 2 / 6, 2: 1 / 6, 3: 0.0}.items():
        assert freq[slot] == pytest.approx(p, abs=0.02)


def test_non_finite_never_beats_finite():
    fitnesses = [NAN, -INF, -1e30, NAN]
    full = TournamentSelection(tournament_size=4, elitism=True, population_size=4)
    assert full.select(fitnesses, np.random.default_rng(0)) == (2, [2, 2, 2, 2])

    pairs = TournamentSelection(tournament_size=2, elitism=False, population_size=4)
    freq = parent_frequencies(pairs, fitnesses, calls=2500)
    # Slot 2 wins every pair it is in; NaN counts as -inf, so the other pairs go to the lower slot.
    for slot, p in {2: 3 / 6, 0: 2 / 6, 1: 1 / 6, 3: 0.0}.items():
        assert freq[slot] == pytest.approx(p, abs=0.02)


def test_all_non_finite_elite_is_slot_zero():
    selection = TournamentSelection(tournament_size=2, elitism=True, population_size=3)
    elite, parents = selection.select([NAN, -INF, NAN], np.random.default_rng(0))
    assert elite == 0 and parents[0] == 0


def test_wrong_number_of_fitnesses_raises():
    with pytest.raises(ValueError, match="population_size=4"):
        TournamentSelection(2, True, 4).select([1.0, 2.0], np.random.default_rng(0))


def test_same_seed_same_selection():
    selection = TournamentSelection(2, True, 6)
    fitnesses = [0.3, 0.1, 0.6, 0.2, 0.5, 0.4]
    a = [selection.select(fitnesses, np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_truncation_replaces_the_bottom_quantile_with_the_top_one_uniformly():
    """Population 8, quantile 0.25: the two worst slots (5 and 2) receive the two best members
    (slots 3 and 0), each about half the time; every other slot keeps its member."""
    fitness = [-1.0, -4.0, -9.0, -0.5, -3.0, -8.0, -2.0, -5.0]
    selection, rng = TruncationSelection(0.25, 8), np.random.default_rng(3)
    drawn = Counter()
    for _ in range(2000):
        elite, parents = selection.select(fitness, rng)
        assert elite == 3
        assert [parents[s] for s in (0, 1, 3, 4, 6, 7)] == [0, 1, 3, 4, 6, 7]
        assert parents[2] in (3, 0) and parents[5] in (3, 0)
        drawn.update((parents[2], parents[5]))
    assert drawn[3] / 4000 == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("size, quantile, replaced", [(4, 0.25, 1), (5, 0.25, 2), (4, 0.5, 2), (3, 0.5, 1),
                                                      (1, 0.5, 0), (10, 0.3, 3)])
def test_truncation_replaces_ceil_of_the_quantile_and_at_most_half(size, quantile, replaced):
    """As Ray Tune's PopulationBasedTraining: ceil(n * quantile) members, at most floor(n / 2)."""
    fitness = [-float(slot) for slot in range(size)]  # slot 0 best
    _, parents = TruncationSelection(quantile, size).select(fitness, np.random.default_rng(0))
    assert sum(parent != slot for slot, parent in enumerate(parents)) == replaced
    assert all(parent < replaced for parent in parents[size - replaced:])


def test_truncation_puts_non_finite_members_at_the_bottom():
    _, parents = TruncationSelection(0.25, 4).select([-1.0, NAN, -2.0, -3.0], np.random.default_rng(0))
    assert parents == [0, 0, 2, 3]


@pytest.mark.parametrize("kwargs, name", [(dict(quantile=0.0, population_size=4), "quantile"),
                                          (dict(quantile=0.6, population_size=4), "quantile"),
                                          (dict(quantile=0.25, population_size=0), "population_size")])
def test_truncation_invalid_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TruncationSelection(**kwargs)


def test_a_steady_state_tournament_replaces_only_the_bottom_quantile_by_tournament_winners():
    """replace_quantile 0.25 of 8: the two worst lose their slots; each parent is the better of two
    drawn from the seven others (so the best of them wins 2/7 of the time, the worst other never)."""
    selection = TournamentSelection(2, True, 8, replace_quantile=0.25)
    fitness = [-3.0, -1.0, -2.0, -5.0, -4.0, -6.0, -0.5, -7.0]
    rng, parents_of = np.random.default_rng(0), {5: Counter(), 7: Counter()}
    for _ in range(3000):
        elite, parents = selection.select(fitness, rng)
        assert elite == 6
        assert [p for slot, p in enumerate(parents) if slot not in (5, 7)] == [0, 1, 2, 3, 4, 6]
        for slot in (5, 7):
            parents_of[slot][parents[slot]] += 1
    assert 5 not in parents_of[5] and 7 not in parents_of[7]  # never its own parent
    assert parents_of[5][6] / 3000 == pytest.approx(2 / 7, abs=0.03)  # the best wins every draw it is in
    assert parents_of[5][7] == 0 and parents_of[7][5] == 0  # the worst of the others never wins
    assert not selection.mutates_survivors


@pytest.mark.parametrize("kwargs, name", [
    (dict(tournament_size=2, elitism=True, population_size=4, replace_quantile=0.75), "replace_quantile"),
    (dict(tournament_size=4, elitism=True, population_size=4, replace_quantile=0.25), "at most 3"),
])
def test_steady_state_tournament_arguments_are_checked(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TournamentSelection(**kwargs)
