"""Experiment configuration as data: nested dataclasses loaded from one YAML file.

`config_from_dict` checks every value against the dataclass annotations with one
generic walker, then `_validate` checks the rules that involve values (ranges,
bounds, divisibility). Every error is a one-line ConfigError naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from evo_sft.fitness import FITNESSES, load_function
from evo_sft.hyperparameters import HYPERPARAMETERS, unknown


class ConfigError(ValueError):
    """An invalid experiment config; the one-line message names the dotted key."""


@dataclass
class ModelConfig:
    name: str = "demo"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    source: str = "demo"
    prompt_column: str = "prompt"
    response_column: str = "response"
    train_split: str = "train"
    test_split: str | None = None
    test_size: int | float = 0.1
    max_length: int = 256
    num_rows: int = 2000


@dataclass
class LoraConfig:
    r: int = 8  # the founders' lora_r, lora_alpha and lora_dropout (evo_sft.hyperparameters)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class AgentSettings:
    micro_batch_size_per_gpu: int | None = None
    update_epochs: int = 1
    gradient_checkpointing: bool = False
    use_liger_loss: bool = False
    packing: bool | None = None  # padding-free packed micro-batches; None: on with a GPU
    compile_layers: bool | None = None  # torch.compile decoder layers and loss chunks; None: on with packing on a GPU
    # The learning-rate schedule (`scheduler`, `warmup_steps` are hyperparameters): a cosine or
    # linear one decays to min_lr_ratio * lr over schedule_steps optimizer steps (None: the run's).
    schedule_steps: int | None = None
    min_lr_ratio: float = 0.0


# `agent.<name>` for every hyperparameter of evo_sft.hyperparameters set there: the founders' values.
AgentConfig = dataclasses.make_dataclass(
    "AgentConfig", [(h.name, h.type, field(default=h.default)) for h in HYPERPARAMETERS.values()
                    if h.key == f"agent.{h.name}"],
    bases=(AgentSettings,))


@dataclass
class PopulationConfig:
    size: int = 4
    backend: Literal["ray", "local"] = "ray"
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    members_per_actor: int = 1
    step_together: bool = True  # members on one base model share each forward/backward where they can
    # Processes one member trains on (ray backend, one node), each with num_gpus (1) or none (CPU,
    # gloo): data parallel, the frozen decoder sharded (FSDP2), the adapter whole on each.
    gpus_per_member: int = 1


@dataclass
class ExploreConfig:
    """PBT's explore step (evo_sft.evolution.Explore): perturb by one of the factors, or with
    `resample_probability` draw from the range (or choices) anew."""

    perturb_factors: list[float] = field(default_factory=lambda: [0.8, 1.2])
    resample_probability: float = 0.25
    every: bool = False  # explore every searched hyperparameter of a mutated member at once (PBT), not one


@dataclass
class GuideConfig:
    """Model-guided mutation (evo_sft.evolution.GuidedExplore, PB2's idea): a Gaussian process of
    the fitness members gained over the last `window` generations picks a mutated member's
    hyperparameters by its upper confidence bound (mean + kappa x standard deviation)."""

    kappa: float = 1.0
    window: int = 3


@dataclass
class MutationConfig:
    no_mutation: float = 0.4
    rl_hp: float = 0.6
    mutate_elite: bool = True
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    guide: GuideConfig | None = None


@dataclass
class SearchRange:
    """Where a mutable hyperparameter may move: `min` and `max` (numbers; `scale`, default the
    hyperparameter's own, is how resampled values spread over them; an integer one may keep to
    multiples of `multiple_of`), or a list of `choices` (a move goes to a neighbouring one)."""

    min: int | float | None = None
    max: int | float | None = None
    scale: Literal["linear", "log"] | None = None
    multiple_of: int | None = None
    choices: list[int | float | str] | None = None


def default_search_space() -> dict[str, SearchRange]:
    return {"lr": SearchRange(1.0e-6, 1.0e-2), "batch_size": SearchRange(4, 64)}


@dataclass
class FitnessOptions:
    """How `evolution.fitness` is scored. Fitnesses that generate (all but test_loss) score greedy
    responses to the first `eval_rows` rows of the fixed test set; the test loss is always over
    the whole test set."""

    eval_rows: int | None = None  # test rows a generating fitness scores each generation; null: all
    full_test_at_end: bool = False  # multi-fidelity: score the last population on the whole test set at the end
    max_new_tokens: int = 32  # per generated response
    batch_size: int = 16  # prompts generated together
    samples: int = 4  # first test prompts whose outputs are logged each generation and shown in the summary
    reference_column: str | None = None  # what generations are compared with; null: data.response_column


SELECTIONS = ("tournament", "truncation")
FOUNDERS = ("spread", "config", "random_lr")
INTERVALS = ("tokens", "steps")


@dataclass
class EvolutionConfig:
    generations: int = 5
    steps_per_generation: int = 10
    # What members train between selections: "tokens", the same supervised tokens each (what
    # steps_per_generation steps of agent.batch_size rows hold on average), so that a smaller
    # batch takes more steps; or "steps", the same optimizer steps each (AgileRL's).
    interval: str = "tokens"
    # The founders' hyperparameters: "spread", a Latin hypercube over every searched one;
    # "config", all at agent.<name>; "random_lr", slot 0 at agent.lr and the others' lr drawn.
    founders: str = "spread"
    # Supervised training tokens the whole population may train on; the run ends once they are
    # spent, whatever `generations` says (evo_sft.controller.Controller). null: no budget.
    token_budget: int | None = None
    selection: str = "tournament"  # AgileRL's tournament with elitism, or "truncation" (PBT's exploit step)
    tournament_size: int = 2
    elitism: bool = True
    truncation_quantile: float = 0.25  # with truncation: the bottom quantile is replaced by clones of the top one
    # With tournament: null, every non-elite slot holds a tournament (AgileRL's); a quantile q, only
    # the bottom q of the population lose their slots, each to the winner of a tournament among the others.
    replace_quantile: float | None = None
    eval_loop: int = 1
    fitness: str = "test_loss"  # a name in evo_sft.fitness.FITNESSES, or a user function module:function
    fitness_options: FitnessOptions = field(default_factory=FitnessOptions)
    mutation: MutationConfig = field(default_factory=MutationConfig)
    # The hyperparameters that mutate, each within its range; the others stay at agent.<name>.
    hyperparameters: dict[str, SearchRange] = field(default_factory=default_search_space)


@dataclass
class TrackingConfig:
    uri: str | None = None
    experiment: str | None = None


@dataclass
class CheckpointConfig:
    every: int = 1
    keep: int = 3


@dataclass
class RayConfig:
    address: str | None = None
    init: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    name: str = "evo-sft"
    seed: int = 42
    run_dir: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    population: PopulationConfig = field(default_factory=PopulationConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir if self.run_dir is not None else Path("runs") / self.name)


# ---------------------------------------------------------------------------
# Type walker


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return tp.__name__


def _convert(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        options = tuple(o for o in options if o is not type(None))
        if len(options) == 1:
            return _convert(options[0], value, key)
        for option in options:
            try:
                return _convert(option, value, key)
            except ConfigError:
                pass
        expected = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{key}: expected {expected}, got {type(value).__name__} {_show(value)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected list, got {type(value).__name__} {_show(value)}")
        (item_type,) = typing.get_args(tp)
        return [_convert(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected mapping with str keys, got {_show(value)}")
        _, value_type = typing.get_args(tp)
        return {k: _convert(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected finite float, got {_show(value)}")
            return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {_show(value)}")


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected mapping, got {type(data).__name__} {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean {_join(prefix, close[0])!r}?)" if close else f" (valid keys: {', '.join(fields)})"
            raise ConfigError(f"unknown key {_join(prefix, name)!r}{hint}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], _join(prefix, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing key {_join(prefix, name)!r}")
    return cls(**values)


# ---------------------------------------------------------------------------
# Rules on values


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _validate(cfg: ExperimentConfig) -> None:
    _require(cfg.name != "", "name", "must not be empty")
    _require(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    _require(cfg.model.name != "", "model.name", "must not be empty")

    data = cfg.data
    if isinstance(data.test_size, int):
        _require(data.test_size >= 1, "data.test_size", f"an int test_size counts rows and must be >= 1, got {data.test_size}")
    else:
        _require(0 < data.test_size < 1, "data.test_size", f"a float test_size is a fraction in (0, 1), got {data.test_size}")
    _require(data.max_length >= 8, "data.max_length", f"must be >= 8, got {data.max_length}")
    _require(data.num_rows >= 1, "data.num_rows", f"must be >= 1, got {data.num_rows}")

    if cfg.lora is not None:
        _require(len(cfg.lora.target_modules) > 0, "lora.target_modules", "must not be empty")

    agent = cfg.agent
    start = founder_values(cfg)
    for name, value in start.items():
        problem = HYPERPARAMETERS[name].problem(value)
        _require(problem is None, HYPERPARAMETERS[name].key, problem)
    _require(agent.update_epochs >= 1, "agent.update_epochs", f"must be >= 1, got {agent.update_epochs}")
    if agent.schedule_steps is not None:
        _require(agent.schedule_steps >= 1, "agent.schedule_steps", f"must be >= 1, got {agent.schedule_steps}")
        _require(agent.warmup_steps <= agent.schedule_steps, "agent.warmup_steps",
                 f"{agent.warmup_steps} exceeds agent.schedule_steps {agent.schedule_steps}")
    _require(0 <= agent.min_lr_ratio <= 1, "agent.min_lr_ratio", f"must be in [0, 1], got {agent.min_lr_ratio}")

    population = cfg.population
    _require(population.size >= 1, "population.size", f"must be >= 1, got {population.size}")
    _require(population.num_gpus >= 0, "population.num_gpus", f"must be >= 0, got {population.num_gpus}")
    _require(population.num_cpus >= 0, "population.num_cpus", f"must be >= 0, got {population.num_cpus}")
    _require(population.members_per_actor >= 1, "population.members_per_actor", f"must be >= 1, got {population.members_per_actor}")
    _validate_gpus_per_member(population)

    evolution = cfg.evolution
    _require(evolution.generations >= 1, "evolution.generations", f"must be >= 1, got {evolution.generations}")
    _require(evolution.steps_per_generation >= 1, "evolution.steps_per_generation", f"must be >= 1, got {evolution.steps_per_generation}")
    _require(evolution.token_budget is None or evolution.token_budget >= 1, "evolution.token_budget",
             f"must be >= 1 or null (no budget), got {evolution.token_budget}")
    _require(evolution.tournament_size >= 1, "evolution.tournament_size", f"must be >= 1, got {evolution.tournament_size}")
    _require(
        evolution.tournament_size <= population.size,
        "evolution.tournament_size",
        f"{evolution.tournament_size} exceeds population.size {population.size}",
    )
    _require(evolution.selection in SELECTIONS, "evolution.selection",
             f"must be one of {', '.join(SELECTIONS)}, got {evolution.selection!r}")
    for key, allowed in (("interval", INTERVALS), ("founders", FOUNDERS)):
        value = getattr(evolution, key)
        _require(value in allowed, f"evolution.{key}", f"must be one of {', '.join(allowed)}, got {value!r}")
    _require(0 < evolution.truncation_quantile <= 0.5, "evolution.truncation_quantile",
             f"must be in (0, 0.5], got {evolution.truncation_quantile}")
    if evolution.replace_quantile is not None:
        _require(0 < evolution.replace_quantile <= 0.5, "evolution.replace_quantile",
                 f"must be in (0, 0.5] or null, got {evolution.replace_quantile}")
        _require(evolution.selection == "tournament", "evolution.replace_quantile",
                 f"applies to tournament selection; evolution.selection is {evolution.selection!r}")
        _require(evolution.tournament_size < population.size, "evolution.tournament_size",
                 f"{evolution.tournament_size} members drawn from the {population.size - 1} others of a replaced "
                 f"member: at most {population.size - 1} with evolution.replace_quantile")
    _validate_fitness(evolution.fitness, evolution.fitness_options)
    _require(evolution.eval_loop >= 1, "evolution.eval_loop", f"must be >= 1, got {evolution.eval_loop}")
    mutation = evolution.mutation
    for name in ("no_mutation", "rl_hp"):
        value = getattr(mutation, name)
        _require(value >= 0, f"evolution.mutation.{name}", f"must be >= 0, got {value}")
    _require(mutation.no_mutation + mutation.rl_hp > 0, "evolution.mutation", "no_mutation + rl_hp must be > 0")

    explore = mutation.explore
    _require(len(explore.perturb_factors) > 0, "evolution.mutation.explore.perturb_factors", "must not be empty")
    for i, factor in enumerate(explore.perturb_factors):
        _require(factor > 0 and factor != 1, f"evolution.mutation.explore.perturb_factors[{i}]",
                 f"must be > 0 and other than 1, got {factor}")
    _require(0 <= explore.resample_probability <= 1, "evolution.mutation.explore.resample_probability",
             f"must be in [0, 1], got {explore.resample_probability}")
    if mutation.guide is not None:
        _require(mutation.guide.kappa >= 0, "evolution.mutation.guide.kappa", f"must be >= 0, got {mutation.guide.kappa}")
        _require(mutation.guide.window >= 1, "evolution.mutation.guide.window",
                 f"must be >= 1, got {mutation.guide.window}")

    micro = agent.micro_batch_size_per_gpu
    if micro is not None:
        _require(micro >= 1, "agent.micro_batch_size_per_gpu", f"must be >= 1, got {micro}")
    for name, bounds in evolution.hyperparameters.items():
        _validate_search_range(cfg, name, bounds)
    dropout = evolution.hyperparameters.get("lora_dropout")
    if dropout is not None and population.step_together and population.members_per_actor > 1:
        _require(max(dropout.choices or [dropout.max]) == 0, "evolution.hyperparameters.lora_dropout",
                 "members stepped together (population.step_together, members_per_actor > 1) train without "
                 "LoRA dropout; set population.step_together: false to search it")
    _require(
        micro is None or agent.batch_size % micro == 0,
        "agent.batch_size",
        f"{agent.batch_size} is not divisible by agent.micro_batch_size_per_gpu {micro}",
    )

    _require(cfg.checkpoint.every >= 1, "checkpoint.every", f"must be >= 1, got {cfg.checkpoint.every}")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}")


def _validate_gpus_per_member(population: PopulationConfig) -> None:
    k, key = population.gpus_per_member, "population.gpus_per_member"
    _require(k >= 1, key, f"must be >= 1, got {k}")
    if k == 1:
        return
    _require(population.backend == "ray", key, f"{k} processes per member need population.backend: ray")
    _require(population.members_per_actor == 1, key,
             f"{k} processes per member cannot share a base model with other members "
             f"(population.members_per_actor {population.members_per_actor}); set members_per_actor: 1")
    _require(population.num_gpus in (0, 1), key,
             f"each of a member's {k} processes takes a whole GPU (population.num_gpus: 1) or none "
             f"(num_gpus: 0, CPU), got population.num_gpus {population.num_gpus}")


def _validate_fitness(name: str, options: FitnessOptions) -> None:
    if name not in FITNESSES:
        try:
            load_function(name)
        except ValueError as error:
            raise ConfigError(f"evolution.fitness: {error}") from None
    key = "evolution.fitness_options"
    for option in ("max_new_tokens", "batch_size"):
        value = getattr(options, option)
        _require(value >= 1, f"{key}.{option}", f"must be >= 1, got {value}")
    _require(options.samples >= 0, f"{key}.samples", f"must be >= 0, got {options.samples}")
    if options.eval_rows is not None:
        _require(options.eval_rows >= 1, f"{key}.eval_rows", f"must be >= 1 or null (all rows), got {options.eval_rows}")
        _require(name != "test_loss", f"{key}.eval_rows",
                 "the test_loss fitness always scores the whole test set; eval_rows is for fitnesses that generate")
    _require(not options.full_test_at_end or options.eval_rows is not None, f"{key}.full_test_at_end",
             "needs eval_rows: without it every generation already scores the whole test set")


def _validate_search_range(cfg: ExperimentConfig, name: str, bounds: SearchRange) -> None:
    key = f"evolution.hyperparameters.{name}"
    if name not in HYPERPARAMETERS:
        close = difflib.get_close_matches(name, list(HYPERPARAMETERS), n=1)
        raise ConfigError(f"{key}: {unknown(name)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    hyperparameter = HYPERPARAMETERS[name]
    _require(hyperparameter.key.split(".")[0] != "lora" or cfg.lora is not None, key,
             f"{name} is a LoRA setting and lora is null (full fine-tuning)")
    start, start_key = founder_values(cfg)[name], hyperparameter.key
    micro = cfg.agent.micro_batch_size_per_gpu
    if bounds.choices is not None:
        _require(bounds.min is None and bounds.max is None and bounds.scale is None and bounds.multiple_of is None,
                 key, "give either choices or min and max (with scale, multiple_of), not both")
        _require(len(bounds.choices) > 0, f"{key}.choices", "must not be empty")
        _require(len(set(bounds.choices)) == len(bounds.choices), f"{key}.choices",
                 f"must be distinct, got {bounds.choices}")
        for i, choice in enumerate(bounds.choices):
            problem = hyperparameter.problem(choice)
            _require(problem is None, f"{key}.choices[{i}]", problem)
            _require(name != "batch_size" or micro is None or choice % micro == 0, f"{key}.choices[{i}]",
                     f"{choice} is not divisible by agent.micro_batch_size_per_gpu {micro}")
        _require(start in bounds.choices, start_key, f"{start} is not one of {key}.choices {bounds.choices}")
        return
    _require(not hyperparameter.categorical, key,
             f"{name} takes one of {', '.join(hyperparameter.choices)}: give choices")
    for side in ("min", "max"):
        value = getattr(bounds, side)
        if value is None:
            raise ConfigError(f"missing key '{key}.{side}' (give min and max, or choices)")
        problem = hyperparameter.problem(value)
        _require(problem is None, f"{key}.{side}", problem)
    _require(bounds.min <= bounds.max, key, f"min {bounds.min} > max {bounds.max}")
    _require((bounds.scale or hyperparameter.scale) != "log" or bounds.min > 0, f"{key}.min",
             f"a log scale needs min > 0, got {bounds.min}")
    steps = {}  # what an integer must be a multiple of, by the key that says so
    if bounds.multiple_of is not None:
        _require(hyperparameter.type is int, f"{key}.multiple_of",
                 f"applies to integer hyperparameters; {name} is not one")
        _require(bounds.multiple_of >= 1, f"{key}.multiple_of", f"must be >= 1, got {bounds.multiple_of}")
        _require(start % bounds.multiple_of == 0, start_key,
                 f"{start} is not a multiple of {key}.multiple_of {bounds.multiple_of}")
        steps[f"{key}.multiple_of"] = bounds.multiple_of
    if name == "batch_size" and micro is not None:
        steps["agent.micro_batch_size_per_gpu"] = micro
    step = math.lcm(*steps.values()) if steps else 1
    _require(not steps or -(-bounds.min // step) * step <= bounds.max, key,
             f"[{bounds.min}, {bounds.max}] contains no multiple of "
             + " and ".join(f"{source} {value}" for source, value in steps.items()))
    _require(bounds.min <= start <= bounds.max, start_key, f"{start} outside {key} [{bounds.min}, {bounds.max}]")


def founder_values(cfg: ExperimentConfig) -> dict[str, Any]:
    """The founders' value of each hyperparameter, read at its config key (`agent.lr`,
    `lora.r`, ...); the LoRA ones only where the run has LoRA."""
    values = {}
    for name, hyperparameter in HYPERPARAMETERS.items():
        section, attribute = hyperparameter.key.split(".")
        holder = getattr(cfg, section)
        if holder is not None:
            values[name] = getattr(holder, attribute)
    return values


def _renamed_lr_schedule(d: dict[str, Any]) -> None:
    """`agent.lr_schedule` (before 0.3: warm-up then cosine decay, where given) is
    `agent.scheduler: cosine`, `agent.warmup_steps`, `agent.schedule_steps` (its total_steps) and
    `agent.min_lr_ratio` now; configs saved in older run folders still load."""
    agent = d.get("agent")
    if not isinstance(agent, dict) or "lr_schedule" not in agent:
        return
    agent = d["agent"] = dict(agent)
    schedule = agent.pop("lr_schedule")
    if schedule is None:
        return
    if not isinstance(schedule, dict):
        raise ConfigError(f"agent.lr_schedule: expected mapping, got {_show(schedule)}")
    renamed = {"scheduler": "cosine", **{"schedule_steps" if k == "total_steps" else k: v for k, v in schedule.items()}}
    for name in renamed:
        if name in agent:
            raise ConfigError(f"agent.lr_schedule: renamed to agent.scheduler, agent.warmup_steps, "
                              f"agent.schedule_steps and agent.min_lr_ratio; agent.{name} is given too")
    agent.update(renamed)


def _renamed_bounds(d: dict[str, Any]) -> None:
    """`evolution.bounds` (before 0.2: lr and batch_size, each with defaults) is
    `evolution.hyperparameters` now; configs saved in older run folders still load."""
    evolution = d.get("evolution")
    if not isinstance(evolution, dict) or "bounds" not in evolution:
        return
    if "hyperparameters" in evolution:
        raise ConfigError("evolution.bounds: renamed to evolution.hyperparameters; give only the latter")
    bounds = evolution.pop("bounds") or {}
    if not isinstance(bounds, dict):
        raise ConfigError(f"evolution.bounds: expected mapping, got {_show(bounds)}")
    defaults = {name: dataclasses.asdict(r) for name, r in default_search_space().items()}
    evolution["hyperparameters"] = {**defaults, **{name: {**defaults.get(name, {}), **(value or {})}
                                                  for name, value in bounds.items()}}


# ---------------------------------------------------------------------------
# Public entry points


def config_from_dict(d: dict[str, Any]) -> ExperimentConfig:
    d = dict(d)
    if isinstance(d.get("evolution"), dict):
        d["evolution"] = dict(d["evolution"])
    _renamed_bounds(d)
    _renamed_lr_schedule(d)
    cfg = _build(ExperimentConfig, d, "")
    _validate(cfg)
    return cfg


def apply_override(d: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: override value {text!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    *parents, last = key.split(".")
    node = d
    for i, part in enumerate(parents):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parents[: i + 1])}: is not a section, cannot set {key!r}")
    node[last] = value


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file, apply `dotted.key=value` overrides, validate.

    Override values are parsed with yaml.safe_load. Setting a key inside a section
    that is null (e.g. `lora.r=4` with `lora: null`) starts that section from its defaults.
    An empty file (nothing but comments, or nothing) is the defaults; stderr says so.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    empty = d is None
    if empty:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(d).__name__}")
    for override in overrides:
        apply_override(d, override)
    config = config_from_dict(d)
    if empty:
        print(f"{path} is empty: running the defaults{' with the --set overrides' if overrides else ''} "
              f"(experiment {config.name!r})", file=sys.stderr)
    return config


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; non-str values as JSON, so `key=value` is a valid override."""
    flat = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, dotted))
        else:
            flat[dotted] = value if isinstance(value, str) else json.dumps(value)
    return flat
