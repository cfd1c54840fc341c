"""Sliding-window layers: turn some decoder layers into local-attention layers that keep only
the last ``window`` tokens in the KV cache, the others staying global (hybrid local/global
attention, as Gemma 3 ships it), to a KV budget at a given context.

Which layers: the cheapest ones measured (``cost``, the default: each layer converted alone,
the KL divergence of the converted model's next-token distribution from the unconverted one on
calibration windows, the layers of least divergence taken; one forward pass per layer and
window), or the most local ones on calibration text (``span``: the largest share of attention
mass within the window, ``attention.span``; cheaper, but attention mass ranks layers only
roughly by what converting them costs), or the last ones, or random ones (baselines).

Where the runtimes can express it: transformers takes per-layer sliding windows for Gemma 3,
Qwen2/Qwen3 (``layer_types``); a Llama/Mistral model is rewritten as the Qwen2 architecture,
which computes the same function (Qwen2's q/k/v biases are set to zero) and honours per-layer
windows. llama.cpp runs per-layer windows for Gemma 3 only; a converted Qwen2 model is refused
at GGUF export with a one-line reason."""
from __future__ import annotations

import math
import random
from typing import Literal

import torch
from pydantic import Field, model_validator

from .. import kv
from ..errors import PocketError
from ..models import ModelAdapter
from ..stages import Stage, register
from .span import attention_span

NATIVE = ("gemma3_text", "qwen2", "qwen3")  # transformers architectures with per-layer windows
REWRITE = {"llama": "qwen2", "mistral": "qwen2"}  # same function, an architecture that has them


def rebuild(model, model_type: str, **changes):
    """The same weights in a model of ``model_type`` with config ``changes`` (a new object).
    Parameters the new architecture adds must be biases, and start at zero."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = model.config.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map"):
        d.pop(k, None)
    d.update(changes)
    new = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **d), dtype=model.dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not n.endswith("_proj.bias") for n in missing):
        raise PocketError(f"cannot rewrite {model.config.model_type} as {model_type}: weights {unexpected[:2]} "
                          f"unused, {missing[:2]} missing")
    with torch.no_grad():
        for n in missing:
            new.get_parameter(n).zero_()
    return new.to(next(model.parameters()).device).eval()


@register
class SlidingWindow(Stage):
    """Turn ``n`` layers (or as many as the KV budget needs, or the ``layers`` given) into
    sliding-window layers."""

    method: Literal["sliding-window"] = "sliding-window"
    window: int = Field(512, ge=1, description="tokens a sliding-window layer attends to (and caches)")
    n: int | None = Field(None, ge=1, description="how many layers to convert")
    kv_fraction: float | None = Field(None, gt=0, lt=1, description="instead: the share of the KV cache at "
                                                                      "`context` tokens to keep")
    layers: list[int] | None = Field(None, min_length=1, description="instead: exactly these layers (global ones)")
    context: int = Field(8192, ge=2, description="the context the KV budget is for")
    choose: Literal["cost", "span", "last", "random"] = Field(
        "cost", description="the layers whose conversion alone changes the output least on calibration text, the "
                            "most local layers on it, the last ones, or random ones")
    cost_windows: int = Field(1, ge=1, description="calibration windows the cost of each layer is measured on")
    seed: int = Field(0, description="seed for choose=random")

    @model_validator(mode="after")
    def _one(self):
        if sum(x is not None for x in (self.n, self.kv_fraction, self.layers)) != 1:
            raise ValueError("give exactly one of n, kv_fraction or layers")
        if self.window >= self.context:
            raise ValueError(f"window {self.window} must be shorter than context {self.context}")
        return self

    def gguf_blocker(self, config) -> str | None:
        if config.model_type != "gemma3_text":
            return (f"llama.cpp runs per-layer sliding windows for Gemma 3 only, not for {config.model_type} "
                    "(the converted model runs in transformers); drop the GGUF export")
        return None

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.layers is None and self.choose in ("span", "cost")

    def count(self, n_layers: int) -> int:
        if self.n is not None:
            k = self.n
        else:  # (n - k) C + k w <= f n C
            k = math.ceil(n_layers * self.context * (1 - self.kv_fraction) / (self.context - self.window) - 1e-9)
        if k > n_layers:
            raise PocketError(f"a KV budget of {self.kv_fraction:.0%} at {self.context} tokens needs {k} of "
                              f"{n_layers} layers with window {self.window}; use a smaller window or a larger budget")
        return max(k, 1)

    def run(self, ctx) -> dict:
        model = ctx.model
        mt = model.config.model_type
        if mt not in NATIVE and mt not in REWRITE:
            raise PocketError(f"sliding-window layers: no runtime takes them for '{mt}' models")
        types = list(getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers)
        full = [i for i, t in enumerate(types) if t != "sliding_attention"]
        if self.layers is not None:
            return self._convert(ctx, types, sorted(set(self._given(full, len(types)))))
        k = self.count(len(types))
        if k > len(full):
            raise PocketError(f"only {len(full)} layers are global; cannot convert {k}")
        span = cost = None
        if self.choose in ("span", "cost"):
            windows = ctx.windows()
            if windows.shape[1] <= self.window:
                raise PocketError(f"calibration windows of {windows.shape[1]} tokens cannot show attention beyond a "
                                  f"window of {self.window}; calibrate on longer windows (--calib-len)")
        if self.choose == "span":
            span = [row[0] for row in attention_span(model, windows, (self.window,), ctx.calibration.offload)]
            chosen = sorted(sorted(full, key=lambda i: -span[i])[:k])
        elif self.choose == "cost":
            cost = dict(zip(full, conversion_cost(model, windows[: self.cost_windows], full, self._changes(mt, types))))
            chosen = sorted(sorted(full, key=lambda i: cost[i])[:k])
        elif self.choose == "last":
            chosen = full[-k:]
        else:
            chosen = sorted(random.Random(self.seed).sample(full, k))
        return self._convert(ctx, types, chosen, {"local_mass": span, "cost": None if cost is None else
                                                  [cost.get(i) for i in range(len(types))]})

    def _given(self, full: list[int], n_layers: int) -> list[int]:
        bad = [i for i in self.layers if i not in full]
        if bad:
            raise PocketError(f"layers {bad} are not global layers of this {n_layers}-layer model "
                              f"(global: {full}); list only those")
        return self.layers

    def _convert(self, ctx, types: list[str], chosen: list[int], found: dict | None = None) -> dict:
        """Rebuild the model with ``chosen`` made sliding; the report."""
        model = ctx.model
        mt = model.config.model_type
        before = kv.cache_bytes(model.config, self.context)
        new = rebuild(model, REWRITE.get(mt, mt), **self._changes(mt, types)(chosen))
        ctx.model, ctx.adapter = new, ModelAdapter(new)
        return {"layers": chosen, "window": self.window, "architecture": [mt, new.config.model_type],
                "local_mass": None, "cost": None, **(found or {}),
                f"kv_bytes_at_{self.context}": [before, kv.cache_bytes(new.config, self.context)]}

    def _changes(self, mt: str, types: list[str]):
        """layers -> the config changes that turn those layers (and the already sliding ones) into
        sliding-window layers, with the architecture's switches for per-layer windows."""
        def changes(layers) -> dict:
            t = ["sliding_attention" if i in layers else x for i, x in enumerate(types)]
            out = {"layer_types": t, "sliding_window": self.window}
            if mt in ("qwen2", "qwen3") or mt in REWRITE:
                out.update(use_sliding_window=True, max_window_layers=0)
            return out
        return changes


@torch.no_grad()
def conversion_cost(model, windows: torch.Tensor, layers: list[int], changes, chunk: int = 512) -> list[float]:
    """Per layer in ``layers``: the mean KL divergence (nats per token) of the next-token
    distribution of the model with that layer alone made sliding (``changes([layer])``) from
    the model's own, over the tokens of ``windows``. Only final hidden states are kept; the head
    is applied ``chunk`` positions at a time (a large vocabulary's logits of a whole window
    would not fit)."""
    mt = model.config.model_type
    device = next(model.parameters()).device
    own = ModelAdapter(model)
    head = own.head
    ref = [own.hidden_states(w[None].to(device))[0] for w in windows]
    out = []
    for layer in layers:
        conv = rebuild(model, REWRITE.get(mt, mt), **changes([layer]))
        adapter, kl, n = ModelAdapter(conv), 0.0, 0
        for w, h_ref in zip(windows, ref):
            h = adapter.hidden_states(w[None].to(device))[0]
            for c in range(0, h.shape[0], chunk):
                r = torch.log_softmax(head(h_ref[c : c + chunk]).float(), -1)
                lp = torch.log_softmax(adapter.head(h[c : c + chunk]).float(), -1)
                kl += float((r.exp() * (r - lp)).sum())
                n += r.shape[0]
        out.append(kl / n)
        del conv
    return out
