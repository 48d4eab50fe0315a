"""Model-guided exploration, PB2's idea (Parker-Holder et al. 2020) in the pure evolution layer:
fit a Gaussian process to the fitness each member gained over its recent generations as a function
of the hyperparameters it trained with, and give a clone the hyperparameters with the highest upper
confidence bound of that gain, anywhere in the search space.

Hyperparameters are modelled on [0, 1] each, on their prior's scale (a log-scale learning rate on
its logarithm; choices by their index), which is where PB2 as Ray Tune ships it models raw values."""
import math
from dataclasses import dataclass

import numpy as np

from evo_sft.evolution.hyperparameters import HyperparameterConfig, RLChoice

LENGTHSCALES = (0.1, 0.2, 0.35, 0.6, 1.0)  # of the kernel on [0, 1]^d, chosen by marginal likelihood
NOISES = (0.01, 0.1, 0.3)  # noise variance of the standardised gains, chosen likewise
CANDIDATES = 512  # random points of the space the acquisition is maximised over


@dataclass(frozen=True)
class Observation:
    """A member's generation: the hyperparameters it trained with and the fitness it gained."""

    hyperparameters: dict
    gain: float


def position(space: HyperparameterConfig, hyperparameters: dict) -> np.ndarray:
    """Where `hyperparameters` lie in [0, 1]^d, each on its prior's scale."""
    point = []
    for name in space.names():
        param, value = space[name], hyperparameters[name]
        if isinstance(param, RLChoice):
            point.append(param.choices.index(value) / max(1, len(param.choices) - 1))
        elif param.max == param.min:
            point.append(0.5)
        elif param.scale == "log":
            point.append(math.log(value / param.min) / math.log(param.max / param.min))
        else:
            point.append((value - param.min) / (param.max - param.min))
    return np.clip(np.array(point, dtype=float), 0.0, 1.0)


def _kernel(a: np.ndarray, b: np.ndarray, lengthscale: float) -> np.ndarray:
    distances = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return np.exp(-0.5 * distances / lengthscale ** 2)


class GainModel:
    """A Gaussian process of standardised gains over [0, 1]^d (RBF kernel, unit signal variance),
    its lengthscale and noise the pair of LENGTHSCALES x NOISES with the highest marginal likelihood."""

    def __init__(self, points: np.ndarray, gains: np.ndarray):
        self.points = points
        spread = gains.std()
        self.targets = (gains - gains.mean()) / (spread if spread > 0 else 1.0)
        best = None
        for lengthscale in LENGTHSCALES:
            for noise in NOISES:
                covariance = _kernel(points, points, lengthscale) + noise * np.eye(len(points))
                factor = np.linalg.cholesky(covariance)
                alpha = np.linalg.solve(factor.T, np.linalg.solve(factor, self.targets))
                likelihood = -0.5 * self.targets @ alpha - np.log(np.diag(factor)).sum()
                if best is None or likelihood > best[0]:
                    best = (likelihood, lengthscale, factor, alpha)
        _, self.lengthscale, self._factor, self._alpha = best

    def predict(self, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of the standardised gain at each candidate."""
        cross = _kernel(candidates, self.points, self.lengthscale)
        mean = cross @ self._alpha
        solved = np.linalg.solve(self._factor, cross.T)
        variance = np.clip(1.0 - (solved ** 2).sum(0), 1e-12, None)
        return mean, np.sqrt(variance)


@dataclass(frozen=True)
class GuidedExplore:
    """Explore by the gain model: a clone takes the candidate of the search space (random points,
    and where its parent is) with the highest mean + `kappa` x standard deviation of the gain."""

    kappa: float = 1.0
    window: int = 3  # the generations whose gains the model is fitted to

    def __post_init__(self):
        if not (math.isfinite(self.kappa) and self.kappa >= 0):
            raise ValueError(f"GuidedExplore: kappa must be a finite number >= 0, got {self.kappa!r}")
        if self.window < 1:
            raise ValueError(f"GuidedExplore: window must be >= 1, got {self.window!r}")

    def proposer(self, space: HyperparameterConfig, lineage, fitness: dict[int, list[float]], generation: int):
        """A function (parent's hyperparameters, rng, multiple_of) -> new hyperparameters, fitted
        to what members gained in the `window` generations before `generation` (None where that
        is too little to fit: fewer than 2 finite gains, or no spread in them)."""
        observations = [o for o in gains(lineage, fitness, generation, self.window) if math.isfinite(o.gain)]
        values = np.array([o.gain for o in observations])
        if len(observations) < 2 or values.std() == 0:
            return None
        model = GainModel(np.stack([position(space, o.hyperparameters) for o in observations]), values)

        def propose(parent: dict, rng: np.random.Generator, multiple_of: dict[str, int] | None = None) -> dict:
            candidates = np.vstack([rng.random((CANDIDATES, len(space))), position(space, parent)[None]])
            mean, std = model.predict(candidates)
            best = candidates[int(np.argmax(mean + self.kappa * std))]
            return {**parent, **{name: space[name].at(float(u), (multiple_of or {}).get(name, 1))
                                 for name, u in zip(space.names(), best)}}

        return propose


def gains(lineage, fitness: dict[int, list[float]], generation: int, window: int) -> list[Observation]:
    """What the members of the last `window` completed generations before `generation` gained,
    each generation by the slot it trained in: fitness after it minus fitness before it (its
    line's fitness after the previous generation). Where no generation has a before (only the
    first is complete), the first generation's fitness: every founder started from the same
    weights, so it is the gain up to one constant."""
    def slot_records(g: int) -> list[tuple[dict, list[float]]]:
        records = []
        for slot in sorted({info.slot for info in lineage.members.values() if info.slot is not None}):
            member = lineage.occupant(slot, g)
            if member is not None and len(fitness.get(member, [])) >= g:
                records.append((lineage.hyperparameters_at(member, g), fitness[member]))
        return records

    completed = range(max(2, generation - window), generation)
    found = [Observation(hp, history[g - 1] - history[g - 2]) for g in completed for hp, history in slot_records(g)]
    if found or generation < 2:
        return found
    return [Observation(hp, history[0]) for hp, history in slot_records(1)]
