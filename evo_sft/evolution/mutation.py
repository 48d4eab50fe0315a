"""Hyperparameter mutation with AgileRL's Mutations interface, and PBT's explore step."""

import copy
import math
import numbers
from dataclasses import dataclass

import numpy as np

from evo_sft.evolution.guided import GuidedExplore
from evo_sft.evolution.hyperparameters import HyperparameterConfig, RLChoice, RLParameter

_RL_ONLY = ("architecture", "new_layer_prob", "parameters", "activation")


@dataclass(frozen=True)
class Explore:
    """PBT's explore step for one hyperparameter: with `resample_probability` a new value drawn
    from its prior (its range on its scale, or a uniform choice); otherwise the value perturbed:
    multiplied by one of `perturb_factors` (each equally likely), or for a choice a move to a
    neighbouring one. Integers never stick and stay multiples of their step."""

    perturb_factors: tuple = (0.8, 1.2)
    resample_probability: float = 0.25
    every: bool = False  # explore every hyperparameter of a mutated member at once (PBT), not one

    def __post_init__(self):
        factors = tuple(self.perturb_factors)
        if not factors:
            raise ValueError("Explore: perturb_factors must not be empty")
        for factor in factors:
            if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor) \
                    or factor <= 0 or factor == 1:
                raise ValueError(
                    f"Explore: each perturb factor must be a finite number > 0 other than 1, got {factor!r}")
        p = self.resample_probability
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
            raise ValueError(f"Explore: resample_probability must be in [0, 1], got {p!r}")
        object.__setattr__(self, "perturb_factors", tuple(float(f) for f in factors))
        object.__setattr__(self, "resample_probability", float(p))

    def apply(self, param: RLParameter | RLChoice, value, rng: np.random.Generator, multiple_of: int = 1):
        if rng.random() < self.resample_probability:
            return param.sample(rng, multiple_of)
        return param.perturb(value, rng, self.perturb_factors, multiple_of)


class Mutations:
    """Mutation probabilities, with AgileRL's signature. For LLM agents only hyperparameter
    mutation (`rl_hp`) applies: the network mutations must be 0, and `mutation_sd`,
    `activation_selection`, `device` and `accelerator` are accepted for compatibility and unused.

    A mutation changes one hyperparameter, chosen uniformly: with `explore` (an `Explore`) by
    PBT's perturb-or-resample (every hyperparameter at once with `explore.every`), without it as
    AgileRL does (grow or shrink by the parameter's own factors, or a neighbouring choice). With
    `guide` (a `GuidedExplore`) and a proposal fitted for the generation, a mutation takes the
    proposed hyperparameters instead."""

    def __init__(
        self,
        no_mutation: float = 0.4,
        architecture: float = 0.0,
        new_layer_prob: float = 0.0,
        parameters: float = 0.0,
        activation: float = 0.0,
        rl_hp: float = 0.2,
        mutation_sd: float = 0.1,
        activation_selection=None,
        mutate_elite: bool = True,
        rand_seed=None,
        device="cpu",
        accelerator=None,
        explore: Explore | None = None,
        guide: GuidedExplore | None = None,
    ):
        probabilities = dict(
            no_mutation=no_mutation,
            architecture=architecture,
            new_layer_prob=new_layer_prob,
            parameters=parameters,
            activation=activation,
            rl_hp=rl_hp,
        )
        for name, p in probabilities.items():
            if not p >= 0:
                raise ValueError(f"Mutations({name}={p}): probabilities must be >= 0")
        for name in _RL_ONLY:
            if probabilities[name] != 0:
                raise ValueError(
                    f"Mutations({name}={probabilities[name]}): {name} mutation does not apply to "
                    f"LLM agents; set it to 0"
                )
        if no_mutation + rl_hp <= 0:
            raise ValueError(f"Mutations(no_mutation={no_mutation}, rl_hp={rl_hp}): their sum must be > 0")
        self.no_mutation = no_mutation
        self.rl_hp = rl_hp
        self.mutate_elite = mutate_elite
        self.rand_seed = rand_seed
        self.explore = explore
        self.guide = guide

    def mutate(
        self,
        hyperparameters: dict,
        hp_config: HyperparameterConfig,
        rng: np.random.Generator,
        multiple_of: dict[str, int] | None = None,
        surely: bool = False,
        propose=None,
    ) -> tuple[dict, str]:
        """Return (new hyperparameters, what mutated: a name, names joined by "+", or "none");
        `surely` skips the draw of `no_mutation`; `propose` (the guide's proposal for this
        generation, see `GuidedExplore.proposer`) replaces the explore step where given."""
        new = copy.deepcopy(hyperparameters)
        names = hp_config.names()
        if not names or (not surely and rng.random() < self.no_mutation / (self.no_mutation + self.rl_hp)):
            return new, "none"
        if propose is not None:
            new = propose(hyperparameters, rng, multiple_of)
            return new, "+".join(name for name in names if new[name] != hyperparameters[name]) or "none"
        chosen = names if self.explore is not None and self.explore.every else [names[rng.integers(len(names))]]
        for name in chosen:
            step = (multiple_of or {}).get(name, 1)
            param, value = hp_config[name], hyperparameters[name]
            new[name] = self.explore.apply(param, value, rng, step) if self.explore else param.mutate(value, rng, step)
        return new, "+".join(name for name in chosen if new[name] != hyperparameters[name]) or chosen[0]
