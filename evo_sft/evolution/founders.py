"""The founders' hyperparameters: a space-filling design over every searched hyperparameter, so
that the first generation already compares the whole search space."""
import numpy as np

from evo_sft.evolution.hyperparameters import HyperparameterConfig


def latin_hypercube(space: HyperparameterConfig, start: dict, size: int, rng: np.random.Generator,
                    multiple_of: dict[str, int] | None = None) -> list[dict]:
    """`size` hyperparameter sets: `start` with each searched hyperparameter replaced by a Latin
    hypercube design on its prior's scale. Each hyperparameter's range (or list of choices) is cut
    into `size` equal strata and every stratum gets exactly one founder, at a random point inside
    it; the strata are matched across hyperparameters by independent random permutations."""
    founders = [dict(start) for _ in range(size)]
    for name in space.names():
        strata = rng.permutation(size)
        points = (strata + rng.random(size)) / size
        for founder, point in zip(founders, points):
            founder[name] = space[name].at(float(point), (multiple_of or {}).get(name, 1))
    return founders
