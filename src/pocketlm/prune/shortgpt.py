"""ShortGPT (Men, Xu et al., 2024): remove whole decoder layers.

Block Influence of layer i on calibration text: BI_i = 1 - mean over tokens of
cos(h_i, h_{i+1}), the hidden state entering versus leaving the layer. Layers that barely
change the hidden state (low BI) are removed; the model is renumbered and its config updated,
so it saves and reloads as a smaller transformers model.
"""
from __future__ import annotations

import random
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..calibrate import LayerProcessor, LayerView, _layers_prefix, run_layerwise
from ..errors import PocketError
from ..models import ModelAdapter
from ..stages import Stage, register


class BlockInfluence(LayerProcessor):
    modifies_layer = False

    def __init__(self):
        self.bi: list[float] = []

    def after(self, layer: LayerView, outputs) -> None:
        total, count = 0.0, 0
        for i in range(len(outputs)):
            cos = F.cosine_similarity(layer.inputs[i].float(), outputs[i].float(), dim=-1)
            total += float(cos.sum())
            count += cos.numel()
        self.bi.append(1 - total / count)


def block_influence(model, windows: torch.Tensor, offload: bool = False) -> list[float]:
    """BI of every decoder layer, in order, on ``windows`` (n, L) token ids."""
    proc = BlockInfluence()
    run_layerwise(model, windows, proc, offload=offload, description="block influence")
    return proc.bi


def remove_layers(model, drop: list[int]) -> dict[int, int]:
    """Delete decoder layers ``drop`` in place; renumber the rest (attention layer indices, the
    config's layer count and per-layer lists). Returns {old index: new index}."""
    adapter = ModelAdapter(model)
    n = len(adapter.layers)
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise PocketError(f"layers {bad} do not exist: the model has layers 0..{n - 1}")
    if len(set(drop)) >= n:
        raise PocketError("cannot remove every layer of the model")
    keep = [i for i in range(n) if i not in set(drop)]
    adapter.decoder.layers = torch.nn.ModuleList([adapter.layers[i] for i in keep])
    for new, layer in enumerate(adapter.decoder.layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new
    cfg = model.config
    for key in ("layer_types",):
        val = getattr(cfg, key, None)
        if isinstance(val, list) and len(val) == n:
            setattr(cfg, key, [val[i] for i in keep])
    cfg.num_hidden_layers = len(keep)
    return {old: new for new, old in enumerate(keep)}


@register
class RemoveLayers(Stage):
    method: Literal["remove-layers"] = "remove-layers"
    n: int | None = Field(None, ge=1, description="how many layers to remove")
    fraction: float | None = Field(None, gt=0, lt=1, description="fraction of the layers to remove (rounded)")
    layers: list[int] | None = Field(None, description="remove exactly these layer indices")
    choose: Literal["bi", "last", "random"] = Field(
        "bi", description="which layers: lowest Block Influence (ShortGPT), the last ones, or random (baselines)")
    seed: int = Field(0, description="seed for choose=random")

    @model_validator(mode="after")
    def _one(self):
        if sum(x is not None for x in (self.n, self.fraction, self.layers)) != 1:
            raise ValueError("give exactly one of n, fraction or layers")
        return self

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.layers is None and self.choose == "bi"

    def count(self, n_layers: int) -> int:
        k = self.n if self.n is not None else round(self.fraction * n_layers)
        if k >= n_layers:
            raise PocketError(f"cannot remove {k} of {n_layers} layers; remove fewer")
        return max(k, 1)

    def run(self, ctx) -> dict:
        n_layers = len(ctx.adapter.layers)
        bi = None
        if self.layers is not None:
            drop = sorted(set(self.layers))
        else:
            k = self.count(n_layers)
            if self.choose == "bi":
                bi = block_influence(ctx.model, ctx.windows(), ctx.calibration.offload)
                drop = sorted(sorted(range(n_layers), key=lambda i: bi[i])[:k])
            elif self.choose == "last":
                drop = list(range(n_layers - k, n_layers))
            else:
                drop = sorted(random.Random(self.seed).sample(range(n_layers), k))
        prefix = _layers_prefix(ctx.model, ctx.adapter)
        mapping = remove_layers(ctx.model, drop)
        ctx.rename_layers(mapping, prefix)
        ctx.adapter = ModelAdapter(ctx.model)
        return {"removed": drop, "layers_left": len(mapping), "block_influence": bi}
