"""How local each layer's attention is: the share of attention mass that falls on the last w
keys, per decoder layer, on calibration text (the signal for turning a layer into a
sliding-window layer: hybrid local/global attention keeps the KV cache of the local layers to
w tokens).

The layers run with eager attention so that each attention module returns its probabilities;
a forward hook reduces them at once (nothing of size L x L is kept). Queries closer than w to
the start see all their keys and are left out of the average for that w."""
from __future__ import annotations

import torch

from ..calibrate import LayerProcessor, run_layerwise

WIDTHS = (64, 128, 256, 512, 1024)


def local_mass(probs: torch.Tensor, widths) -> list[tuple[float, int]]:
    """For attention probabilities (..., L, L) over causal keys: per width w, the summed mass
    within the last w keys of each query at position >= w, and how many such queries."""
    L = probs.shape[-1]
    cs = probs.float().cumsum(-1)
    flat = cs.reshape(-1, L, L)
    out = []
    for w in widths:
        if w >= L:
            out.append((0.0, 0))
            continue
        q = torch.arange(w, L)
        inside = flat[:, q, q] - flat[:, q, q - w]  # keys q-w+1 .. q
        out.append((inside.sum().item(), inside.numel()))
    return out


class _SpanProcessor(LayerProcessor):
    modifies_layer = False

    def __init__(self, widths):
        self.widths = widths
        self.sums: list[list[float]] = []
        self._acc = None
        self._hook = None

    def _on_attention(self, module, args, output):
        probs = output[1]
        for k, (s, n) in enumerate(local_mass(probs, self.widths)):
            self._acc[k][0] += s
            self._acc[k][1] += n

    def begin(self, layer) -> None:
        self._acc = [[0.0, 0] for _ in self.widths]
        self._hook = layer.module.self_attn.register_forward_hook(self._on_attention)

    def after(self, layer, outputs) -> None:
        self._hook.remove()
        self.sums.append([s / n if n else float("nan") for s, n in self._acc])


def attention_span(model, windows: torch.Tensor, widths=WIDTHS, offload: bool = False) -> list[list[float]]:
    """(layers, widths): the mean share of attention mass within the last w keys."""
    proc = _SpanProcessor(tuple(widths))
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        run_layerwise(model, windows, proc, offload=offload, description="attention span")
    finally:
        model.set_attn_implementation(previous)
    return proc.sums
