import json
from pathlib import Path

import pytest
import yaml

from evo_sft.config import (
    ConfigError,
    ExperimentConfig,
    LoraConfig,
    config_from_dict,
    founder_values,
    flatten_config,
    load_config,
)


def test_defaults():
    cfg = config_from_dict({})
    assert cfg == ExperimentConfig()
    assert cfg.name == "evo-sft" and cfg.seed == 42
    assert cfg.model.name == "demo" and cfg.model.dtype == "float32"
    assert cfg.lora == LoraConfig() and cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.agent.lr == 1e-4 and cfg.agent.scheduler == "constant" and cfg.agent.schedule_steps is None
    assert cfg.population.backend == "ray" and cfg.population.size == 4
    assert cfg.evolution.mutation.rl_hp == 0.6
    assert cfg.evolution.hyperparameters["lr"].min == 1e-6 and cfg.evolution.hyperparameters["batch_size"].max == 64
    assert cfg.ray.init == {}


def test_helpers_resolve_nulls():
    cfg = config_from_dict({"name": "exp"})
    assert cfg.resolved_run_dir() == Path("runs/exp")
    cfg = config_from_dict({"name": "exp", "run_dir": "/tmp/r"})
    assert cfg.resolved_run_dir() == Path("/tmp/r")


FULL = {
    "name": "sweep",
    "seed": 7,
    "run_dir": "out",
    "model": {"name": "org/model", "dtype": "bfloat16", "attn_implementation": "eager", "trust_remote_code": True},
    "tokenizer": "org/tok",
    "data": {"source": "d.jsonl", "test_split": "test", "test_size": 50, "max_length": 512},
    "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": "all-linear"},
    "agent": {
        "lr": 3e-4,
        "batch_size": 32,
        "micro_batch_size_per_gpu": 8,
        "scheduler": "cosine", "warmup_steps": 10, "schedule_steps": 100, "min_lr_ratio": 0.1,
    },
    "population": {"size": 8, "backend": "local", "num_gpus": 0.5, "members_per_actor": 2, "step_together": False},
    "evolution": {
        "generations": 3, "tournament_size": 3,
        "mutation": {"mutate_elite": False, "explore": {"perturb_factors": [0.5, 2.0], "resample_probability": 0.1}},
        "hyperparameters": {
            "lr": {"min": 1e-5, "max": 1e-3}, "batch_size": {"min": 8, "max": 64},
            "weight_decay": {"min": 0.0, "max": 0.1}, "max_grad_norm": {"min": 0.1, "max": 10.0},
            "warmup_steps": {"min": 0, "max": 50, "multiple_of": 10},
            "scheduler": {"choices": ["constant", "cosine", "linear"]},
            "lora_r": {"choices": [2, 4, 8, 16]}, "lora_alpha": {"min": 4, "max": 32, "scale": "log"},
            "lora_dropout": {"min": 0.0, "max": 0.2},
        },
    },
    "checkpoint": {"every": 2, "keep": 1},
    "ray": {"address": "auto", "init": {"namespace": "evo", "runtime_env": {"env_vars": {"A": "1"}}}},
}


def test_round_trip_through_dict_json_and_yaml(tmp_path):
    cfg = config_from_dict(FULL)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert config_from_dict(d) == cfg
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(d))
    assert load_config(path) == cfg
    assert cfg.data.test_size == 50 and isinstance(cfg.data.test_size, int)
    assert cfg.population.num_cpus == 1.0


def test_full_fine_tuning_with_null_lora():
    assert config_from_dict({"lora": None}).lora is None
    assert config_from_dict({"lora": {}}).lora == LoraConfig()


def test_int_accepted_for_float_and_scientific_strings_parsed():
    cfg = config_from_dict({"population": {"num_gpus": 1}, "agent": {"lr": "1e-3"}})
    assert cfg.population.num_gpus == 1.0 and isinstance(cfg.population.num_gpus, float)
    assert cfg.agent.lr == 1e-3


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: base\npopulation:\n  size: 4\nlora: null\n")
    cfg = load_config(
        path,
        [
            "population.size=8",
            "evolution.hyperparameters.lr.min=1e-5",
            "evolution.hyperparameters.lr.max=1e-2",
            "agent.gradient_checkpointing=true",
            "lora.target_modules=[q_proj, v_proj]",
            "tracking.uri=null",
            "ray.init.num_cpus=4",
            "name=a=b",
        ],
    )
    assert cfg.population.size == 8
    assert cfg.evolution.hyperparameters["lr"].min == 1e-5
    assert cfg.agent.gradient_checkpointing is True
    assert cfg.lora == LoraConfig(target_modules=["q_proj", "v_proj"])
    assert cfg.ray.init == {"num_cpus": 4}
    assert cfg.name == "a=b"


def test_flatten_config_values_are_valid_overrides(tmp_path):
    cfg = config_from_dict(FULL)
    flat = flatten_config(cfg.to_dict())
    assert flat["population.size"] == "8"
    assert flat["lora.target_modules"] == "all-linear"
    assert flat["tracking.uri"] == "null"
    assert flat["model.trust_remote_code"] == "true"
    assert flat["ray.init.runtime_env.env_vars.A"] == "1"
    assert flat["agent.schedule_steps"] == "100"
    assert flat["evolution.hyperparameters.scheduler.choices"] == '["constant", "cosine", "linear"]'
    assert all(isinstance(v, str) for v in flat.values())
    assert flatten_config(config_from_dict({}).to_dict())["ray.init"] == "{}"
    path = tmp_path / "empty.yaml"
    path.write_text("")
    overrides = [f"{k}={v}" for k, v in flat.items() if not k.startswith("ray.init")]
    assert load_config(path, overrides).to_dict() == {**cfg.to_dict(), "ray": {"address": "auto", "init": {}}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("population.szie=8", "unknown key 'population.szie' (did you mean 'population.size'?)"),
        ("populaton.size=8", "unknown key 'populaton' (did you mean 'population'?)"),
        ("seed.value=1", "seed: is not a section"),
        ("population.size", "expected dotted.key=value"),
        ("population.size=[1", "population.size: override value"),
        ("population.size=abc", "population.size: expected int, got str 'abc'"),
    ],
)
def test_bad_overrides(tmp_path, override, message):
    path = tmp_path / "exp.yaml"
    path.write_text("seed: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_load_config_rejects_bad_yaml(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("a: [1\nb: 2\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_config(path)
    assert "\n" not in str(info.value)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def nested(key, value):
    d = value
    for part in reversed(key.split(".")):
        d = {part: d}
    return d


def merge(*dicts):
    out = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


INVALID = [
    # unknown keys, with suggestions at every level
    ({"nmae": "x"}, "unknown key 'nmae' (did you mean 'name'?)"),
    (nested("evolution.hyperparameters.lr.mni", 1.0), "unknown key 'evolution.hyperparameters.lr.mni' (did you mean 'evolution.hyperparameters.lr.min'?)"),
    ({"zzz": 1}, "unknown key 'zzz' (valid keys: name, seed"),
    (nested("evolution.hyperparameters.lr.zzzz", 1), "unknown key 'evolution.hyperparameters.lr.zzzz' (valid keys: min, max, scale, multiple_of, choices)"),
    # types
    (nested("population.size", "abc"), "population.size: expected int, got str 'abc'"),
    (nested("population.size", 2.0), "population.size: expected int, got float 2.0"),
    ({"seed": True}, "seed: expected int, got bool True"),
    (nested("agent.lr", True), "agent.lr: expected float, got bool True"),
    (nested("agent.lr", "fast"), "agent.lr: expected float, got str 'fast'"),
    (nested("agent.lr", float("nan")), "agent.lr: expected finite float"),
    (nested("model.trust_remote_code", "yes"), "model.trust_remote_code: expected bool, got str 'yes'"),
    ({"name": 3}, "name: expected str, got int 3"),
    ({"tokenizer": 3}, "tokenizer: expected str, got int 3"),
    ({"evolution": [1]}, "evolution: expected mapping, got list [1]"),
    (nested("lora.target_modules", [1]), "lora.target_modules: expected list[str] or str"),
    (nested("ray.init", [1]), "ray.init: expected mapping"),
    (nested("data.test_size", True), "data.test_size: expected int or float, got bool True"),
    # enums
    (nested("model.dtype", "fp16"), "model.dtype: expected one of 'float32', 'bfloat16', 'float16', got 'fp16'"),
    (nested("model.dtype", "bfloat"), "model.dtype: expected one of 'float32', 'bfloat16', 'float16', got 'bfloat' (did you mean 'bfloat16'?)"),
    (nested("model.attn_implementation", "flash"), "model.attn_implementation: expected one of"),
    (nested("population.backend", "dask"), "population.backend: expected one of 'ray', 'local'"),
    # ranges
    ({"seed": -1}, "seed: must be >= 0"),
    (nested("data.test_size", 0.0), "data.test_size:"),
    (nested("data.test_size", 1.0), "data.test_size:"),
    (nested("data.test_size", 0), "data.test_size:"),
    (nested("data.max_length", 4), "data.max_length: must be >= 8"),
    (nested("data.num_rows", 0), "data.num_rows: must be >= 1"),
    (nested("lora.r", 0), "lora.r: must be >= 1"),
    (nested("lora.lora_dropout", 1.0), "lora.lora_dropout: must be < 1"),
    (nested("lora.target_modules", []), "lora.target_modules: must not be empty"),
    (nested("agent.max_grad_norm", 0), "agent.max_grad_norm: must be > 0"),
    (nested("agent.update_epochs", 0), "agent.update_epochs: must be >= 1"),
    (nested("agent", {"schedule_steps": 10, "warmup_steps": 11}), "agent.warmup_steps: 11 exceeds agent.schedule_steps 10"),
    (nested("agent.schedule_steps", 0), "agent.schedule_steps: must be >= 1"),
    (nested("agent.min_lr_ratio", 2.0), "agent.min_lr_ratio: must be in [0, 1]"),
    (nested("agent.scheduler", "step"), "agent.scheduler: must be one of constant, cosine, linear, got 'step'"),
    (nested("agent.warmup_steps", -1), "agent.warmup_steps: must be >= 0"),
    (nested("agent", {"lr_schedule": {"total_steps": 10}, "scheduler": "linear"}),
     "agent.lr_schedule: renamed to agent.scheduler"),
    (nested("population.size", 0), "population.size: must be >= 1"),
    (nested("population.num_gpus", -0.5), "population.num_gpus: must be >= 0"),
    (nested("population.num_cpus", -1), "population.num_cpus: must be >= 0"),
    (nested("population.members_per_actor", 0), "population.members_per_actor: must be >= 1"),
    (nested("population.gpus_per_member", 0), "population.gpus_per_member: must be >= 1, got 0"),
    (nested("population", {"gpus_per_member": 2, "members_per_actor": 2}),
     "population.gpus_per_member: 2 processes per member cannot share a base model with other members"),
    (nested("population", {"gpus_per_member": 2, "backend": "local"}),
     "population.gpus_per_member: 2 processes per member need population.backend: ray"),
    (nested("population", {"gpus_per_member": 2, "num_gpus": 0.5}),
     "population.gpus_per_member: each of a member's 2 processes takes a whole GPU"),
    (nested("evolution.generations", 0), "evolution.generations: must be >= 1"),
    (nested("evolution.steps_per_generation", 0), "evolution.steps_per_generation: must be >= 1"),
    (nested("evolution.tournament_size", 0), "evolution.tournament_size: must be >= 1"),
    (nested("evolution.tournament_size", 5), "evolution.tournament_size: 5 exceeds population.size 4"),
    (nested("evolution.eval_loop", 0), "evolution.eval_loop: must be >= 1"),
    (nested("evolution.mutation.no_mutation", -0.1), "evolution.mutation.no_mutation: must be >= 0"),
    (nested("evolution.mutation.rl_hp", -1), "evolution.mutation.rl_hp: must be >= 0"),
    (nested("evolution.mutation", {"no_mutation": 0, "rl_hp": 0}), "evolution.mutation: no_mutation + rl_hp must be > 0"),
    (nested("checkpoint.every", 0), "checkpoint.every: must be >= 1"),
    (nested("checkpoint.keep", 0), "checkpoint.keep: must be >= 1"),
    # bounds
    (nested("evolution.hyperparameters.lr", {"min": 0.0, "max": 1e-3}), "evolution.hyperparameters.lr.min: must be > 0"),
    (nested("evolution.hyperparameters.lr", {"min": 1e-2, "max": 1e-3}), "evolution.hyperparameters.lr: min 0.01 > max 0.001"),
    (nested("evolution.hyperparameters.batch_size", {"min": 0, "max": 64}), "evolution.hyperparameters.batch_size.min: must be >= 1"),
    (nested("evolution.hyperparameters.batch_size", {"min": 32, "max": 8}), "evolution.hyperparameters.batch_size: min 32 > max 8"),
    (nested("evolution.hyperparameters.lr", {"min": 1e-5}), "missing key 'evolution.hyperparameters.lr.max'"),
    (nested("evolution.hyperparameters.lr", {"min": 1e-5, "max": 1e-3, "scale": "cubic"}),
     "evolution.hyperparameters.lr.scale: expected one of 'linear', 'log'"),
    (nested("evolution.hyperparameters.batch_size", {"min": 4.5, "max": 64}),
     "evolution.hyperparameters.batch_size.min: must be an integer, got 4.5"),
    (nested("evolution.hyperparameters.weight_decay", {"min": 0.0, "max": 0.1, "scale": "log"}),
     "evolution.hyperparameters.weight_decay.min: a log scale needs min > 0, got 0.0"),
    (nested("evolution.hyperparameters.momentum", {"min": 0.1, "max": 0.9}),
     "evolution.hyperparameters.momentum: unknown hyperparameter 'momentum' (known: lr, batch_size"),
    (nested("evolution.hyperparameters.wieght_decay", {"min": 0.0, "max": 0.1}), "(did you mean 'weight_decay'?)"),
    (nested("agent.weight_decay", -0.1), "agent.weight_decay: must be >= 0, got -0.1"),
    (nested("agent.lr", 0.1), "agent.lr: 0.1 outside evolution.hyperparameters.lr [1e-06, 0.01]"),
    (nested("agent.lr", 0.0), "agent.lr: must be > 0"),
    (nested("agent.batch_size", 2), "agent.batch_size: 2 outside evolution.hyperparameters.batch_size [4, 64]"),
    (nested("agent.batch_size", 0), "agent.batch_size: must be >= 1"),
    # micro-batch divisibility
    (nested("agent.micro_batch_size_per_gpu", 0), "agent.micro_batch_size_per_gpu: must be >= 1"),
    (nested("agent.micro_batch_size_per_gpu", 5), "agent.batch_size: 16 is not divisible by agent.micro_batch_size_per_gpu 5"),
    (
        merge(nested("agent.micro_batch_size_per_gpu", 16), nested("evolution.hyperparameters.batch_size", {"min": 17, "max": 31})),
        "evolution.hyperparameters.batch_size: [17, 31] contains no multiple of agent.micro_batch_size_per_gpu 16",
    ),
    (
        merge(nested("agent", {"micro_batch_size_per_gpu": 4, "batch_size": 12}),
              nested("evolution.hyperparameters.batch_size", {"min": 13, "max": 20, "multiple_of": 6})),
        "evolution.hyperparameters.batch_size: [13, 20] contains no multiple of "
        "evolution.hyperparameters.batch_size.multiple_of 6 and agent.micro_batch_size_per_gpu 4",
    ),
    # the wider search space: each hyperparameter needs bounds or choices the model can take
    (nested("evolution.hyperparameters.lora_r", {}), "missing key 'evolution.hyperparameters.lora_r.min' (give min and max, or choices)"),
    (nested("evolution.hyperparameters.scheduler", {"min": 0, "max": 1}),
     "evolution.hyperparameters.scheduler: scheduler takes one of constant, cosine, linear: give choices"),
    (nested("evolution.hyperparameters.scheduler", {"choices": ["constant", "cosine", "exponential"]}),
     "evolution.hyperparameters.scheduler.choices[2]: must be one of constant, cosine, linear, got 'exponential'"),
    (nested("evolution.hyperparameters.scheduler", {"choices": ["cosine", "linear"]}),
     "agent.scheduler: constant is not one of evolution.hyperparameters.scheduler.choices"),
    (nested("evolution.hyperparameters.lora_r", {"choices": [0, 8]}), "evolution.hyperparameters.lora_r.choices[0]: must be >= 1, got 0"),
    (nested("evolution.hyperparameters.lora_r", {"min": 0, "max": 8}), "evolution.hyperparameters.lora_r.min: must be >= 1, got 0"),
    (nested("evolution.hyperparameters.lora_r", {"choices": [4, 8, 4]}), "evolution.hyperparameters.lora_r.choices: must be distinct"),
    (nested("evolution.hyperparameters.lora_r", {"choices": []}), "evolution.hyperparameters.lora_r.choices: must not be empty"),
    (nested("evolution.hyperparameters.lora_r", {"choices": [4, 16]}), "lora.r: 8 is not one of evolution.hyperparameters.lora_r.choices [4, 16]"),
    (nested("evolution.hyperparameters.lora_r", {"choices": [4, 8], "min": 4}),
     "evolution.hyperparameters.lora_r: give either choices or min and max"),
    (nested("evolution.hyperparameters.lora_r", {"choices": [4.5, 8]}), "evolution.hyperparameters.lora_r.choices[0]: must be an integer"),
    (nested("evolution.hyperparameters.lora_dropout", {"min": 0.0, "max": 1.0}),
     "evolution.hyperparameters.lora_dropout.max: must be < 1, got 1.0"),
    (nested("evolution.hyperparameters.lora_alpha", {"min": 0.0, "max": 32}), "evolution.hyperparameters.lora_alpha.min: must be > 0"),
    (merge({"lora": None}, nested("evolution.hyperparameters.lora_r", {"min": 4, "max": 16})),
     "evolution.hyperparameters.lora_r: lora_r is a LoRA setting and lora is null (full fine-tuning)"),
    (merge({"lora": None}, nested("evolution.hyperparameters.lora_alpha", {"min": 4, "max": 16})),
     "evolution.hyperparameters.lora_alpha: lora_alpha is a LoRA setting and lora is null"),
    (merge(nested("population.members_per_actor", 2), nested("evolution.hyperparameters.lora_dropout", {"min": 0.0, "max": 0.1})),
     "evolution.hyperparameters.lora_dropout: members stepped together"),
    (merge(nested("population.members_per_actor", 2), nested("evolution.hyperparameters.lora_dropout", {"choices": [0.0, 0.1]})),
     "evolution.hyperparameters.lora_dropout: members stepped together"),
    (nested("evolution.hyperparameters.lr", {"min": 1e-5, "max": 1e-3, "multiple_of": 2}),
     "evolution.hyperparameters.lr.multiple_of: applies to integer hyperparameters; lr is not one"),
    (nested("evolution.hyperparameters.lora_r", {"min": 4, "max": 32, "multiple_of": 0}),
     "evolution.hyperparameters.lora_r.multiple_of: must be >= 1, got 0"),
    (nested("evolution.hyperparameters.lora_r", {"min": 2, "max": 32, "multiple_of": 3}),
     "lora.r: 8 is not a multiple of evolution.hyperparameters.lora_r.multiple_of 3"),
    (merge(nested("agent.micro_batch_size_per_gpu", 4), nested("evolution.hyperparameters.batch_size", {"choices": [4, 6, 16]})),
     "evolution.hyperparameters.batch_size.choices[1]: 6 is not divisible by agent.micro_batch_size_per_gpu 4"),
    (nested("evolution.mutation.explore.perturb_factors", [0.8, 1.0]),
     "evolution.mutation.explore.perturb_factors[1]: must be > 0 and other than 1, got 1.0"),
    (nested("evolution.mutation.explore.perturb_factors", []), "evolution.mutation.explore.perturb_factors: must not be empty"),
    (nested("evolution.mutation.explore.resample_probability", 1.5),
     "evolution.mutation.explore.resample_probability: must be in [0, 1], got 1.5"),
    (nested("evolution.selection", "roulette"), "evolution.selection: must be one of tournament, truncation, got 'roulette'"),
    (nested("evolution.truncation_quantile", 0.75), "evolution.truncation_quantile: must be in (0, 0.5], got 0.75"),
    # the search (issue 33)
    (nested("evolution.interval", "epochs"), "evolution.interval: must be one of tokens, steps, got 'epochs'"),
    (nested("evolution.founders", "grid"), "evolution.founders: must be one of spread, config, random_lr, got 'grid'"),
    (nested("evolution.mutation.guide.kappa", -1.0), "evolution.mutation.guide.kappa: must be >= 0, got -1.0"),
    (nested("evolution.replace_quantile", 0.6), "evolution.replace_quantile: must be in (0, 0.5] or null, got 0.6"),
    (merge(nested("evolution.replace_quantile", 0.25), nested("evolution.selection", "truncation")),
     "evolution.replace_quantile: applies to tournament selection; evolution.selection is 'truncation'"),
    (merge(nested("evolution.replace_quantile", 0.25), nested("evolution.tournament_size", 4)),
     "evolution.tournament_size: 4 members drawn from the 3 others of a replaced member: at most 3"),
    (nested("evolution.mutation.guide.window", 0), "evolution.mutation.guide.window: must be >= 1, got 0"),
    (nested("evolution.mutation.guide.kapa", 1.0),
     "unknown key 'evolution.mutation.guide.kapa' (did you mean 'evolution.mutation.guide.kappa'?)"),
    # fitness (issue 23)
    (nested("evolution.fitness", "exactmatch"), "evolution.fitness: unknown fitness 'exactmatch' (did you mean 'exact_match'?)"),
    (nested("evolution.fitness", "no_such_module_here:score"),
     "evolution.fitness: cannot load fitness function 'no_such_module_here:score': importing no_such_module_here "
     "raised ModuleNotFoundError"),
    (nested("evolution.fitness", "tests.helpers.fitness_functions:missing"),
     "evolution.fitness: cannot load fitness function 'tests.helpers.fitness_functions:missing': module "
     "tests.helpers.fitness_functions has no function 'missing'"),
    (nested("evolution.fitness", "tests.helpers.fitness_functions:takes_one"),
     "evolution.fitness: fitness function 'tests.helpers.fitness_functions:takes_one' must take (prompts, generations, "
     "references)"),
    (nested("evolution.fitness_options.eval_rows", 0), "evolution.fitness_options.eval_rows: must be >= 1 or null"),
    (nested("evolution.fitness_options.eval_rows", 8),
     "evolution.fitness_options.eval_rows: the test_loss fitness always scores the whole test set"),
    (merge(nested("evolution.fitness", "exact_match"), nested("evolution.fitness_options.full_test_at_end", True)),
     "evolution.fitness_options.full_test_at_end: needs eval_rows"),
    (nested("evolution.fitness_options.max_new_tokens", 0), "evolution.fitness_options.max_new_tokens: must be >= 1"),
    (nested("evolution.fitness_options.batch_size", 0), "evolution.fitness_options.batch_size: must be >= 1"),
    (nested("evolution.fitness_options.samples", -1), "evolution.fitness_options.samples: must be >= 0"),
    (nested("evolution.fitness_options.eval_row", 8),
     "unknown key 'evolution.fitness_options.eval_row' (did you mean 'evolution.fitness_options.eval_rows'?)"),
]


@pytest.mark.parametrize("d, message", INVALID, ids=[m.split(":")[0][:40] for _, m in INVALID])
def test_invalid_configs(d, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(d)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_fitness_choices_and_their_options():
    cfg = config_from_dict({})
    assert cfg.evolution.fitness == "test_loss"
    assert (cfg.evolution.fitness_options.eval_rows, cfg.evolution.fitness_options.full_test_at_end) == (None, False)
    options = {"eval_rows": 64, "full_test_at_end": True, "max_new_tokens": 12, "batch_size": 32, "samples": 0,
               "reference_column": "label"}
    for fitness in ("exact_match", "accuracy", "tests.helpers.fitness_functions:share_equal"):
        cfg = config_from_dict(merge(nested("evolution.fitness", fitness), nested("evolution.fitness_options", options)))
        assert cfg.evolution.fitness == fitness
        assert vars(cfg.evolution.fitness_options) == options
    cfg = config_from_dict(nested("evolution.fitness_options", {"max_new_tokens": 4, "samples": 2}))
    assert (cfg.evolution.fitness_options.max_new_tokens, cfg.evolution.fitness_options.samples) == (4, 2)


def test_batch_size_bounds_need_only_contain_a_multiple_of_micro_batch():
    cfg = config_from_dict(
        merge(
            nested("agent.micro_batch_size_per_gpu", 8),
            nested("evolution.hyperparameters.batch_size", {"min": 5, "max": 20}),
            nested("agent.batch_size", 16),
        )
    )
    assert (cfg.evolution.hyperparameters["batch_size"].min, cfg.evolution.hyperparameters["batch_size"].max) == (5, 20)


def test_hyperparameters_listed_replace_the_default_search_space():
    cfg = config_from_dict(nested("evolution.hyperparameters", {"weight_decay": {"min": 0.0, "max": 0.1}}))
    assert list(cfg.evolution.hyperparameters) == ["weight_decay"]
    assert cfg.agent.weight_decay == 0.01  # AdamW's own default, the founders' value
    assert list(config_from_dict({}).evolution.hyperparameters) == ["lr", "batch_size"]


def test_evolution_bounds_of_older_configs_load_as_hyperparameters():
    """Run folders saved before the rename keep resuming: `evolution.bounds` fills in the old
    defaults (both lr and batch_size mutate)."""
    cfg = config_from_dict(nested("evolution.bounds", {"lr": {"max": 1e-3}}))
    space = cfg.evolution.hyperparameters
    assert (space["lr"].min, space["lr"].max) == (1e-6, 1e-3)
    assert (space["batch_size"].min, space["batch_size"].max) == (4, 64)
    with pytest.raises(ConfigError, match="renamed to evolution.hyperparameters"):
        config_from_dict(merge(nested("evolution.bounds", {}), nested("evolution.hyperparameters", {})))


def test_a_wider_search_space_reads_founders_values_where_the_config_sets_them():
    cfg = config_from_dict(FULL)
    values = founder_values(cfg)
    assert values["lora_r"] == 4 and values["lora_alpha"] == 8.0 and values["lora_dropout"] == 0.05
    assert values["scheduler"] == "cosine" and values["warmup_steps"] == 10 and values["lr"] == 3e-4
    assert list(cfg.evolution.hyperparameters) == [
        "lr", "batch_size", "weight_decay", "max_grad_norm", "warmup_steps", "scheduler", "lora_r", "lora_alpha",
        "lora_dropout"]
    assert cfg.evolution.mutation.explore.perturb_factors == [0.5, 2.0]
    assert "lora_r" not in founder_values(config_from_dict({"lora": None}))


def test_lora_dropout_searched_where_members_train_one_after_another():
    """Members stepped together cannot draw dropout masks from their own generators; alone (or with
    step_together off) they can, and a search that stays at 0 is allowed anyway."""
    dropout = nested("evolution.hyperparameters.lora_dropout", {"min": 0.0, "max": 0.1})
    config_from_dict(dropout)  # one member per actor
    config_from_dict(merge(dropout, {"population": {"members_per_actor": 2, "step_together": False}}))
    config_from_dict(merge(nested("evolution.hyperparameters.lora_dropout", {"choices": [0.0]}),
                           nested("population.members_per_actor", 2)))


def test_lr_schedule_of_older_configs_loads_as_a_cosine_scheduler():
    cfg = config_from_dict(nested("agent.lr_schedule", {"total_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1}))
    assert (cfg.agent.scheduler, cfg.agent.warmup_steps, cfg.agent.schedule_steps, cfg.agent.min_lr_ratio) == \
        ("cosine", 10, 100, 0.1)
    assert config_from_dict(nested("agent.lr_schedule", None)).agent.scheduler == "constant"
