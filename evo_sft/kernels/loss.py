"""Token-level cross-entropy over the supervised rows of a micro-batch, never materialising the
whole rows x vocabulary logits at once.

`frozen_head_losses` (a frozen output head, the LoRA case) computes each chunk's loss and its
gradient with respect to the hidden rows in one pass; `checkpointed_loss_sum` (a trained head)
recomputes each chunk's logits in backward.
"""
import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from evo_sft.data import IGNORE_INDEX

# Rows x vocabulary elements per chunk of the frozen-head cross-entropy: 2**25 is ~220 rows of a
# 152k vocabulary, ~130 MiB of float32 logits, small beside the activations of a packed step.
LOSS_CHUNK_ELEMENTS = 2**25
# The same for a trained head, whose chunks are recomputed in backward.
LOGIT_CHUNK_ELEMENTS = 2**27


def supervised_token_count(labels: torch.Tensor) -> int:
    """Tokens that carry a next-token label (labels are shifted by one inside the loss)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _chunk_loss_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def checkpointed_loss_sum(hidden: torch.Tensor, head, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy through any head, in chunks whose logits are recomputed in backward."""
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // head.out_features)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_chunk_loss_sum, head, hidden[start:start + chunk],
                                   targets[start:start + chunk], use_reentrant=False)
    return total


def _chunk_cross_entropy(logits, targets, with_grad: bool):
    """One chunk's per-row loss (float32) and, with `with_grad`, its gradient with respect to the
    logits (softmax minus one-hot, in the logits' dtype; may overwrite `logits`). Compiled, the
    reductions and the softmax each take one fused pass over the chunk's logits."""
    dtype = logits.dtype
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    losses = lse - logits.gather(1, targets[:, None]).squeeze(1)
    if not with_grad:
        return losses, None
    grad = logits.sub_(lse[:, None]).exp_().to(dtype)
    grad[torch.arange(len(targets), device=grad.device), targets] = torch.expm1(-losses).to(dtype)
    return losses, grad


@functools.cache
def _compiled_chunk_cross_entropy():
    return torch.compile(_chunk_cross_entropy, dynamic=True)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row CE(hidden_i @ W^T + b, target_i) for a frozen head, in row chunks.

    The gradient of each row's loss with respect to its `hidden` row is computed chunk by chunk
    in forward and kept ([rows, hidden], small), so backward needs no second pass through the
    head and the full rows x vocabulary logits never exist at once. W and b receive no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, compiled):
        chunk_cross_entropy = _compiled_chunk_cross_entropy() if compiled else _chunk_cross_entropy
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = F.linear(hidden[start:start + chunk_rows], weight, bias)
            losses[start:start + chunk_rows], grad_logits = chunk_cross_entropy(
                logits, targets[start:start + chunk_rows], grad_hidden is not None)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_rows] = grad_logits @ weight
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_hidden,) = ctx.saved_tensors
        grad = None if grad_hidden is None else grad_hidden * grad_losses[:, None].to(grad_hidden.dtype)
        return grad, None, None, None, None, None


def linear_cross_entropy(hidden, weight, bias, targets, chunk_rows: int, compiled: bool = False) -> torch.Tensor:
    """Per-row cross-entropy (float32, [rows]) of a frozen linear head over `hidden` rows;
    `compiled` runs each chunk's softmax and gradient through torch.compile."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_cross_entropy is for a frozen head; use the checkpointed chunks otherwise")
    if hidden.shape[0] == 0:
        return hidden.sum(-1, dtype=torch.float32) * 0.0
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, max(1, chunk_rows), compiled)


def is_frozen_linear(head) -> bool:
    return isinstance(head, torch.nn.Linear) and not any(p.requires_grad for p in head.parameters())


def frozen_head_losses(hidden, head: torch.nn.Linear, targets, compiled: bool) -> torch.Tensor:
    """`linear_cross_entropy` through `head`, in chunks of about LOSS_CHUNK_ELEMENTS logits."""
    return linear_cross_entropy(hidden, head.weight, head.bias, targets,
                                max(1, LOSS_CHUNK_ELEMENTS // head.out_features), compiled)
