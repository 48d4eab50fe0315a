"""Independent reference computations of what the SFT agent computes: token ids built from the
chat template written out by hand, the next-token loss from a model's full logits with an
explicit loop, and greedy continuations by transformers' own `generate`. They use torch and a
model's forward (or `generate`) only, nothing of evo_sft, so that the product is checked against
something it does not share code with."""
import copy

import torch


def reference_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """(token ids of prompt + response, number of prompt tokens), built by hand: the chat
    template written out as a string, or plain text followed by eos. Independent of evo_sft.data."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if tokenizer.chat_template:
        prompt_ids = bos + encode(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
        return prompt_ids + encode(f"{response}<|im_end|>\n"), len(prompt_ids)
    prompt_ids = bos + encode(prompt)
    return prompt_ids + encode(response) + [tokenizer.eos_token_id], len(prompt_ids)


def hand_loss_sum(model, ids: list[int], prompt_len: int) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the response tokens of ONE unpadded row, from the
    full `model(input_ids).logits` with log_softmax and an explicit loop. Differentiable."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    total = logits.new_zeros(())
    count = 0
    for t in range(prompt_len - 1, len(ids) - 1):
        total = total - log_probs[t, ids[t + 1]]
        count += 1
    return total, count


def token_mean_loss(model, tokenizer, prompts, responses) -> torch.Tensor:
    """Token-weighted mean CE over all rows (sum over every response token / their number)."""
    total, count = 0.0, 0
    for prompt, response in zip(prompts, responses):
        loss, n = hand_loss_sum(model, *reference_ids(tokenizer, prompt, response))
        total, count = total + loss, count + n
    return total / count


def step_grads(model, tokenizer, groups) -> dict[str, torch.Tensor]:
    """Gradient (by parameter name) of the hand-computed loss on a copy of `model`. `groups` is a
    list of (prompts, responses) micro-batches: one group gives the token mean over the whole
    step, several give the (wrong) mean of per-micro-batch means."""
    model = copy.deepcopy(model)
    losses = [token_mean_loss(model, tokenizer, prompts, responses) for prompts, responses in groups]
    (sum(losses) / len(losses)).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' `generate`, greedy, on one unpadded prompt, never stopping early: its new tokens."""
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()
