"""Padding-free packed micro-batches for the SFT step.

A right-padded batch (input_ids / attention_mask / labels, as `evo_sft.data.collate` makes it)
becomes one row of all real tokens laid end to end, with per-document `position_ids` and the
cumulative sequence lengths `cu_seqlens` that varlen attention needs. Everything is computed on
the host from the host-side batch, so the training step needs no device-to-host sync for shapes.

Attention that honours the document boundaries is registered with transformers under
`PACKED_ATTENTION`: on CUDA it calls PyTorch's own FlashAttention-2 varlen kernel
(`aten::_flash_attention_forward` with `cu_seqlens`, no extra package), elsewhere it runs
`scaled_dot_product_attention` document by document. Calls without `cu_seq_lens_q` (ordinary
padded batches) go to transformers' sdpa path with its usual mask, so the model stays usable.

`fast_lora(model)` swaps the forward of PEFT's LoRA `Linear` layers for one that keeps the
adapter arithmetic in the activations' dtype (bf16 on the GPU) while the adapter weights stay
float32 masters, and folds the scaling and the residual add into one `addmm`.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from evo_sft.data import IGNORE_INDEX

PACKED_ATTENTION = "evo_sft_packed"
# Rows x vocabulary elements per chunk of the frozen-head cross-entropy: 2**25 is ~220 rows of a
# 152k vocabulary, ~130 MiB of float32 logits, small beside the activations of a packed step.
LOSS_CHUNK_ELEMENTS = 2**25
# What a packed forward passes as its attention mask: a ready 4-D mask, which transformers' mask
# builders return unchanged (in models that build one mask and in those that build one per
# attention type) instead of materialising a tokens x tokens mask; the packed attention ignores it.
READY_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


# ----------------------------------------------------------------------------- packing
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


# ----------------------------------------------------------------------------- attention
def _varlen_reference(q, k, v, cu_seqlens, scale):
    """Document-by-document causal sdpa (any device, any dtype). q/k/v: [T, H, D]."""
    bounds = cu_seqlens.tolist()
    groups = q.shape[1] // k.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs, 0)


def _flash_usable(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def _flash_forward(q, k, v, cu_seqlens, max_seqlen, scale):
    out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False, scale=scale)
    return out, lse, rng_state, unused


# Varlen attention as custom operators: torch.compile sees one opaque node (no graph break inside
# a compiled, checkpointed decoder layer). On CUDA in half precision they run PyTorch's built-in
# FlashAttention-2 varlen kernel (causal, no dropout); elsewhere `_varlen_reference`, whose
# backward recomputes it under autograd.
@torch.library.custom_op("evo_sft::varlen_attention_forward", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, float? scale)"
                                " -> (Tensor, Tensor, Tensor, Tensor)")
def _varlen_forward(q, k, v, cu_seqlens, max_seqlen, scale):
    """(out, logsumexp, rng_state, unused): what the backward needs. q: [T, Hq, D], k/v: [T, Hkv, D]."""
    if _flash_usable(q):
        return _flash_forward(q, k, v, cu_seqlens, max_seqlen, scale)
    empty = q.new_empty(0)
    return _varlen_reference(q, k, v, cu_seqlens, scale), empty, empty.clone(), empty.clone()


@_varlen_forward.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    if _flash_usable(q):  # the aten kernel's own shape rules
        return _flash_forward(q, k, v, cu_seqlens, max_seqlen, scale)
    return torch.empty_like(q), q.new_empty(0), q.new_empty(0), q.new_empty(0)


@torch.library.custom_op("evo_sft::varlen_attention_backward", mutates_args=(),
                         schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                                "Tensor cu_seqlens, Tensor rng_state, Tensor unused, SymInt max_seqlen, float? scale)"
                                " -> (Tensor, Tensor, Tensor)")
def _varlen_backward(grad_out, q, k, v, out, lse, cu_seqlens, rng_state, unused, max_seqlen, scale):
    if _flash_usable(q):
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            0.0, True, rng_state, unused, scale=scale)
        return dq, dk, dv
    _, pullback = torch.func.vjp(lambda *qkv: _varlen_reference(*qkv, cu_seqlens, scale), q, k, v)
    return pullback(grad_out)


@_varlen_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, rng_state, unused, max_seqlen, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_for_varlen_backward(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse, rng_state, unused = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _varlen_gradients(ctx, grad_out, *unused_grads):
    dq, dk, dv = _varlen_backward(grad_out, *ctx.saved_tensors, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_varlen_forward.register_autograd(_varlen_gradients, setup_context=_save_for_varlen_backward)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, scale: float | None):
    """Causal attention within each document of a packed row. q: [T, Hq, D], k/v: [T, Hkv, D]."""
    return _varlen_forward(q, k, v, cu_seqlens, max_seqlen, scale)[0]


def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface. query: [1, Hq, T, D]; returns ([1, T, Hq, D], None)."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got batch {query.shape[0]}")
    if dropout:
        raise ValueError("packed attention does not implement attention dropout")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    if _flash_usable(q):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = varlen_attention(q, k, v, cu_seqlens, kwargs["max_length_q"], scaling)
    return out[None], None


def register_packed_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def enable_packed_attention(model) -> bool:
    """Point the model's attention at `PACKED_ATTENTION`. False (model unchanged) where the
    model has no transformers config to switch."""
    try:
        register_packed_attention()
    except Exception:  # transformers without the attention/mask registries
        return False
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return False
    try:
        model.set_attn_implementation(PACKED_ATTENTION)
    except Exception:  # older/newer transformers without the setter accepting custom names
        config._attn_implementation = PACKED_ATTENTION
    return config._attn_implementation == PACKED_ATTENTION


# ----------------------------------------------------------------------------- LoRA
_FAST_CLASSES: dict[type, type] = {}


def _fast_lora_forward(self, x, *args, **kwargs):
    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or active[0] not in self.lora_A or active[0] in self.lora_variant
            or self.lora_A[active[0]].bias is not None or self.lora_B[active[0]].bias is not None
            or not isinstance(self.base_layer, torch.nn.Linear)):
        return super(type(self), self).forward(x, *args, **kwargs)
    name = active[0]
    base = self.base_layer(x)
    joint = getattr(self, "_joint", None)
    if joint is not None:  # several members' tokens: see evo_sft.population.step_together
        weight_a, weight_b, block_mask = joint
        hidden = F.linear(x, weight_a).mul_(block_mask)
        out = torch.addmm(base.reshape(-1, base.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), weight_b.t())
        return out.view(base.shape)
    cached = getattr(self, "_step_weights", None)
    if cached is not None and cached[0] == name and cached[1] == x.dtype:
        weight_a, weight_b = cached[2], cached[3]
    else:
        weight_a = self.lora_A[name].weight.to(x.dtype)
        weight_b = (self.lora_B[name].weight * self.scaling[name]).to(x.dtype)
    hidden = F.linear(self.lora_dropout[name](x), weight_a)
    out = torch.addmm(base.reshape(-1, base.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), weight_b.t())
    return out.view(base.shape)


class _CastAll(torch.autograd.Function):
    """All LoRA master weights to the compute dtype (B pre-scaled) in a few foreach kernels,
    instead of two or three small ops per layer per forward (and again per recompute)."""

    @staticmethod
    def forward(ctx, dtype, scales, *masters):
        ctx.scales, ctx.master_dtypes = scales, [m.dtype for m in masters]
        return _cast_scaled(dtype, scales, masters)

    @staticmethod
    def backward(ctx, *grads):
        out = [None if g is None else g.to(dt) * s for g, s, dt in zip(grads, ctx.scales, ctx.master_dtypes)]
        return (None, None, *out)


def _cast_scaled(dtype, scales, masters):
    scaled = torch._foreach_mul([m.detach() for m in masters], list(scales))
    return tuple(t.to(dtype) for t in scaled)


def cast_scaled(dtype: torch.dtype, scales: list[float], masters: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """`masters[i] * scales[i]` in `dtype`, by one autograd node where gradients are wanted."""
    if torch.is_grad_enabled() and any(m.requires_grad for m in masters):
        return _CastAll.apply(dtype, tuple(scales), *masters)
    with torch.no_grad():
        return _cast_scaled(dtype, tuple(scales), masters)


def is_fast_lora(module) -> bool:
    return type(module) in _FAST_CLASSES.values()


@contextmanager
def lora_step_weights(model, dtype: torch.dtype):
    """For one micro-batch's forward and backward (a checkpointed layer's recompute included):
    each fast LoRA layer takes its compute-dtype weights from one autograd node made here, so
    gradients still reach the float32 masters, instead of two or three small ops per layer per
    forward and recompute."""
    layers, masters, scales = [], [], []
    for module in model.modules():
        if is_fast_lora(module):
            active = module.active_adapters
            if len(active) != 1 or active[0] not in module.lora_A or module.disable_adapters or module.merged:
                continue
            a, b = module.lora_A[active[0]].weight, module.lora_B[active[0]].weight
            if a.dtype == dtype and b.dtype == dtype and module.scaling[active[0]] == 1:
                continue
            layers.append((module, active[0]))
            masters += [a, b]
            scales += [1.0, float(module.scaling[active[0]])]
    cast = cast_scaled(dtype, scales, masters) if layers else ()
    for i, (module, name) in enumerate(layers):
        module._step_weights = (name, dtype, cast[2 * i], cast[2 * i + 1])
    try:
        yield
    finally:
        for module, _ in layers:
            del module._step_weights


def _fast_class(cls: type) -> type:
    if cls not in _FAST_CLASSES:
        fast = type(f"Fast{cls.__name__}", (cls,), {"forward": _fast_lora_forward, "__module__": __name__})
        _FAST_CLASSES[cls] = fast
        globals()[fast.__name__] = fast  # importable by name, so pickling works
    return _FAST_CLASSES[cls]


def fast_lora(model) -> int:
    """Give every PEFT LoRA `Linear` the fused forward (a subclass; PEFT's own forward is used
    for merged, disabled, multi-adapter, DoRA/variant or biased adapters). Returns layers patched."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    patched = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = _fast_class(LoraLinear)
            patched += 1
    return patched


# ----------------------------------------------------------------------------- loss
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


# ----------------------------------------------------------------------------- compile
def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer (dynamic shapes: packed lengths vary per step). Varlen
    attention is a custom operator, one opaque node in the graph. Returns the layers compiled."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        return 0
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


# ----------------------------------------------------------------------------- Liger layer kernels
def apply_liger_layer_kernels(model) -> bool:
    """Liger's fused RoPE, RMSNorm and SwiGLU on this model instance (no cross-entropy patch:
    the packed loss has its own). Note Liger also swaps transformers' module-level RoPE function
    and MLP class for the model type, which affects models built later in the process the same
    way (numerically equivalent kernels). False where liger-kernel or a GPU is missing."""
    if not torch.cuda.is_available():
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return True
