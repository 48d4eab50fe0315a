"""evo-sft: evolutionary hyperparameter search over populations of LoRA SFT agents.

The names below are imported on first use, so that `import evo_sft.evolution` (pure Python)
does not import torch."""
import importlib

_EXPORTS = {
    "SFT": "evo_sft.sft", "LRSchedule": "evo_sft.sft", "save_llm_checkpoint": "evo_sft.sft",
    "SFTGym": "evo_sft.data", "finetune_llm_sft": "evo_sft.finetune",
    "HyperparameterConfig": "evo_sft.evolution", "Mutations": "evo_sft.evolution",
    "RLParameter": "evo_sft.evolution", "RLChoice": "evo_sft.evolution", "Explore": "evo_sft.evolution",
    "TournamentSelection": "evo_sft.evolution",
    "TruncationSelection": "evo_sft.evolution",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'evo_sft' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
