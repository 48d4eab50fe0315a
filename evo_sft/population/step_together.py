"""Several LoRA members of one base model through one forward and one backward.

Their micro-batches are packed into one padding-free row. Each LoRA layer runs its frozen base
layer once for all tokens, and every member's adapter at once: x @ [A_1; ...; A_k]^T gives each
token every member's projection (member i's rank r_i rows; members may differ in rank), a block
mask keeps only the token's own member's block, and one matmul with [s_1 B_1 ... s_k B_k] (each B
scaled by its member's own LoRA scaling) adds the deltas. A member's loss is normalised by its own
step's supervised tokens, so the gradient of the summed objective with respect to a member's
adapter is the gradient of that member's own step, as if it had trained alone.

It needs packed batches, the fast LoRA forward on every adapter, no LoRA dropout (each member's
masks would have to come from its own generator), a frozen linear output head and no trained
parameters besides the adapters. `blocker` names what is missing.

A NaN or inf in one member would reach the others (0 * NaN is NaN in the stacked matmuls), so
a step whose losses or gradients are not all finite is redone with each member on its own.
"""
import itertools
from contextlib import contextmanager

import torch

from evo_sft.kernels import packing
from evo_sft.kernels.lora import cast_scaled, is_fast_lora
from evo_sft.kernels.loss import frozen_head_losses, is_frozen_linear, supervised_token_count
from evo_sft.sft import SFT, step
from evo_sft.sft.lora import ACTOR


def lora_layers(agent: SFT) -> list[tuple[torch.nn.Module, str, str]]:
    """(layer, name of its A weight, name of its B weight) for each fast LoRA layer of the agent."""
    return [(module, f"{name}.lora_A.{ACTOR}.weight", f"{name}.lora_B.{ACTOR}.weight")
            for name, module in agent.actor.named_modules()
            if is_fast_lora(module) and ACTOR in module.lora_A]


def blocker(agent: SFT) -> str | None:
    """Why the members of this agent's base model cannot step together, or None."""
    if not agent.packing:
        return "packed batches are off (agent.packing; on by default on a GPU)"
    if agent.liger_loss is not None:
        return "agent.use_liger_loss is on"
    if not is_frozen_linear(step.decoder_and_head(agent)[1]):
        return "the output head is trained (LoRA or modules_to_save on it)"
    layers = lora_layers(agent)
    others = sorted(set(agent.trainable_parameters()) - {name for _, a, b in layers for name in (a, b)})
    if others:
        return f"parameters besides LoRA adapters are trained ({others[0]})"
    for module, _, _ in layers:
        if not isinstance(module.lora_dropout[ACTOR], torch.nn.Identity):
            return "lora.lora_dropout > 0 (masks would have to come from each member's own generator)"
        if (ACTOR in module.lora_variant or module.lora_A[ACTOR].bias is not None
                or module.lora_B[ACTOR].bias is not None or not isinstance(module.base_layer, torch.nn.Linear)):
            return "an adapter is not a plain LoRA on a Linear layer (DoRA, bias or another base layer)"
    return None


@contextmanager
def members_in_layers(layers, dtype: torch.dtype, weights: list[dict[str, torch.Tensor]], token_part: torch.Tensor,
                      scalings: list[float]):
    """For the forward and backward inside the block, every LoRA layer holds the adapters of all
    members in `weights`, stacked and cast to the compute dtype (each B scaled by its member's
    `scalings[i]`; gradients flow back to each member's tensors), and the block mask that gives
    token t only the adapter of member `token_part[t]`. Members may differ in rank: member i owns
    the next `rank_i` rows of the stacked A (the same in every layer)."""
    k = len(weights)
    masters, scales = [], []
    for module, a_name, b_name in layers:
        masters.append(torch.cat([member[a_name] for member in weights]))
        masters += [member[b_name] for member in weights]
        scales += [1.0, *scalings]
    cast = cast_scaled(dtype, scales, masters)
    ranks = [member[layers[0][1]].shape[0] for member in weights] if layers else []
    columns = torch.arange(sum(ranks), device=token_part.device)
    owner = torch.zeros_like(columns)  # the member of each row of the stacked A, made on the device (no copy, no sync)
    for start in itertools.accumulate(ranks[:-1]):
        owner += columns >= start
    mask = (owner == token_part[:, None]).to(dtype)
    for index, (module, _, _) in enumerate(layers):
        weight_a, *weights_b = cast[index * (k + 1):(index + 1) * (k + 1)]
        module._joint = (weight_a, torch.cat(weights_b, dim=1), mask)
    try:
        yield
    finally:
        for module, _, _ in layers:
            del module._joint


def forward_backward(agent: SFT, layers, weights: list[dict[str, torch.Tensor]], batches: list[dict],
                     micro_sizes: list[int],
                     scalings: list[float]) -> tuple[list[dict | None], torch.Tensor, list[int]]:
    """One optimizer step's gradients for each member: `weights[i]` is member i's adapter tensors
    by parameter name (of its own rank), `scalings[i]` its LoRA scaling, `batches[i]` its step's
    host batch, cut into micro-batches of `micro_sizes[i]` rows. The i-th micro-batches of all
    members go through one forward and backward. Returns each member's gradients by name (None
    for a step without supervised tokens), the loss sums on the device ([members], float32) and
    the supervised tokens."""
    step_tokens = [supervised_token_count(batch["labels"]) for batch in batches]
    leaves = [{name: w.detach().requires_grad_() for name, w in member.items()} if tokens else None
              for member, tokens in zip(weights, step_tokens)]
    micro_batches = [list(step.micro_batches(batch, micro)) if tokens else []
                     for batch, micro, tokens in zip(batches, micro_sizes, step_tokens)]
    head = step.decoder_and_head(agent)[1]
    loss_sums = torch.zeros(len(weights), dtype=torch.float32, device=agent.device)
    for round_index in range(max(map(len, micro_batches))):
        present = [i for i, micro in enumerate(micro_batches) if round_index < len(micro)]
        packed = packing.pack_batches([micro_batches[i][round_index] for i in present])
        packed["row_member"] = torch.tensor(present)[packed["row_part"]]
        packed["row_weight"] = torch.tensor([1.0 / step_tokens[i] for i in present])[packed["row_part"]]
        packed = packing.packed_to_device(packed, agent.device)
        with members_in_layers(layers, head.weight.dtype, [leaves[i] for i in present], packed["token_part"],
                               [scalings[i] for i in present]):
            losses = frozen_head_losses(step.packed_rows(agent, packed), head, packed["targets"], agent.compile_layers)
            (losses * packed["row_weight"]).sum().backward()
        loss_sums.index_add_(0, packed["row_member"], losses.detach())
    grads = [{name: leaf.grad for name, leaf in member.items()} if member is not None else None for member in leaves]
    return grads, loss_sums, step_tokens


def all_finite(grads: list[dict | None], loss_sums: torch.Tensor) -> torch.Tensor:
    """On the device, without a sync: whether every loss sum and every gradient is finite."""
    norms = [torch.stack(torch._foreach_norm(list(member.values()))).sum() for member in grads if member is not None]
    return torch.isfinite(torch.stack([loss_sums.sum(), *norms])).all()
