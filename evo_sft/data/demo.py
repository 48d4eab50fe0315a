"""The built-in demo: a tiny Llama-shaped model, a byte-level tokenizer and a task it can learn.

Nothing here touches the network. `write_demo_model` saves the model and tokenizer with
`save_pretrained`, so they load back through `from_pretrained`, the same path as hub models.
The model is Llama-shaped because transformers 5 loads any `qwen2` checkpoint's tokenizer as
Qwen2Tokenizer, not the tokenizer saved with it.
"""
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evo_sft.io.storage import umask_modes

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer without merges: one token per byte, so any UTF-8 text has ids and
    an ASCII character is one token. Pad and eos are the same token, as in Qwen."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                **shape) -> LlamaForCausalLM:
    """The demo's Llama: `shape` overrides the other LlamaConfig sizes (heads, intermediate size...)."""
    import torch

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        **{"intermediate_size": hidden_size * 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 512, **shape},
        tie_word_embeddings=False,
        use_cache=False,
        # the tokenizer's ids: a response ends with <|im_end|> (chat template) or <|endoftext|> (plain text)
        bos_token_id=None,
        eos_token_id=[SPECIAL_TOKENS.index("<|im_end|>"), SPECIAL_TOKENS.index("<|endoftext|>")],
        pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def write_demo_model(directory: str | Path, seed: int = 0) -> Path:
    """Save the demo model and tokenizer into `directory` (idempotent) and return it."""
    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    tokenizer = build_tokenizer()
    tmp = directory.with_name(directory.name + ".tmp")
    build_model(len(tokenizer), seed=seed).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    umask_modes(tmp)
    tmp.rename(directory)
    return directory


def demo_dataset(num_rows: int, seed: int = 0):
    """Reverse a word: 'reverse: abc' -> 'cba', as a `datasets.Dataset` of `num_rows` distinct
    words of 3 to 7 letters out of ten, so that no held-out word was seen in training. Learnable
    by a tiny model in minutes on a CPU."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghij"))
    words = {}  # distinct, in the order drawn
    while len(words) < num_rows:
        words.setdefault("".join(rng.choice(letters, size=int(rng.integers(3, 8)))), None)
    return Dataset.from_dict({"prompt": [f"reverse: {word}" for word in words],
                              "response": [word[::-1] for word in words]})
