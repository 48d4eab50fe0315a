"""Padding-free packed micro-batches.

A right-padded batch (input_ids / attention_mask / labels, as `evo_sft.data.collate` makes it)
becomes one row of all real tokens laid end to end, with per-document `position_ids` and the
cumulative sequence lengths `cu_seqlens` that varlen attention (`evo_sft.kernels.attention`)
needs. Everything is computed on the host from the host-side batch, so the training step needs
no device-to-host sync for shapes.
"""
import torch

from evo_sft.data import IGNORE_INDEX

# What a packed forward passes as its attention mask: a ready 4-D mask, which transformers' mask
# builders return unchanged (in models that build one mask and in those that build one per
# attention type) instead of materialising a tokens x tokens mask; the packed attention ignores it.
READY_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


def pack_batch(batch: dict[str, torch.Tensor]) -> dict:
    """One packed row from a right-padded host batch.

    Returns input_ids and position_ids of shape [1, T] (T = real tokens), `cu_seqlens` (int32,
    [documents + 1]), `max_seqlen` (int), `loss_index` (positions p whose next token p+1 in the
    same document is supervised), `targets` (those next tokens) and `num_targets` (int).
    """
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    if input_ids.is_cuda:
        raise ValueError("pack_batch expects the host-side batch (it reads lengths without syncing)")
    lengths = mask.sum(-1)
    keep = lengths > 0
    input_ids, mask, labels, lengths = input_ids[keep], mask[keep], labels[keep], lengths[keep]
    if not bool((mask == (torch.arange(mask.shape[1]) < lengths[:, None])).all()):
        raise ValueError("pack_batch needs right-padded rows (attention_mask ones then zeros)")
    flat_ids = input_ids[mask]
    positions = torch.arange(mask.shape[1]).expand_as(mask)[mask]
    # next-token targets within each row; the last real token of a row has none
    next_labels = torch.full_like(labels, IGNORE_INDEX)
    next_labels[:, :-1] = labels[:, 1:]
    next_labels[~mask] = IGNORE_INDEX
    flat_targets = next_labels[mask]
    loss_index = (flat_targets != IGNORE_INDEX).nonzero().flatten()
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    return {
        "input_ids": flat_ids[None],
        "position_ids": positions[None],
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(lengths.max()) if len(lengths) else 0,
        "loss_index": loss_index,
        "targets": flat_targets[loss_index],
        "num_targets": int(loss_index.numel()),
    }


def pack_batches(batches: list[dict[str, torch.Tensor]]) -> dict:
    """One packed row of several host batches laid end to end (`pack_batch` of each), plus
    `token_part` and `row_part`: the index of the batch each token and each loss row came from."""
    parts = [pack_batch(batch) for batch in batches]
    tokens = [part["input_ids"].shape[1] for part in parts]
    offsets = [0, *torch.tensor(tokens).cumsum(0).tolist()]
    return {
        "input_ids": torch.cat([part["input_ids"] for part in parts], 1),
        "position_ids": torch.cat([part["position_ids"] for part in parts], 1),
        "cu_seqlens": torch.cat([parts[0]["cu_seqlens"][:1]]
                                + [part["cu_seqlens"][1:] + offset for part, offset in zip(parts, offsets)]),
        "max_seqlen": max(part["max_seqlen"] for part in parts),
        "loss_index": torch.cat([part["loss_index"] + offset for part, offset in zip(parts, offsets)]),
        "targets": torch.cat([part["targets"] for part in parts]),
        "num_targets": sum(part["num_targets"] for part in parts),
        "token_part": torch.repeat_interleave(torch.arange(len(parts)), torch.tensor(tokens)),
        "row_part": torch.repeat_interleave(torch.arange(len(parts)),
                                            torch.tensor([part["num_targets"] for part in parts])),
    }


def packed_to_device(packed: dict, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {k: (v.pin_memory().to(device, non_blocking=True) if non_blocking else v.to(device))
            if isinstance(v, torch.Tensor) else v for k, v in packed.items()}


def packed_model_kwargs(packed: dict) -> dict:
    """Keyword arguments for a transformers decoder whose attention is `PACKED_ATTENTION`."""
    return {
        "input_ids": packed["input_ids"],
        "position_ids": packed["position_ids"],
        "attention_mask": READY_MASK,
        "cu_seq_lens_q": packed["cu_seqlens"],
        "cu_seq_lens_k": packed["cu_seqlens"],
        "max_length_q": packed["max_seqlen"],
        "max_length_k": packed["max_seqlen"],
        "use_cache": False,
    }
