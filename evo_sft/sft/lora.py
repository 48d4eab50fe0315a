"""LoRA adapters of an agent's PEFT model: copying one into another, and reconciling a saved
adapter with a different rank or target modules (`load_checkpoint(merge_lora_configs=True)`)."""
import copy
import math

import torch

ACTOR = "actor"
REFERENCE = "reference"


def copy_adapter(model, source: str, target: str) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if f".{source}." in name or name.endswith(f".{source}"):
                params[name.replace(f".{source}", f".{target}")].copy_(param)


def signature(config) -> dict:
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules) if config.target_modules else None,
    }


def config_kwargs(config: dict) -> dict:
    """`peft.LoraConfig` keyword arguments from its `to_dict()` (sets as sorted lists)."""
    from peft import LoraConfig

    fields = LoraConfig.__dataclass_fields__
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items() if k in fields and fields[k].init}


def merged_config(current, saved):
    """The larger rank and the union of target modules. lora_alpha is chosen so that the
    scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) equals the saved adapter's: the saved
    weights, padded into the top-left slice, then give exactly the saved adapter's output."""
    def rank_divisor(r: int, rslora: bool) -> float:
        return math.sqrt(r) if rslora else r

    merged = copy.deepcopy(current)
    merged.r = max(current.r, saved.r)
    saved_scaling = saved.lora_alpha / rank_divisor(saved.r, saved.use_rslora)
    alpha = saved_scaling * rank_divisor(merged.r, merged.use_rslora)
    merged.lora_alpha = int(alpha) if float(alpha).is_integer() else alpha
    merged.target_modules = set(current.target_modules or ()) | set(saved.target_modules or ())
    return merged


def pad_weights(weights: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Place each saved LoRA matrix in the top-left slice of the freshly built (larger) one.
    The fresh lora_B is zero, so the extra rank adds nothing until it trains."""
    from peft import get_peft_model_state_dict

    padded = {}
    for name, current in get_peft_model_state_dict(model, adapter_name=ACTOR).items():
        block = current.detach().clone()
        if name in weights:
            saved = weights[name]
            block[tuple(slice(0, n) for n in saved.shape)] = saved.to(block.dtype)
        padded[name] = block
    return padded
