"""LoRA adapters of an agent's PEFT model: copying one into another, reconciling a saved adapter
with a different rank or target modules (`load_checkpoint(merge_lora_configs=True)`), and changing
the rank and alpha of a live adapter.

Rank and alpha are hyperparameters that mutate (evo_sft.hyperparameters), and a mutation keeps
the member's function: with scaling s = alpha / r (alpha / sqrt(r) with rsLoRA), each layer adds
dW = s * B @ A, and the new (A', B') of rank r' and scaling s' give s' * B' @ A' = dW
- growing (r' > r): A' is A with r' - r new rows, drawn as PEFT draws A (kaiming-uniform, a=sqrt(5))
  from torch's current generator (the member's own, see MemberHost), and B' is B * s / s' with
  r' - r zero columns, so dW is unchanged;
- shrinking (r' < r): dW's best rank-r' approximation (truncated SVD, dW = U S V^T), split evenly:
  B' = U sqrt(S / s'), A' = sqrt(S / s') V^T; where dW has no weight left (a singular value of 0,
  as in an adapter that has not trained yet, B = 0) the rank is given fresh A rows and zero B
  columns, as a new adapter has, since zero rows of A and columns of B would never get a gradient;
- the same rank with another alpha: B' = B * s / s'.
So alpha does not change what the member computes; it changes how fast the adapter moves from
there on (under Adam an update of B moves dW in proportion to s').
"""
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


def scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's factor on B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def merged_config(current, saved):
    """The larger rank and the union of target modules. lora_alpha is chosen so that the
    scaling equals the saved adapter's: the saved weights, padded into the top-left slice, then
    give exactly the saved adapter's output."""
    merged = copy.deepcopy(current)
    merged.r = max(current.r, saved.r)
    alpha = scaling(saved.r, saved.lora_alpha, saved.use_rslora) / scaling(merged.r, 1.0, merged.use_rslora)
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


def actor_layers(model) -> list:
    """Every LoRA layer of `model` that holds the actor adapter."""
    return [module for module in model.modules() if ACTOR in getattr(module, "lora_A", {})]


def set_settings(model, r: int, alpha: float, dropout: float) -> None:
    """Record rank, alpha and dropout of the actor adapter in each layer (r, alpha, scaling, the
    dropout module) and in its PEFT config, for the weights the layers hold now."""
    config = model.peft_config[ACTOR]
    factor = scaling(r, alpha, config.use_rslora)
    for module in actor_layers(model):
        module.r[ACTOR], module.lora_alpha[ACTOR], module.scaling[ACTOR] = r, alpha, factor
        module.lora_A[ACTOR].out_features = module.lora_B[ACTOR].in_features = r
        current = module.lora_dropout[ACTOR]
        if (current.p if isinstance(current, torch.nn.Dropout) else 0.0) != dropout:
            replacement = torch.nn.Dropout(p=dropout) if dropout > 0 else torch.nn.Identity()
            module.lora_dropout[ACTOR] = replacement.train(current.training)
    config.r, config.lora_alpha, config.lora_dropout = r, alpha, dropout


def zero_padded(tensor: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros appended along `dim` up to `size`."""
    shape = list(tensor.shape)
    shape[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


@torch.no_grad()
def changed_rank(a: torch.Tensor, b: torch.Tensor, old_scaling: float, r: int,
                 new_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank `r` with new_scaling * B' @ A' = old_scaling * B @ A, or its best rank-r
    approximation where `r` is smaller than A's rows (see the module's docstring)."""
    rank = a.shape[0]
    if r == rank:
        return a.clone(), b * (old_scaling / new_scaling)
    if r > rank:
        return torch.cat([a, fresh_rows(r - rank, a)]), zero_padded(b * (old_scaling / new_scaling), r, 1)
    # dW = s B A = Qb (s Rb Ra^T) Qa^T: the SVD of the small core gives dW's, without forming dW.
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, singular, vh = torch.linalg.svd(old_scaling * r_b @ r_a.T)
    root = (singular[:r] / new_scaling).sqrt()
    new_b = ((q_b @ u[:, :r]) * root).to(b.dtype)
    new_a = (root[:, None] * (vh[:r] @ q_a.T)).to(a.dtype)
    unused = singular[:r] <= singular[0] * 1e-9
    if unused.any():
        new_a[unused] = fresh_rows(int(unused.sum()), a)
        new_b[:, unused] = 0
    return new_a, new_b


def fresh_rows(count: int, a: torch.Tensor) -> torch.Tensor:
    """`count` new rows for A, drawn as PEFT initialises lora_A (kaiming-uniform, a=sqrt(5))."""
    rows = torch.empty(count, a.shape[1], dtype=a.dtype, device=a.device)
    return torch.nn.init.kaiming_uniform_(rows, a=math.sqrt(5))
