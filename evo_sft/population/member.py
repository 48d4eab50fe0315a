"""A population slot: one SFT agent and its own data stream. Both backends host these."""
import math
import time
from pathlib import Path

import numpy as np

from evo_sft import storage
from evo_sft.agent import ACTOR, SFT
from evo_sft.data import DataStream, SFTGym

EVAL_BATCH_SIZE = 16


def stream_seed(seed: int, slot: int) -> int:
    """The seed of a slot's data order: distinct per slot, fixed by the run's seed."""
    return int(np.random.SeedSequence([seed, slot]).generate_state(1)[0])


class MemberHost:
    """Trains, evaluates, exports and imports the member living in one slot."""

    def __init__(self, slot: int, agent: SFT, gym: SFTGym, seed: int):
        self.slot, self.agent, self.gym = slot, agent, gym
        self.stream = DataStream(len(gym.train), stream_seed(seed, slot))

    def train(self, steps: int) -> dict:
        """`steps` optimizer steps, each on the next `batch_size` rows of this slot's stream."""
        start = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for _ in range(steps):
            result = self.agent.learn(self.gym.batch(self.stream, self.agent.batch_size))
            loss_sum += result["mean_loss"] * result["tokens"]
            tokens += result["tokens"]
        seconds = time.perf_counter() - start
        train_loss = loss_sum / tokens if tokens else math.nan
        return {
            "slot": self.slot,
            "train_loss": train_loss,
            "finite": math.isfinite(train_loss),
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
            "optimizer_step": self.agent.optimizer_steps,
        }

    def evaluate(self) -> float:
        return self.agent.test(self.gym, batch_size=EVAL_BATCH_SIZE)

    def hyperparameters(self) -> dict:
        return self.agent.hyperparameters

    def set_hyperparameters(self, hyperparameters: dict) -> None:
        self.agent.set_hyperparameters(**hyperparameters)

    def export_state(self):
        return self.agent.export_state(device="cpu")

    def import_state(self, state) -> None:
        tensors, meta = state
        self.agent.import_state(tensors, meta)

    def save(self, directory: Path) -> None:
        """The member (adapter, optimizer, scheduler, attributes) and this slot's stream position."""
        directory = Path(directory)
        self.agent.save_checkpoint(directory / f"slot_{self.slot}", lora_only=self.agent.is_lora)
        storage.save_json(directory / f"slot_{self.slot}.stream.json", self.stream.state_dict())

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        self.agent.load_checkpoint(directory / f"slot_{self.slot}", load_optimizer=True)
        state = storage.load_json(directory / f"slot_{self.slot}.stream.json")
        self.stream = DataStream.from_state_dict(len(self.gym.train), state)

    def export_adapter(self, directory: Path) -> str:
        """Write the member's adapter as a PEFT folder under `directory`; return its path."""
        self.agent.actor.save_pretrained(directory, selected_adapters=[ACTOR])
        return str(Path(directory) / ACTOR)
