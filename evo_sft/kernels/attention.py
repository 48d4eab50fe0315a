"""Causal attention within each document of a packed row, registered with transformers.

Attention that honours the document boundaries is registered under `PACKED_ATTENTION`: on CUDA
it calls PyTorch's own FlashAttention-2 varlen kernel (`aten::_flash_attention_forward` with
`cu_seqlens`, no extra package), elsewhere it runs `scaled_dot_product_attention` document by
document. Calls without `cu_seq_lens_q` (ordinary padded batches) go to transformers' sdpa path
with its usual mask, so the model stays usable.
"""
import torch
import torch.nn.functional as F

PACKED_ATTENTION = "evo_sft_packed"


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
