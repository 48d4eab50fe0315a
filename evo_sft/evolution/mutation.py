"""Hyperparameter mutation with AgileRL's Mutations interface."""

import copy

import numpy as np

from evo_sft.evolution.hyperparameters import HyperparameterConfig

_RL_ONLY = ("architecture", "new_layer_prob", "parameters", "activation")


class Mutations:
    """Mutation probabilities, with AgileRL's signature. For LLM agents only hyperparameter
    mutation (`rl_hp`) applies: the network mutations must be 0, and `mutation_sd`,
    `activation_selection`, `device` and `accelerator` are accepted for compatibility and unused."""

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

    def mutate(
        self,
        hyperparameters: dict,
        hp_config: HyperparameterConfig,
        rng: np.random.Generator,
        multiple_of: dict[str, int] | None = None,
    ) -> tuple[dict, str]:
        """Return (new hyperparameters, name of the mutated one or "none")."""
        new = copy.deepcopy(hyperparameters)
        names = hp_config.names()
        if rng.random() < self.no_mutation / (self.no_mutation + self.rl_hp) or not names:
            return new, "none"
        name = names[rng.integers(len(names))]
        step = (multiple_of or {}).get(name, 1)
        new[name] = hp_config[name].mutate(hyperparameters[name], rng, step)
        return new, name
