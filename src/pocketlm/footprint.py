"""The peak memory of a layer-wise compression, predicted before it starts (and reported next to
the measured peak): what the process holds already, the weights (all of them, or when streamed
the parts outside the decoder layers plus the largest layer), the calibration activations (unless
offloaded to disk), one window's forward pass through a layer, and what the method keeps and
allocates for one layer (``Stage.memory_bytes``)."""
from __future__ import annotations

from torch import nn

from .models import ModelAdapter


def param_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters, tied ones counted once (meta parameters by their shape;
    a model whose config ties its head to its embedding counts them once even before the tie)."""
    seen, total = set(), 0
    head = None  # a head the config ties but that is not (yet) the embedding itself
    tied = getattr(getattr(module, "config", None), "tie_word_embeddings", False)
    if tied and hasattr(module, "get_output_embeddings"):
        out = getattr(module.get_output_embeddings(), "weight", None)
        head = out if out is not getattr(module.get_input_embeddings(), "weight", None) else None
    for p in module.parameters():
        if id(p) not in seen and p is not head:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def loaded_bytes(module: nn.Module) -> int:
    """Bytes of the parameters actually in memory (not on ``meta``), shared ones counted once."""
    seen, total = set(), 0
    for p in module.parameters():
        if p.device.type != "meta" and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def predict_peak(model: nn.Module, n_windows: int, seq_len: int, stages: list, streamed: bool,
                 offload: bool, base: int) -> dict:
    """Predicted peak resident bytes, by part (``base``: the process's resident bytes now)."""
    cfg = model.config
    layers = ModelAdapter(model).layers
    layer = max((param_bytes(lay) for lay in layers), default=0)
    weights = param_bytes(model)
    if streamed:
        weights = weights - sum(param_bytes(lay) for lay in layers) + layer
    hidden, inter = cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    acts = 0 if offload else n_windows * seq_len * hidden * 4
    # one window through one layer: MLP gate, up and product, attention scores per head, residuals
    forward = seq_len * (3 * inter + 6 * hidden) * 4 + cfg.num_attention_heads * seq_len * seq_len * 4
    shapes = {n: tuple(m.weight.shape) for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)} \
        if len(layers) else {}
    held, transient = 0, 0
    for s in stages:
        h, t = s.memory_bytes(shapes) or (0, 0)  # a stage that cannot say counts nothing here
        held, transient = max(held, h), max(transient, t)
    parts = {"process": base, "weights": weights, "activations": acts, "method_held": held,
             "forward_or_method_transient": max(forward, transient)}
    return {**parts, "predicted_peak_bytes": sum(parts.values())}


def in_memory_need(config, stages: list, n_windows: int, seq_len: int, offload: bool) -> int:
    """Bytes an in-memory run of ``stages`` would add to this process (its weights in float32,
    activations, one layer's forward and method buffers), from the config alone: a lower bound
    where a stage cannot say what it needs."""
    from .stream import skeleton

    return predict_peak(skeleton(config), n_windows, seq_len, stages, False, offload, 0)["predicted_peak_bytes"]
