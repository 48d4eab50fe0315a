"""Building members where they will run (in this process or inside a Ray actor), from a recipe:
plain JSON-able data that says how to make the agent and its gym, so that no process needs the
experiment config to build a member."""
from dataclasses import dataclass, field

from evo_sft.data import SFTGym
from evo_sft.data.sources import load_tokenizer
from evo_sft.fitness import make_fitness
from evo_sft.population.member import MemberHost
from evo_sft.population.shared_base import SharedBase


@dataclass(frozen=True)
class MemberRecipe:
    """How every member of a run is made. `agent` holds `SFT` keyword arguments (all but the
    member's own hyperparameters, index, device and LoRA config); `lora` the `peft.LoraConfig`
    keyword arguments or None for full fine-tuning; `lr_schedule` the `LRSchedule` fields or None;
    `gym` the `SFTGym` keyword arguments; `fitness` what `evolution.fitness` names and
    `fitness_options` the keyword arguments of its `evo_sft.fitness.Fitness`."""

    model_path: str
    tokenizer: str
    trust_remote_code: bool
    agent: dict
    lr_schedule: dict | None
    lora: dict | None
    gym: dict
    seed: int
    use_gpu: bool
    step_together: bool
    fitness: str = "test_loss"
    fitness_options: dict = field(default_factory=dict)


def slot_groups(size: int, members_per_actor: int) -> list[list[int]]:
    """The slots that share one base model (one Ray actor): consecutive runs of `members_per_actor`."""
    return [list(range(first, min(size, first + members_per_actor))) for first in range(0, size, members_per_actor)]


def member_device(use_gpu: bool) -> str:
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def build_agent(recipe: MemberRecipe, tokenizer, slot: int, hyperparameters: dict):
    from peft import LoraConfig

    from evo_sft.sft import SFT, LRSchedule

    agent = SFT(pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, model_name=recipe.model_path,
                index=slot, device=member_device(recipe.use_gpu),
                lora_config=LoraConfig(**recipe.lora) if recipe.lora is not None else None,
                lr_schedule=LRSchedule(**recipe.lr_schedule) if recipe.lr_schedule else None, **recipe.agent)
    agent.set_hyperparameters(**hyperparameters)
    return agent


def build_hosts(recipe: MemberRecipe, prepared: dict, founders: dict[int, dict]) -> dict:
    """The members of `founders` ({slot: hyperparameters}) on one base model: {slot: host}."""
    tokenizer = load_tokenizer(recipe.tokenizer, recipe.trust_remote_code)
    first = min(founders)
    agent = build_agent(recipe, tokenizer, first, founders[first])
    gym = SFTGym(None, None, tokenizer, prepared=prepared, **recipe.gym)
    fitness = make_fitness(recipe.fitness, **recipe.fitness_options)
    if len(founders) == 1:
        return {first: MemberHost(first, agent, gym, recipe.seed, fitness)}
    return SharedBase(agent, gym, recipe.seed, founders, together=recipe.step_together, fitness=fitness).members


def local_hosts(recipe: MemberRecipe, prepared: dict, founders: list[dict], members_per_actor: int) -> list:
    """Every slot's host in this process, `members_per_actor` to a base model."""
    hosts = {}
    for group in slot_groups(len(founders), members_per_actor):
        hosts.update(build_hosts(recipe, prepared, {slot: founders[slot] for slot in group}))
    return [hosts[slot] for slot in range(len(founders))]
