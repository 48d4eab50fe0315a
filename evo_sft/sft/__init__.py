"""The SFT agent: `agent` (AgileRL's `SFT` API), `step` (the training step), `state`
(checkpoints and clone states), `lora` (adapter helpers), `schedule` (learning-rate schedules)."""
from evo_sft.sft.agent import SFT, save_llm_checkpoint
from evo_sft.sft.schedule import LRSchedule

__all__ = ["SFT", "LRSchedule", "save_llm_checkpoint"]
