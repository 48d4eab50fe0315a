"""Token-level cross-entropy over response tokens, summed, so callers choose the normaliser."""
import torch
import torch.nn.functional as F

from evo_sft.data import IGNORE_INDEX


def supervised_token_count(labels: torch.Tensor) -> int:
    """Tokens that carry a next-token label (labels are shifted by one inside the loss)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def response_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions, computed in float32."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
