"""The search strategies `evo-sft compare` runs, and the settings of each Ray Tune baseline:
which configurations its trials start from and which scheduler decides between them.

- evolution: this package's evolution (`evo-sft run`), with the token budget.
- pbt: Ray Tune's PopulationBasedTraining from the evolution's founders, perturbing every
  generation (one trial iteration), quantile 0.25, resample probability 0.25, factors 1.2/0.8,
  values kept within the search space's bounds (and multiples).
- pb2: Ray Tune's PB2 (Population Based Bandits: a Gaussian-process bandit chooses the explored
  values) from the evolution's founders, same interval and quantile as PBT, bounds as the search
  space's (numeric hyperparameters only).
- asha: ASHAScheduler (grace period 1 iteration, reduction factor 3, up to the evolution's
  generations) over configurations drawn from the search space; budget that stopped trials
  save goes to more configurations.
- random: as many configurations drawn from the search space as the population has members.
- grid: as many learning rates, log-spaced over the lr bounds, at the founders' batch size.
"""
import math

import numpy as np

from evo_sft import build
from evo_sft.config import founder_values

STRATEGIES = ("evolution", "pbt", "pb2", "asha", "random", "grid")
EXPLOITING = ("pbt", "pb2")  # their trials copy each other's checkpoints
ASHA_REDUCTION_FACTOR = 3
ASHA_GRACE_PERIOD = 1
ASHA_CONFIGS_PER_MEMBER = 16  # configurations ASHA may reach, per population member
PBT_QUANTILE = 0.25
PBT_RESAMPLE_PROBABILITY = 0.25
PBT_FACTORS = (1.2, 0.8)


def parse(text: str) -> list[str]:
    """'evolution,pbt' -> the strategies named, in order; a ValueError names an unknown one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STRATEGIES]
    if unknown or not names:
        problem = f"unknown strategy {unknown[0]!r}" if unknown else "no strategy named"
        raise ValueError(f"{problem}; known: {', '.join(STRATEGIES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a strategy is named twice in {text!r}")
    return names


def check(strategy: str, config) -> None:
    """Whether `strategy` can search the config's space; a ValueError says why not."""
    if strategy == "grid":
        lr_grid(config)
    if strategy == "pb2":
        choices = [name for name, param in build.hp_config(config).items() if hasattr(param, "choices")]
        if choices:
            raise ValueError(f"pb2 searches numeric hyperparameters only; evolution.hyperparameters.{choices[0]} "
                             "has choices")


def sampled(config, count: int, seed: int) -> list[dict]:
    """`count` configurations drawn from the search space's prior (each mutable hyperparameter
    on its own scale; the others at the founders' values)."""
    space, start, steps = build.hp_config(config), founder_values(config), build.multiples(config)
    rng = np.random.default_rng([seed, 0xC0])
    return [{**start, **{name: space[name].sample(rng, steps.get(name, 1)) for name in space}} for _ in range(count)]


def lr_grid(config) -> list[dict]:
    """One configuration per population member: learning rates log-spaced over the lr bounds
    (ends included), everything else at the founders' values."""
    space = build.hp_config(config)
    if "lr" not in space:
        raise ValueError("the grid needs lr among evolution.hyperparameters")
    start, size = founder_values(config), config.population.size
    lrs = np.geomspace(space["lr"].min, space["lr"].max, size) if size > 1 else [start["lr"]]
    return [{**start, "lr": float(lr)} for lr in lrs]


def configurations(strategy: str, config, seed: int) -> list[dict]:
    """The hyperparameters of each trial a Tune baseline starts, in order."""
    size = config.population.size
    if strategy in EXPLOITING:
        return build.founder_hyperparameters(config)
    if strategy == "grid":
        return lr_grid(config)
    return sampled(config, size * ASHA_CONFIGS_PER_MEMBER if strategy == "asha" else size, seed)


def scheduler(strategy: str, config):
    """The Tune scheduler of a baseline (None: FIFO, every trial runs to its budget)."""
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    from ray.tune.schedulers.pb2 import PB2

    if strategy == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=config.evolution.generations,
                             grace_period=ASHA_GRACE_PERIOD, reduction_factor=ASHA_REDUCTION_FACTOR)
    if strategy not in EXPLOITING:
        return None
    space, steps = build.hp_config(config), build.multiples(config)

    def within_bounds(new: dict) -> dict:
        hyperparameters = new["hyperparameters"]
        for name, param in space.items():
            if not hasattr(param, "choices"):
                hyperparameters[name] = bounded(param, hyperparameters[name], steps.get(name, 1))
        return new

    if strategy == "pb2":
        return PB2(time_attr="training_iteration", perturbation_interval=1, quantile_fraction=PBT_QUANTILE,
                   hyperparam_bounds={"hyperparameters": {name: [param.min, param.max] for name, param in space.items()}},
                   custom_explore_fn=within_bounds, synch=True)
    rng = np.random.default_rng(config.seed)
    mutations = {name: list(param.choices) if hasattr(param, "choices")
                 else (lambda param=param, name=name: param.sample(rng, steps.get(name, 1)))
                 for name, param in space.items()}
    return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=1,
                                   hyperparam_mutations={"hyperparameters": mutations},
                                   quantile_fraction=PBT_QUANTILE, resample_probability=PBT_RESAMPLE_PROBABILITY,
                                   perturbation_factors=PBT_FACTORS, custom_explore_fn=within_bounds, synch=True)


def bounded(param, value, multiple_of: int = 1):
    """`value` within a numeric parameter's bounds (an integer one at the nearest allowed multiple)."""
    if param.dtype is float:
        return float(min(max(value, param.min), param.max))
    step = math.lcm(param.multiple_of, multiple_of)
    low, high = param.multiple_bounds(step)
    return int(min(max(round(value / step) * step, low), high))
