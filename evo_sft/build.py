"""From an experiment config to the pieces of a run: base model, tokenizer, data, agents."""
import math
from pathlib import Path

import numpy as np

from evo_sft.agent import SFT, LRSchedule
from evo_sft.config import ExperimentConfig
from evo_sft.data import SFTGym, tokenize_split
from evo_sft.evolution import HyperparameterConfig, Mutations, RLParameter, TournamentSelection

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def resolve_model_path(config: ExperimentConfig, run_dir: Path) -> str:
    """The built-in demo model is written once into the run folder; anything else is a hub id or path."""
    if config.model.name != "demo":
        return config.model.name
    from evo_sft.demo import write_demo_model

    return str(write_demo_model(run_dir / "base_model", seed=config.seed))


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_splits(config: ExperimentConfig):
    """(train, test) `datasets.Dataset`s from the demo task, a local file or the hub."""
    from datasets import load_dataset

    data = config.data
    if data.source == "demo":
        from evo_sft.demo import demo_dataset

        dataset = demo_dataset(data.num_rows, seed=config.seed)
    elif Path(data.source).suffix in DATA_FILE_BUILDERS:
        builder = DATA_FILE_BUILDERS[Path(data.source).suffix]
        dataset = load_dataset(builder, data_files={data.train_split: data.source})
    else:
        dataset = load_dataset(data.source)
    if data.source != "demo":
        if data.test_split is not None:
            return dataset[data.train_split], dataset[data.test_split]
        dataset = dataset[data.train_split]
    split = dataset.train_test_split(test_size=data.test_size, seed=config.seed)
    return split["train"], split["test"]


def prepare_data(config: ExperimentConfig, tokenizer) -> dict:
    """Tokenise both splits once; the result is shared by every member (and every actor)."""
    train, test = load_splits(config)
    d = config.data
    return {
        "train": tokenize_split(train, tokenizer, "train", d.prompt_column, d.response_column, d.max_length).to_dict(),
        "test": tokenize_split(test, tokenizer, "test", d.prompt_column, d.response_column, d.max_length).to_dict(),
    }


def make_gym(config: ExperimentConfig, tokenizer, prepared: dict) -> SFTGym:
    return SFTGym(None, None, tokenizer, data_batch_size_per_gpu=config.agent.batch_size,
                  response_column=config.data.response_column, prompt_column=config.data.prompt_column,
                  max_length=config.data.max_length, seed=config.seed, prepared=prepared)


def hp_config(config: ExperimentConfig) -> HyperparameterConfig:
    bounds = config.evolution.bounds
    return HyperparameterConfig(
        lr=RLParameter(min=bounds.lr.min, max=bounds.lr.max),
        batch_size=RLParameter(min=bounds.batch_size.min, max=bounds.batch_size.max, dtype=int),
    )


def selection_and_mutations(config: ExperimentConfig) -> tuple[TournamentSelection, Mutations]:
    evolution = config.evolution
    selection = TournamentSelection(evolution.tournament_size, evolution.elitism, config.population.size,
                                    eval_loop=evolution.eval_loop)
    m = evolution.mutation
    mutations = Mutations(no_mutation=m.no_mutation, rl_hp=m.rl_hp, mutation_sd=m.mutation_sd,
                          mutate_elite=m.mutate_elite)
    return selection, mutations


def founder_hyperparameters(config: ExperimentConfig) -> list[dict]:
    """Slot 0 starts at the config's learning rate; the others log-uniformly within the
    learning-rate bounds (seeded), so the first generation already compares rates."""
    rng = np.random.default_rng([config.seed, 0xF0])
    low, high = math.log(config.evolution.bounds.lr.min), math.log(config.evolution.bounds.lr.max)
    lrs = [config.agent.lr] + [float(math.exp(rng.uniform(low, high))) for _ in range(config.population.size - 1)]
    return [{"lr": lr, "batch_size": config.agent.batch_size} for lr in lrs]


def build_agent(config: ExperimentConfig, model_path: str, tokenizer, slot: int, hyperparameters: dict,
                device: str) -> SFT:
    from peft import LoraConfig

    lora = None
    if config.lora is not None:
        lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.lora_alpha, lora_dropout=config.lora.lora_dropout,
                          target_modules=config.lora.target_modules, task_type="CAUSAL_LM")
    schedule = config.agent.lr_schedule
    return SFT(
        pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, model_name=model_path,
        model_config={"dtype": config.model.dtype,
                      "attn_implementation": config.model.attn_implementation,
                      "trust_remote_code": config.model.trust_remote_code},
        hp_config=hp_config(config), index=slot, batch_size=hyperparameters["batch_size"], lr=hyperparameters["lr"],
        max_grad_norm=config.agent.max_grad_norm, update_epochs=config.agent.update_epochs,
        micro_batch_size_per_gpu=config.agent.micro_batch_size_per_gpu, device=device, lora_config=lora,
        seed=config.seed, gradient_checkpointing=config.agent.gradient_checkpointing,
        use_liger_loss=config.agent.use_liger_loss, packing=config.agent.packing,
        compile_layers=config.agent.compile_layers,
        lr_schedule=LRSchedule(schedule.total_steps, schedule.warmup_steps, schedule.min_lr_ratio) if schedule else None,
    )


def member_device(config: ExperimentConfig) -> str:
    import torch

    return "cuda" if config.population.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def slot_groups(size: int, members_per_actor: int) -> list[list[int]]:
    """The slots that share one base model (one Ray actor): consecutive runs of `members_per_actor`."""
    return [list(range(first, min(size, first + members_per_actor))) for first in range(0, size, members_per_actor)]


def build_hosts(config_dict: dict, model_path: str, prepared: dict, founders: dict[int, dict]) -> dict:
    """The members of `founders` ({slot: hyperparameters}) on one base model, built where they
    will run (in this process or inside a Ray actor): {slot: host}."""
    from evo_sft.config import config_from_dict
    from evo_sft.population.member import MemberHost
    from evo_sft.population.shared_base import SharedBase

    config = config_from_dict(config_dict)
    tokenizer = load_tokenizer(config.tokenizer or model_path, config.model.trust_remote_code)
    first = min(founders)
    agent = build_agent(config, model_path, tokenizer, first, founders[first], member_device(config))
    gym = make_gym(config, tokenizer, prepared)
    if len(founders) == 1:
        return {first: MemberHost(first, agent, gym, config.seed)}
    return SharedBase(agent, gym, config.seed, founders, together=config.population.step_together).members


def local_hosts(config: ExperimentConfig, model_path: str, prepared: dict, founders: list[dict]) -> list:
    """Every slot's host in this process, `population.members_per_actor` to a base model."""
    hosts = {}
    for group in slot_groups(config.population.size, config.population.members_per_actor):
        hosts.update(build_hosts(config.to_dict(), model_path, prepared, {slot: founders[slot] for slot in group}))
    return [hosts[slot] for slot in range(config.population.size)]
