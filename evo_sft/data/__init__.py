"""Data: `gym` (tokenised prompt/response rows, masked batches, seeded streams, the fixed test
set), `sources` (datasets and tokenizers from the demo, local files or the hub) and `demo` (the
built-in tiny model, tokenizer and task)."""
from evo_sft.data.gym import IGNORE_INDEX, DataStream, SFTGym, TokenizedSplit, collate, tokenize_split

__all__ = ["IGNORE_INDEX", "DataStream", "SFTGym", "TokenizedSplit", "collate", "tokenize_split"]
