"""A fused forward for PEFT's LoRA `Linear` layers.

`fast_lora(model)` swaps the forward of PEFT's LoRA `Linear` layers for one that keeps the
adapter arithmetic in the activations' dtype (bf16 on the GPU) while the adapter weights stay
float32 masters, and folds the scaling and the residual add into one `addmm`.
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F


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
