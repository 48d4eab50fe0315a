"""Who each slot's next member descends from: AgileRL's tournament with elitism, or PBT's
truncation (exploit) step."""

import math

import numpy as np


class TournamentSelection:
    """Pick a parent for every population slot by tournament, keeping the elite. Every member,
    survivor or clone, may then be mutated.

    With `replace_quantile` q, only the members ranked in the bottom q of the population (at least
    one, at most half) lose their slots, each to a clone of the winner of a tournament among the
    other members; every other member keeps its slot and its hyperparameters, and only the clones
    are mutated (a steady-state tournament: what reaches the top stays there)."""

    def __init__(self, tournament_size: int, elitism: bool, population_size: int, eval_loop: int = 1,
                 replace_quantile: float | None = None):
        if population_size < 1:
            raise ValueError(f"TournamentSelection: population_size must be >= 1, got {population_size}")
        if not 1 <= tournament_size <= population_size:
            raise ValueError(
                f"TournamentSelection: tournament_size must be in [1, population_size={population_size}], "
                f"got {tournament_size}"
            )
        if eval_loop < 1:
            raise ValueError(f"TournamentSelection: eval_loop must be >= 1, got {eval_loop}")
        if replace_quantile is not None and not 0 < replace_quantile <= 0.5:
            raise ValueError(f"TournamentSelection: replace_quantile must be in (0, 0.5], got {replace_quantile}")
        if replace_quantile is not None and tournament_size > population_size - 1:
            raise ValueError(f"TournamentSelection: a tournament among the other members takes at most "
                             f"{population_size - 1}, got tournament_size {tournament_size}")
        self.tournament_size = tournament_size
        self.elitism = elitism
        self.population_size = population_size
        self.eval_loop = eval_loop
        self.replace_quantile = replace_quantile
        self.mutates_survivors = replace_quantile is None

    def score(self, fitness_history: list[float]) -> float:
        return score(fitness_history, self.eval_loop)

    def select(self, fitnesses: list[float], rng: np.random.Generator) -> tuple[int, list[int]]:
        """Return (elite_slot, parents): parents[i] is the slot whose member slot i receives."""
        if len(fitnesses) != self.population_size:
            raise ValueError(
                f"TournamentSelection: got {len(fitnesses)} fitnesses for population_size={self.population_size}"
            )
        fitness = [-math.inf if math.isnan(f) else float(f) for f in fitnesses]
        elite_slot = elite(fitness)
        if self.replace_quantile is not None:
            return elite_slot, self._replace_the_worst(fitness, rng)
        parents = []
        for slot in range(self.population_size):
            if self.elitism and slot == elite_slot:
                parents.append(elite_slot)
                continue
            contestants = rng.choice(self.population_size, size=self.tournament_size, replace=False)
            parents.append(elite(fitness, contestants))
        return elite_slot, parents

    def _replace_the_worst(self, fitness: list[float], rng: np.random.Generator) -> list[int]:
        n = self.population_size
        losers = sorted(range(n), key=lambda s: (fitness[s], -s))[:losers_count(n, self.replace_quantile)]
        parents = list(range(n))
        for slot in sorted(losers):
            others = [other for other in range(n) if other != slot]
            contestants = rng.choice(others, size=self.tournament_size, replace=False)
            parents[slot] = elite(fitness, contestants)
        return parents


def losers_count(population_size: int, quantile: float) -> int:
    """How many members a quantile replaces: at least one, at most half the population."""
    return min(math.ceil(population_size * quantile), population_size // 2)


class TruncationSelection:
    """PBT's exploit step: the bottom `quantile` of the population by fitness is replaced by
    clones of members drawn uniformly from the top `quantile` (at most half the population each,
    as Ray Tune's PopulationBasedTraining does); every other member keeps its slot and its
    hyperparameters, and only the clones are mutated (PBT's explore)."""

    elitism = True
    mutates_survivors = False

    def __init__(self, quantile: float, population_size: int, eval_loop: int = 1):
        if population_size < 1:
            raise ValueError(f"TruncationSelection: population_size must be >= 1, got {population_size}")
        if not 0 < quantile <= 0.5:
            raise ValueError(f"TruncationSelection: quantile must be in (0, 0.5], got {quantile}")
        if eval_loop < 1:
            raise ValueError(f"TruncationSelection: eval_loop must be >= 1, got {eval_loop}")
        self.quantile = quantile
        self.population_size = population_size
        self.eval_loop = eval_loop

    def select(self, fitnesses: list[float], rng: np.random.Generator) -> tuple[int, list[int]]:
        """Return (elite_slot, parents): parents[i] is the slot whose member slot i receives."""
        if len(fitnesses) != self.population_size:
            raise ValueError(
                f"TruncationSelection: got {len(fitnesses)} fitnesses for population_size={self.population_size}"
            )
        fitness = [-math.inf if math.isnan(f) else float(f) for f in fitnesses]
        n = self.population_size
        ranked = sorted(range(n), key=lambda s: (-fitness[s], s))  # best first, ties to the lowest slot
        k = losers_count(n, self.quantile)
        parents = list(range(n))
        for slot in sorted(ranked[n - k:]):
            parents[slot] = ranked[int(rng.integers(k))]
        return ranked[0], parents


def score(fitness_history: list[float], eval_loop: int = 1) -> float:
    """Mean of the last `eval_loop` fitness values; -inf if empty or any is non-finite."""
    recent = list(fitness_history)[-eval_loop:]
    if not recent or not all(math.isfinite(f) for f in recent):
        return -math.inf
    return float(np.mean(recent))


def elite(fitness, slots=None) -> int:
    """The slot (among `slots`, default all) with the highest fitness: NaN counts as -inf, ties go
    to the lowest slot. The one rule for the best member, everywhere."""
    slots = range(len(fitness)) if slots is None else slots
    return min((int(s) for s in slots), key=lambda s: (-(-math.inf if math.isnan(fitness[s]) else fitness[s]), s))
