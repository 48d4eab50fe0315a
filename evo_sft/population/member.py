"""A population slot: one SFT agent, its own data stream and its own torch random generator
(LoRA dropout). Both backends host these, one per agent or several on one shared base model."""
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from evo_sft.io import storage
from evo_sft.sft import SFT
from evo_sft.sft.lora import ACTOR
from evo_sft.data import DataStream, SFTGym
from evo_sft.fitness import Evaluation, Fitness, NegativeTestLoss
from evo_sft.population.protocol import TrainResult


def stream_seed(seed: int, slot: int) -> int:
    """The seed of a slot's data order: distinct per slot, fixed by the run's seed."""
    return int(np.random.SeedSequence([seed, slot]).generate_state(1)[0])


class MemberHost:
    """Trains, evaluates, exports and imports the member living in one slot."""

    def __init__(self, slot: int, agent: SFT, gym: SFTGym, seed: int, fitness: Fitness | None = None):
        self.slot, self.agent, self.gym = slot, agent, gym
        self.fitness = fitness or NegativeTestLoss()
        self.stream = DataStream(len(gym.train), stream_seed(seed, slot))
        self.rng = seeded_rng_state(stream_seed(seed, slot), agent.device)
        self.progress = (0, 0)  # (steps, tokens) of the current or last `train` call
        self.on_step = None  # called after each step of `train`, if set

    def advance(self, steps: int, tokens: int) -> None:
        self.progress = (steps, tokens)
        if self.on_step is not None:
            self.on_step()

    @contextmanager
    def own_rng(self):
        """Run with this member's torch generator, so that its dropout masks do not depend on
        which other members share the process or in what order they train."""
        outside = rng_state(self.agent.device)
        set_rng_state(self.rng, self.agent.device)
        try:
            yield
        finally:
            self.rng = rng_state(self.agent.device)
            set_rng_state(outside, self.agent.device)

    def train(self, steps: int, max_tokens: int | None = None) -> TrainResult:
        """`steps` optimizer steps, each on the next `batch_size` rows of this slot's stream;
        fewer where `max_tokens` supervised tokens are reached first (the last step may pass them)."""
        start = time.perf_counter()
        losses = []
        self.advance(0, 0)
        with self.own_rng():
            for _ in range(steps):
                if max_tokens is not None and self.progress[1] >= max_tokens:
                    break
                result = self.agent.learn(self.gym.batch(self.stream, self.agent.batch_size))
                losses.append((self.agent.optimizer_steps, result["mean_loss"], result["tokens"]))
                self.advance(len(losses), self.progress[1] + result["tokens"])
        return train_result(self.slot, losses, time.perf_counter() - start, self.agent.optimizer_steps)

    def train_group(self, steps: int, max_tokens: dict[int, int] | None = None) -> dict[int, TrainResult]:
        """Train every member on this member's base model, here only this one: {slot: result};
        `max_tokens` ({slot: tokens}) caps each as `train` does."""
        return {self.slot: self.train(steps, (max_tokens or {}).get(self.slot))}

    def evaluate(self, full: bool = False) -> Evaluation:
        return self.fitness.evaluate(self.agent, self.gym, full)

    def hyperparameters(self) -> dict:
        return self.agent.hyperparameters

    def set_hyperparameters(self, hyperparameters: dict) -> None:
        """With this member's generator: a grown LoRA rank draws its new rows from it (rank 0's,
        where several processes train the member)."""
        with self.own_rng():
            self.agent.set_hyperparameters(**hyperparameters)
        if self.agent.replicas:
            self.agent.replicas.broadcast(self.agent.trainable_parameters().values())

    def export_state(self, on_device: bool = False):
        """The member as tensors + JSON: on the CPU to travel to another process, or on the
        agent's device for a clone within this one."""
        return self.agent.export_state(device=str(self.agent.device) if on_device else "cpu")

    def import_state(self, state) -> None:
        tensors, meta = state
        self.agent.import_state(tensors, meta)

    def snapshot(self) -> storage.Snapshot:
        """The member (adapter, optimizer, scheduler, attributes), this slot's stream position
        and its random generator, as files of a population checkpoint's `members/` folder."""
        snapshot = storage.Snapshot()
        snapshot.directory(f"slot_{self.slot}", self.agent.checkpoint_snapshot(lora_only=self.agent.is_lora))
        snapshot.json(f"slot_{self.slot}.stream.json", self.stream.state_dict())
        snapshot.tensors(f"slot_{self.slot}.rng.safetensors", self.rng)
        return snapshot

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        self.agent.load_checkpoint(directory / f"slot_{self.slot}", load_optimizer=True)
        state = storage.load_json(directory / f"slot_{self.slot}.stream.json")
        self.stream = DataStream.from_state_dict(len(self.gym.train), state)
        saved = storage.load_tensors(directory / f"slot_{self.slot}.rng.safetensors")
        self.rng = {**self.rng, **{k: v for k, v in saved.items() if k in self.rng}}  # a CUDA state only on CUDA

    def export_adapter(self, directory: Path) -> str:
        """Write the member's adapter as a PEFT folder under `directory` (a member without LoRA:
        its whole model, as `save_pretrained` writes it); return its path."""
        if self.agent.is_lora:
            self.agent.actor.save_pretrained(directory, selected_adapters=[ACTOR])
        else:
            self.agent.actor.save_pretrained(Path(directory) / ACTOR)
        storage.umask_modes(directory)
        return str(Path(directory) / ACTOR)


def train_result(slot: int, steps: list[tuple[int, float, int]], seconds: float, optimizer_step: int) -> TrainResult:
    """What a member reports for a `train` call whose steps were (optimizer step, mean loss, tokens)."""
    tokens = sum(count for _, _, count in steps)
    train_loss = sum(loss * count for _, loss, count in steps if count) / tokens if tokens else math.nan
    return TrainResult(slot, train_loss, math.isfinite(train_loss), tokens, seconds,
                       tokens / seconds if seconds > 0 else 0.0, optimizer_step,
                       tuple((step, loss) for step, loss, _ in steps))


def seeded_rng_state(seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The torch generator states (CPU, and the device's when it is a GPU) seeded with `seed`."""
    state = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.Generator(device=device).manual_seed(seed).get_state()
    return state


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
