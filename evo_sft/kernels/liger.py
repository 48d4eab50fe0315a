"""Liger kernels (liger-kernel, GPU only), where they are installed."""
import warnings

import torch

from evo_sft.data import IGNORE_INDEX


def liger_loss():
    """Liger's fused linear cross-entropy (summed), or None with a warning where liger-kernel
    or a GPU is missing."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        warnings.warn("use_liger_loss=True but liger-kernel is not installed; using the chunked loss")
        return None
    if not torch.cuda.is_available():
        warnings.warn("use_liger_loss=True but no GPU is present; using the chunked loss")
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


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
