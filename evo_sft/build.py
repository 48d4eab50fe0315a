"""From an experiment config to the pieces of a run: base model, tokenised data, the recipe of
its members, the founders' hyperparameters, selection and mutation, and the population."""
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from evo_sft.config import ExperimentConfig, founder_values
from evo_sft.evolution import (
    Explore, HyperparameterConfig, Mutations, RLChoice, RLParameter, TournamentSelection, TruncationSelection,
)
from evo_sft.evolution.founders import latin_hypercube
from evo_sft.evolution.guided import GuidedExplore
from evo_sft.hyperparameters import HYPERPARAMETERS


def resolve_model_path(config: ExperimentConfig, run_dir: Path) -> str:
    """The built-in demo model is written once into the run folder; anything else is a hub id or
    path, checked now (a missing folder, an unreachable hub) so that it fails before members start."""
    if config.model.name != "demo":
        from evo_sft.data.sources import check_model

        check_model(config.model.name, config.model.trust_remote_code)
        return config.model.name
    from evo_sft.data.demo import write_demo_model

    return str(write_demo_model(run_dir / "base_model", seed=config.seed))


def prepare_data(config: ExperimentConfig, tokenizer) -> dict:
    """Tokenise both splits once and keep the test rows' text; the result is shared by every
    member (and every actor)."""
    from evo_sft.data.gym import prepare
    from evo_sft.data.sources import load_splits

    train, test = load_splits(config.data, config.seed)
    d = config.data
    return prepare(train, test, tokenizer, d.prompt_column, d.response_column, d.max_length,
                   config.evolution.fitness_options.reference_column)


def member_recipe(config: ExperimentConfig, model_path: str):
    """How every member of this run is made (see `MemberRecipe`)."""
    from evo_sft.population.hosting import MemberRecipe

    agent = config.agent
    lora = None
    if config.lora is not None:
        lora = {**asdict(config.lora), "task_type": "CAUSAL_LM"}
    # A cosine or linear schedule decays over the whole run unless agent.schedule_steps says otherwise.
    schedule_steps = agent.schedule_steps or (
        config.evolution.generations * config.evolution.steps_per_generation * agent.update_epochs)
    return MemberRecipe(
        model_path=model_path,
        tokenizer=config.tokenizer or model_path,
        trust_remote_code=config.model.trust_remote_code,
        agent={
            "model_config": {"dtype": config.model.dtype, "attn_implementation": config.model.attn_implementation,
                             "trust_remote_code": config.model.trust_remote_code},
            "update_epochs": agent.update_epochs,
            "micro_batch_size_per_gpu": agent.micro_batch_size_per_gpu, "seed": config.seed,
            "gradient_checkpointing": agent.gradient_checkpointing, "use_liger_loss": agent.use_liger_loss,
            "packing": agent.packing, "compile_layers": agent.compile_layers,
        },
        lr_schedule={"total_steps": schedule_steps, "warmup_steps": agent.warmup_steps,
                     "min_lr_ratio": agent.min_lr_ratio, "kind": agent.scheduler},
        lora=lora,
        gym={"data_batch_size_per_gpu": agent.batch_size, "response_column": config.data.response_column,
             "prompt_column": config.data.prompt_column, "max_length": config.data.max_length, "seed": config.seed},
        seed=config.seed,
        use_gpu=config.population.num_gpus > 0,
        step_together=config.population.step_together,
        fitness=config.evolution.fitness,
        fitness_options=fitness_options(config),
    )


def fitness_options(config: ExperimentConfig) -> dict:
    """The `Fitness` keyword arguments of `evolution.fitness_options` (the others act on the data and the run)."""
    options = config.evolution.fitness_options
    return {"eval_rows": options.eval_rows, "max_new_tokens": options.max_new_tokens,
            "batch_size": options.batch_size, "samples": options.samples}


def fitness(config: ExperimentConfig):
    """The run's `evo_sft.fitness.Fitness`."""
    from evo_sft.fitness import make_fitness

    return make_fitness(config.evolution.fitness, **fitness_options(config))


def hp_config(config: ExperimentConfig) -> HyperparameterConfig:
    """The search space: each mutable hyperparameter's range (type, scale, multiple) or choices
    (numbers sorted, so that neighbours are the next smaller and larger)."""
    def parameter(name, r):
        hyperparameter = HYPERPARAMETERS[name]
        if r.choices is not None:
            return RLChoice(tuple(r.choices if hyperparameter.categorical else sorted(r.choices)))
        return RLParameter(min=r.min, max=r.max, dtype=hyperparameter.type, scale=r.scale or hyperparameter.scale,
                           multiple_of=r.multiple_of or 1)

    return HyperparameterConfig(**{name: parameter(name, r) for name, r in config.evolution.hyperparameters.items()})


def selection_and_mutations(config: ExperimentConfig) -> tuple[TournamentSelection | TruncationSelection, Mutations]:
    evolution, size = config.evolution, config.population.size
    if evolution.selection == "truncation":
        selection = TruncationSelection(evolution.truncation_quantile, size, eval_loop=evolution.eval_loop)
    else:
        selection = TournamentSelection(evolution.tournament_size, evolution.elitism, size, eval_loop=evolution.eval_loop,
                                        replace_quantile=evolution.replace_quantile)
    m = evolution.mutation
    mutations = Mutations(no_mutation=m.no_mutation, rl_hp=m.rl_hp, mutate_elite=m.mutate_elite,
                          explore=Explore(tuple(m.explore.perturb_factors), m.explore.resample_probability,
                                          m.explore.every),
                          guide=GuidedExplore(m.guide.kappa, m.guide.window) if m.guide else None)
    return selection, mutations


def founder_hyperparameters(config: ExperimentConfig) -> list[dict]:
    """The founders' hyperparameters, as `evolution.founders` says: a Latin hypercube over every
    searched hyperparameter (seeded), each at the config's `agent.<name>`, or the config's with the
    learning rate drawn (log-uniform) for every slot but 0."""
    start, size = founder_values(config), config.population.size
    space = hp_config(config)
    rng = np.random.default_rng([config.seed, 0xF0])
    if config.evolution.founders == "spread":
        return latin_hypercube(space, start, size, rng, multiples(config))
    if config.evolution.founders == "config" or "lr" not in space:
        return [dict(start) for _ in range(size)]
    lrs = [config.agent.lr] + [space["lr"].sample(rng) for _ in range(size - 1)]
    return [{**start, "lr": value} for value in lrs]


def multiples(config: ExperimentConfig) -> dict[str, int]:
    """What an integer hyperparameter must be a multiple of, besides its range's own."""
    micro = config.agent.micro_batch_size_per_gpu
    return {"batch_size": micro} if micro else {}


def tokens_per_row(split: dict) -> float:
    """The mean supervised tokens of a tokenised split's rows (labels are shifted by one, so a row
    of p prompt tokens and n tokens in all supervises n - p)."""
    return float(np.mean([len(ids) - prompt for ids, prompt in zip(split["input_ids"], split["prompt_lengths"])]))


def generation_tokens(config: ExperimentConfig, prepared: dict) -> int:
    """What one member trains on in a generation at the config's batch size: the supervised tokens
    of steps_per_generation steps of agent.batch_size rows, at the training rows' mean (with
    `evolution.interval: tokens`, every member's share, whatever its batch size)."""
    rows = config.evolution.steps_per_generation * config.agent.batch_size
    return math.ceil(rows * tokens_per_row(prepared["train"]))


def local_hosts(config: ExperimentConfig, model_path: str, prepared: dict, founders: list[dict]) -> list:
    """Every slot's host in this process, `population.members_per_actor` to a base model."""
    from evo_sft.population.hosting import local_hosts

    return local_hosts(member_recipe(config, model_path), prepared, founders, config.population.members_per_actor)


def controller(config: ExperimentConfig, population, prepared: dict, **observing):
    """The run's controller over `population`: its search space, selection, mutation, seed, budget
    and interval (`evolution.interval: tokens` gives every member the same tokens a generation);
    `observing` holds what watches it (observers, checkpointer, save_elite, progress)."""
    from evo_sft.controller import Controller

    selection, mutations = selection_and_mutations(config)
    evolution = config.evolution
    return Controller(population, hp_config(config), evolution.steps_per_generation, config.seed,
                      selection=selection, mutations=mutations, micro_batch_size=config.agent.micro_batch_size_per_gpu,
                      token_budget=evolution.token_budget,
                      generation_tokens=generation_tokens(config, prepared) if evolution.interval == "tokens" else None,
                      **observing)

