"""evo-sft: evolutionary hyperparameter search over populations of LoRA SFT agents."""
from evo_sft.agent import SFT, LRSchedule, save_llm_checkpoint
from evo_sft.data import SFTGym
from evo_sft.evolution import HyperparameterConfig, Mutations, RLParameter, TournamentSelection
from evo_sft.finetune import finetune_llm_sft

__all__ = [
    "SFT", "SFTGym", "LRSchedule", "save_llm_checkpoint", "finetune_llm_sft",
    "HyperparameterConfig", "Mutations", "RLParameter", "TournamentSelection",
]
