"""Generation, one screen: prompts left-padded into batches (pitfall 8), decoded token by token
with the KV cache through the agent's live adapter, greedy or sampled.

The decoder and head are called directly (as in `evo_sft.sft.step`), with position ids from the
attention mask, so a left-padded row sees the positions it would see alone. Every row is
continued until it emits a stop token or has `max_new_tokens` new tokens. Compiled decoder layers
(`compile_layers`) run eagerly here: their graphs are for training, and one token at a time
against a growing cache would only recompile them.
"""
import inspect

import torch
from transformers import DynamicCache

from evo_sft.sft.step import decoder_and_head


@torch.no_grad()
def generate(agent, prompts: list[list[int]], max_new_tokens: int, stop_token_ids, batch_size: int,
             temperature: float, top_p: float) -> list[list[int]]:
    """Each prompt's new tokens, up to (not including) its first stop token."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"generate: max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    agent.set_training_mode(False)
    stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=agent.device)
    out = []
    with torch.compiler.set_stance("force_eager"):
        for start in range(0, len(prompts), batch_size):
            out += _generate_batch(agent, prompts[start:start + batch_size], max_new_tokens, stops, temperature, top_p)
    return out


def _generate_batch(agent, prompts, max_new_tokens, stops, temperature, top_p) -> list[list[int]]:
    input_ids, attention_mask = left_padded(prompts, agent.pad_token_id)
    input_ids, attention_mask = input_ids.to(agent.device), attention_mask.to(agent.device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    decoder, head = decoder_and_head(agent)
    cache = {cache_argument(decoder): DynamicCache(config=decoder.config)}  # the layers fill it as they run
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=agent.device)
    new_tokens = []
    for _ in range(max_new_tokens):
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **cache)
        token = next_token(head(out.last_hidden_state[:, -1]).float(), temperature, top_p)
        token = token.masked_fill(finished, agent.pad_token_id)
        new_tokens.append(token)
        finished |= torch.isin(token, stops)
        if bool(finished.all()):
            break
        input_ids = token[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompts), 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    rows = torch.stack(new_tokens, dim=1).tolist()
    stop_set = set(stops.tolist())
    return [_until_stop(row, stop_set) for row in rows]


def cache_argument(decoder) -> str:
    """What the decoder calls its KV cache: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def left_padded(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every prompt ending at the last column."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, width - len(prompt):] = 1
    return input_ids, attention_mask


def next_token(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Greedy where `temperature` is 0; else a draw (torch's global generator) from the softmax at
    `temperature`, restricted to the smallest set of tokens whose probability reaches `top_p`."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the most likely token always stays
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1)[:, 0]


def eos_token_ids(model) -> list[int]:
    """The end-of-sequence tokens of the model's generation config (none where it names none)."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _until_stop(row: list[int], stops: set[int]) -> list[int]:
    for index, token in enumerate(row):
        if token in stops:
            return row[:index]
    return row
