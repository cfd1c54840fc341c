"""What recovery may change in a compressed model, in a form that cannot leave its structure.

- A pruned or dense linear is tuned in full (its gradient is multiplied by its mask, and the
  mask is re-applied after every step, so pruned weights stay exactly zero and N:M patterns
  hold) or through a LoRA adapter that is masked *before* it is added, W' = (W + B A) * M, so
  that merging it keeps the sparsity.
- A quantized linear stays on its own grid: the per-group scale of a pocketlm integer grid
  (w = s (q - z), z fixed), or the float16 scale (and offset) of every block of a GGML
  block-of-32 type (w = d L[q] + m) are trained, the codes kept. With ``rounding`` the codes
  may move too: a latent float weight is trained and rounded to the grid in every forward pass,
  its gradient passed through the rounding unchanged (the straight-through estimator, as in
  quantization-aware training with learned step sizes, Esser et al. 2020, LSQ); the scale gets
  the gradient of the rounded weight. The latent weight starts at the quantizer's value (its
  grid point, keeping what GPTQ chose), so a code moves once its weight has travelled half a
  step: this needs a higher learning rate than the scales. Finishing rounds the parameters to float16, takes the
  codes of the latent weight on that grid and re-packs the very bytes the GGUF export writes.
  K-quant super-blocks stay frozen.
- Layers removed, KV heads merged and embeddings are not touched: the module tree is the same.

Scales are trained as relative changes, s = s0 (1 + t), so that one learning rate suits every
parameter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..context import GGMLRecord, QuantRecord
from ..quant.ggml import GGMLWeight, get_type
from ..quant.ggml.search import nearest


class MaskedLoRA(nn.Module):
    """y = x ((W + s B A) * M)^T + b, W frozen; B starts at zero so training starts from W."""

    def __init__(self, lin: nn.Linear, rank: int, alpha: float, mask: torch.Tensor | None):
        super().__init__()
        d_out, d_in = lin.weight.shape
        self.weight, self.bias = lin.weight, lin.bias
        self.weight.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, d_in) / math.sqrt(d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.scale = alpha / rank
        mask = None if mask is None else mask.to(self.weight.device, torch.bool)
        self.register_buffer("mask", mask, persistent=False)

    def merged(self) -> torch.Tensor:
        w = self.weight + self.scale * (self.B @ self.A)
        return w if self.mask is None else w * self.mask

    def forward(self, x):
        return F.linear(x, self.merged(), self.bias)


def _ste(y: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded`` forward, the identity's gradient to ``y`` backward (straight-through)."""
    return y + (rounded - y).detach()


class GroupGrid(nn.Module):
    """A linear on a pocketlm integer grid: w = s0 (1 + t) (q - z) per group; t is trained (and,
    with ``rounding``, a latent weight whose rounding gives q)."""

    def __init__(self, lin: nn.Linear, rec: QuantRecord, mask: torch.Tensor | None, rounding: bool = False):
        super().__init__()
        self.bias, self.rec = lin.bias, rec
        qw = rec.to_quantized(lin.weight)
        d_in = rec.shape[1]
        self.register_buffer("idx", torch.arange(d_in) // rec.spec.group_len(d_in), persistent=False)
        self.register_buffer("codes", qw.codes, persistent=False)
        self.register_buffer("zeros", rec.zeros.float(), persistent=False)
        self.register_buffer("s0", rec.scales.float(), persistent=False)
        self.register_buffer("mask", None if mask is None else mask.bool(), persistent=False)
        self.t = nn.Parameter(torch.zeros_like(self.s0))
        self.maxq = rec.spec.maxq
        self.latent = nn.Parameter(lin.weight.detach().float().clone()) if rounding else None

    def scales(self) -> torch.Tensor:
        return self.s0 * (1 + self.t)

    def codes_for(self, s: torch.Tensor) -> torch.Tensor:
        """The codes (float): fixed, or the latent weight rounded on the grid of scales ``s``."""
        if self.latent is None:
            return self.codes.float()
        y = self.latent / s[:, self.idx] + self.zeros[:, self.idx]
        return _ste(y, torch.round(y)).clamp(0, self.maxq)

    def weight_from(self, s: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        q = self.codes_for(s) if q is None else q
        w = s[:, self.idx] * (q - self.zeros[:, self.idx])
        return w if self.mask is None else w * self.mask

    def forward(self, x):
        return F.linear(x, self.weight_from(self.scales()), self.bias)

    def finish(self) -> tuple[torch.Tensor, QuantRecord]:
        s = self.scales().detach().half().float()
        rec = QuantRecord(self.rec.method, self.rec.spec, s, self.rec.zeros, self.rec.shape)
        return self.weight_from(s, self.codes_for(s).detach()).detach(), rec


class BlockGrid(nn.Module):
    """A linear on a GGML block-of-32 type: w = d0 (1 + t) L[q] (+ m0 + d0 u); t (and u) trained
    (and, with ``rounding``, a latent weight whose nearest level gives q)."""

    def __init__(self, lin: nn.Linear, rec: GGMLRecord, mask: torch.Tensor | None, rounding: bool = False):
        super().__init__()
        self.bias, self.rec = lin.bias, rec
        self.kind = get_type(rec.type)
        d_out, d_in = rec.shape
        blocks = torch.from_numpy(rec.weight.data.reshape(d_out * d_in // 32, -1).copy())
        d = blocks[:, :2].contiguous().view(torch.float16).float().reshape(-1)
        params = {"d": d}
        self.offset = self.kind.type_size in (20, 24)  # Q4_1, Q5_1 store d and m
        if self.offset:
            params["m"] = blocks[:, 2:4].contiguous().view(torch.float16).float().reshape(-1)
        x = lin.weight.detach().float().cpu().reshape(-1, 32)
        q = self.kind.encode(x, params)
        if not torch.equal(self.kind.decode(q, params), x):
            raise ValueError(f"{rec.type} weight does not sit on its own grid")
        self.register_buffer("codes", q.to(torch.uint8), persistent=False)
        self.register_buffer("levels", self.kind.levels.float(), persistent=False)
        self.register_buffer("d0", d, persistent=False)
        self.register_buffer("m0", params.get("m", torch.zeros_like(d)), persistent=False)
        self.register_buffer("mask", None if mask is None else mask.bool(), persistent=False)
        self.shape = (d_out, d_in)
        self.t = nn.Parameter(torch.zeros_like(d))
        self.u = nn.Parameter(torch.zeros_like(d)) if self.offset else None
        self.latent = nn.Parameter(x.clone()) if rounding else None  # (blocks, 32)

    def params(self) -> dict[str, torch.Tensor]:
        p = {"d": self.d0 * (1 + self.t)}
        if self.offset:
            p["m"] = self.m0 + self.d0.abs() * self.u
        return p

    def values_for(self, p: dict) -> torch.Tensor:
        """L[q] per weight (blocks, 32): fixed codes, or the latent weight's nearest level."""
        if self.latent is None:
            return self.levels[self.codes.long()]
        d = torch.where(p["d"] == 0, torch.ones_like(p["d"]), p["d"])[:, None]
        y = (self.latent - (p["m"][:, None] if self.offset else 0)) / d
        return _ste(y, self.levels[nearest(y.detach(), self.levels)])

    def weight_from(self, p: dict, values: torch.Tensor | None = None) -> torch.Tensor:
        w = p["d"][:, None] * (self.values_for(p) if values is None else values)
        if self.offset:
            w = w + p["m"][:, None]
        w = w.reshape(self.shape)
        return w if self.mask is None else w * self.mask

    def forward(self, x):
        return F.linear(x, self.weight_from(self.params()), self.bias)

    def finish(self) -> tuple[torch.Tensor, GGMLRecord]:
        p = {k: v.detach().half().float() for k, v in self.params().items()}
        q = self.codes.long() if self.latent is None else self.kind.encode(self.latent.detach(), p)
        data = self.kind.pack(q, p).reshape(self.shape[0], -1)
        w = self.weight_from(p, self.levels[q]).detach()
        return w, GGMLRecord(self.rec.method, GGMLWeight(self.rec.type, self.shape, data))


@dataclass
class Trainable:
    """The wrapped linears and the plain parameters recovery trains, and how to put them back."""

    model: nn.Module
    wrapped: dict[str, nn.Module] = field(default_factory=dict)
    originals: dict[str, nn.Linear] = field(default_factory=dict)
    full: dict[str, torch.Tensor | None] = field(default_factory=dict)  # name -> mask (None: dense)
    frozen: list[str] = field(default_factory=list)  # linears left as they are (and why)
    hooks: list = field(default_factory=list)

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def enforce(self) -> None:
        """Re-apply the masks of fully tuned pruned linears (after an optimizer step)."""
        for name, keep in self.full.items():
            if keep is not None:
                self.model.get_submodule(name).weight.mul_(keep)

    @torch.no_grad()
    def finish(self, quant: dict, masks: dict) -> None:
        """Put plain linears back with their tuned weights; update the quantizers' records."""
        for h in self.hooks:
            h.remove()
        for name, mod in self.wrapped.items():
            lin = self.originals[name]
            if isinstance(mod, MaskedLoRA):
                w = mod.merged()
            else:
                w, quant[name] = mod.finish()
            lin.weight.data = w.to(lin.weight.dtype).contiguous()
            _set(self.model, name, lin)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for name, keep in masks.items():  # structure check: a pruned weight is exactly zero
            w = self.model.get_submodule(name).weight
            if bool((w[~keep.to(w.device)] != 0).any()):
                raise AssertionError(f"{name}: a pruned weight moved during recovery")


def _set(model: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, mod)


def attach(model: nn.Module, layer_linears: dict[str, nn.Linear], quant: dict, masks: dict, mode: str = "full",
           rank: int = 16, alpha: float = 32.0, norms: bool = True, rounding: bool = False) -> Trainable:
    """Make ``model``'s decoder layers trainable in a structure-preserving way (see the module
    doc; ``rounding``: quantized linears' codes may move too). Everything else (embeddings, head,
    final norm) is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    tr = Trainable(model)
    for name, lin in layer_linears.items():
        keep = masks.get(name)
        keep_dev = None if keep is None else keep.to(lin.weight.device)
        rec = quant.get(name)
        if isinstance(rec, QuantRecord):
            mod = GroupGrid(lin, rec, keep_dev, rounding)
        elif isinstance(rec, GGMLRecord):
            if rec.type not in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"):
                tr.frozen.append(f"{name} ({rec.type}: super-block scales are not tuned)")
                continue
            try:
                mod = BlockGrid(lin, rec, keep_dev, rounding)
            except ValueError as e:
                tr.frozen.append(f"{name} ({e})")
                continue
        elif mode == "lora":
            mod = MaskedLoRA(lin, rank, alpha, keep_dev)
        else:
            lin.weight.requires_grad_(True)
            if lin.bias is not None:
                lin.bias.requires_grad_(True)
            tr.full[name] = keep_dev
            if keep_dev is not None:
                tr.hooks.append(lin.weight.register_hook(lambda g, k=keep_dev: g * k))
            continue
        tr.wrapped[name], tr.originals[name] = mod, lin
        _set(model, name, mod)
    if norms:
        for layer in model.get_decoder().layers:
            for n, m in layer.named_modules():
                if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None:
                    m.weight.requires_grad_(True)
    return tr
