"""SFT agents whose next token depends only on the current one, with the distributions written by
hand. The base model is the same for all of them: every attention and MLP block outputs zero, so
the residual stream is the current token's embedding, a one-hot direction for each of `TOKENS`
(zero for the rest: uniform logits), and the output head is zero. The transitions live in the
LoRA adapter of the output head, so that clones carry them. Test loss and greedy outputs are
known before any code of evo_sft runs."""
import math

import torch
from peft import LoraConfig

from evo_sft import SFT
from evo_sft.data.demo import build_model

TOKENS = ("\n", "a", "b", "c", "<|im_end|>")  # the tokens that have a direction of their own
HIDDEN_SIZE = 32


def bigram_agent(tokenizer, transitions: dict[str, dict[str, float]], **kwargs) -> SFT:
    """An agent whose adapter sets `transitions[current][next]` as the logit of `next` after
    `current` (tokens of `TOKENS`); every other logit is 0. `kwargs` go to `SFT`."""
    agent = SFT(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=bigram_base(tokenizer),
                lora_config=LoraConfig(r=len(TOKENS), lora_alpha=len(TOKENS), target_modules=["lm_head"]),
                gradient_checkpointing=False, **kwargs)
    head = agent.actor.get_base_model().lm_head
    with torch.no_grad():
        head.lora_A["actor"].weight.copy_(torch.eye(len(TOKENS), HIDDEN_SIZE))
        head.lora_B["actor"].weight.zero_()
        scale = math.sqrt(HIDDEN_SIZE) * head.scaling["actor"]  # RMSNorm turns a one-hot row into sqrt(hidden) times it
        for current, row in transitions.items():
            for following, logit in row.items():
                head.lora_B["actor"].weight[_single_id(tokenizer, following), TOKENS.index(current)] = logit / scale
    return agent


def bigram_base(tokenizer):
    model = build_model(len(tokenizer), hidden_size=HIDDEN_SIZE, num_layers=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for direction, token in enumerate(TOKENS):
            model.model.embed_tokens.weight[_single_id(tokenizer, token), direction] = 1.0
    return model


def _single_id(tokenizer, text: str) -> int:
    (token,) = tokenizer.encode(text, add_special_tokens=False)
    return token
