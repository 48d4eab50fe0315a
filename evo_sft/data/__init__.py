"""Data: `gym` (tokenised prompt/response rows, masked batches, seeded streams, the fixed test
set), `sources` (datasets and tokenizers from the demo, local files or the hub) and `demo` (the
built-in tiny model, tokenizer and task).

The names below are imported on first use, so that `evo_sft.data.sources` (what the command
line checks before a run) does not import torch."""
import importlib

__all__ = ["IGNORE_INDEX", "DataStream", "SFTGym", "TokenizedSplit", "collate", "tokenize_split"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'evo_sft.data' has no attribute {name!r}")
    return getattr(importlib.import_module("evo_sft.data.gym"), name)
