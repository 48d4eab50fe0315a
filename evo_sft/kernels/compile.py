"""torch.compile of a model's decoder layers."""


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
