"""`finetune_llm_sft`: AgileRL's in-process training loop, on the shared generation loop."""
import math
from pathlib import Path

from evo_sft.sft import SFT, save_llm_checkpoint
from evo_sft.controller import Controller, GenerationRecord
from evo_sft.data import SFTGym
from evo_sft.evolution import HyperparameterConfig, Mutations, TournamentSelection, elite
from evo_sft.population.local import LocalPopulation
from evo_sft.population.member import MemberHost


def finetune_llm_sft(pop: list[SFT], env: SFTGym, init_hp: dict | None = None, save_elite: bool | None = None,
                     elite_path: str | None = None, wb: bool = False, evo_steps: int | None = None,
                     checkpoint_steps: int | None = None, checkpoint_path: str | None = None,
                     tournament: TournamentSelection | None = None, mutation: Mutations | None = None,
                     wandb_api_key: str | None = None, evaluation_interval: int = 10, max_reward=None,
                     verbose: bool = True, accelerator=None, max_steps: int | None = None,
                     num_epochs: int | None = None, seed: int | None = None):
    """Train `pop` on `env`; every `evo_steps` optimizer steps, score every member on the whole
    test set, select, clone and mutate. Returns (population in slot order, fitness histories).

    `max_steps` counts optimizer steps per member; `num_epochs` passes over the training rows
    at each member's initial batch size. Each member draws its own seeded stream of batches.
    """
    if wb or wandb_api_key:
        raise NotImplementedError("evo-sft tracks runs in MLflow, not Weights & Biases; use `evo-sft run`")
    if accelerator is not None:
        raise NotImplementedError("finetune_llm_sft does not support an accelerate Accelerator yet")
    if (tournament is None) != (mutation is None):
        raise ValueError("pass both tournament and mutation to evolve, or neither to only train")
    steps_per_generation = evo_steps or evaluation_interval
    if max_steps is None:
        epochs = num_epochs or 1
        max_steps = epochs * math.ceil(len(env) / pop[0].batch_size)
    seed = env.seed if seed is None else seed
    population = LocalPopulation([MemberHost(slot, agent, env, seed) for slot, agent in enumerate(pop)])
    hp_config = pop[0].hp_config or HyperparameterConfig()
    observers = [_print_generation] if verbose else []
    elite_saver = _ElitePerStep(checkpoint_steps, Path(checkpoint_path or elite_path or "saved_checkpoints")) \
        if checkpoint_steps else None
    controller = Controller(
        population, hp_config, steps_per_generation,
        seed=mutation.rand_seed if mutation is not None and mutation.rand_seed is not None else seed,
        selection=tournament, mutations=mutation, micro_batch_size=pop[0].micro_batch_size_per_gpu,
        observers=observers, save_elite=elite_saver,
    )
    controller.run(math.ceil(max_steps / steps_per_generation))
    agents = [host.agent for host in population.hosts]
    if save_elite:
        best = elite([a.fitness[-1] if a.fitness else -math.inf for a in agents])
        save_llm_checkpoint(agents[best], Path(elite_path or "saved_checkpoints") / "elite")
    return agents, [controller.fitness[member_id] for member_id in controller.slot_ids]


def _print_generation(controller: Controller, record: GenerationRecord) -> None:
    steps = controller.generation * controller.steps_per_generation
    fitness = " ".join(f"{f:.4f}" for f in record.fitness)
    print(f"generation {record.generation} (step {steps}): fitness [{fitness}] elite member {record.elite_id}")


class _ElitePerStep:
    """Save the elite with `save_llm_checkpoint` each time the step count crosses a multiple
    of `every`, under a path that includes the step, so saves never overwrite each other."""

    def __init__(self, every: int, directory: Path):
        self.every, self.directory, self.saved_until = every, directory, 0

    def __call__(self, controller: Controller, elite_slot: int) -> str | None:
        step = controller.generation * controller.steps_per_generation
        if step // self.every == self.saved_until // self.every:
            return None
        path = self.directory / f"step_{step}"
        save_llm_checkpoint(controller.population.hosts[elite_slot].agent, path)
        self.saved_until = step
        return str(path)
