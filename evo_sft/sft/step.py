"""The SFT step, one screen: an optimizer step over a batch of rows, cut into micro-batches whose
summed response-token cross-entropy is divided by the supervised tokens of the whole step.

A micro-batch runs either as one padding-free packed row (`agent.packing`, varlen attention) or
as a right-padded batch; either way the decoder's hidden states are kept only at supervised
positions and the head's loss is computed in chunks (`evo_sft.kernels.loss`). Members stepped
together on one base model (`evo_sft.population.step_together`) use `packed_rows` and
`head_losses` from here. An agent trained by several processes (`agent.replicas`,
`evo_sft.sft.data_parallel`) runs its share of the micro-batches and sums the step over them.
"""
import warnings
from contextlib import nullcontext

import torch

from evo_sft.data import IGNORE_INDEX
from evo_sft.kernels import packing
from evo_sft.kernels.lora import lora_step_weights
from evo_sft.kernels.loss import checkpointed_loss_sum, frozen_head_losses, is_frozen_linear, supervised_token_count


def optimizer_step(agent, batch: dict[str, torch.Tensor], micro_size: int,
                   training: bool = True) -> tuple[torch.Tensor | float, int]:
    """One optimizer step on `batch` (host tensors): (summed loss on the device, supervised tokens)."""
    tokens = supervised_token_count(batch["labels"])
    if tokens == 0:
        warnings.warn(f"agent {agent.index}: an optimizer step had no supervised tokens and was skipped")
        return 0.0, 0
    if training:
        agent.optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=agent.device)
    micros = micro_batches(batch, micro_size)
    for micro in agent.replicas.share(micros) if agent.replicas else micros:
        with lora_weights(agent):
            loss_sum = micro_loss_sum(agent, micro)
            if training:
                (loss_sum / tokens).backward()
        step_loss += loss_sum.detach()
    if agent.replicas:
        step_loss = agent.replicas.sum(step_loss)
    if training:
        agent.apply_gradients()
    return step_loss, tokens


def micro_batches(batch: dict[str, torch.Tensor], size: int):
    """Consecutive `size`-row slices of a right-padded batch, each trimmed to its longest row."""
    for start in range(0, batch["input_ids"].shape[0], size):
        yield trim_padding({k: v[start:start + size] for k, v in batch.items()})


def micro_loss_sum(agent, micro: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the supervised tokens of one host-side micro-batch."""
    if agent.packing:
        packed = packing.packed_to_device(packing.pack_batch({k: v.cpu() for k, v in micro.items()}), agent.device)
        return head_losses(agent, packed_rows(agent, packed), packed["targets"]).sum()
    return head_losses(agent, *padded_rows(agent, micro)).sum()


def padded_rows(agent, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's hidden states at the supervised positions of a right-padded micro-batch, and
    the next tokens they predict."""
    batch = agent.to_device(batch)
    attention_mask = batch["attention_mask"]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0) if agent.calc_position_embeddings else None
    decoder, _ = decoder_and_head(agent)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=attention_mask,
                     position_ids=position_ids, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    return hidden[:, :-1][supervised], targets[supervised]


def packed_rows(agent, packed: dict) -> torch.Tensor:
    """The decoder's hidden states at the loss rows of a packed row on the device."""
    decoder, _ = decoder_and_head(agent)
    hidden = decoder(**packing.packed_model_kwargs(packed)).last_hidden_state[0]
    return hidden.index_select(0, packed["loss_index"])


def head_losses(agent, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row through the output head (float32, [rows]; a single summed value
    with Liger's fused loss). Logits exist only chunk by chunk."""
    _, head = decoder_and_head(agent)
    if hidden.shape[0] == 0:
        # No supervised token: a zero still in the graph, so backward() gives every parameter a (zero) gradient.
        return hidden.float().sum()[None]
    if agent.liger_loss is not None and isinstance(head, torch.nn.Linear):
        return agent.liger_loss(head.weight, hidden, targets, head.bias)[None]
    if is_frozen_linear(head):
        return frozen_head_losses(hidden, head, targets, agent.compile_layers)
    return checkpointed_loss_sum(hidden, head, targets)[None]


def lora_weights(agent):
    """The LoRA weights cast once for a packed micro-batch's forward and backward."""
    if not agent.packing:
        return nullcontext()
    return lora_step_weights(agent.actor, decoder_and_head(agent)[1].weight.dtype)


def decoder_and_head(agent):
    model = agent.actor.get_base_model() if agent.is_lora else agent.actor
    return model.get_decoder(), model.get_output_embeddings()


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    width = int(batch["attention_mask"].sum(-1).max())
    return {k: v[:, :width] for k, v in batch.items()}
