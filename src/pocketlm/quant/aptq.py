"""APTQ (Guan et al., DAC 2024): attention-aware sensitivity and mixed precision from a budget.

1. Analysis pass over a subset of the calibration windows (the model is not changed): for
   every linear and every allowed (bits, group size), the error GPTQ leaves, measured at the
   decoder layer's output with the attention-aware curvature (``sensitivity.py``).
2. Allocation: the plan minimising the summed error with effective bits per weight (or file
   bytes) within the budget, solved exactly (``allocate.py``).
3. GPTQ pass over all calibration windows, sequentially, each linear at its planned grid;
   q/k/v use the attention-aware Hessian.
"""
from __future__ import annotations

import fnmatch
import itertools
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..calibrate import LayerView, run_layerwise
from ..errors import PocketError
from ..stages import Stage, register
from ..stats import HessianProcessor, head_importance
from .allocate import allocate
from .ggml import fallback, get_type, quantize_matrix
from .gptq import GPTQProcessor, gptq_ggml, gptq_widths
from .grid import QuantSpec, quantize_weight
from .rtn import EMBED
from .sensitivity import layer_curvature

ATTENTION_PROJECTIONS = ["*q_proj", "*k_proj", "*v_proj"]


class SensitivityProcessor(HessianProcessor):
    """Fills ``costs[name][spec label]`` without changing the model."""

    modifies_layer = False

    def __init__(self, select, specs: list[QuantSpec], mode: str, attention: list[str], grad_windows: int,
                 act_order: bool = True, damp: float = 0.01, device: str = "cpu", targets=None,
                 quantizer: str = "gptq", head: bool = False):
        super().__init__(select)
        self.targets, self.quantizer, self._want_head, self.head = targets, quantizer, head, None
        self.imatrix: dict[str, torch.Tensor] = {}
        self.specs, self.mode, self.attention = specs, mode, attention
        self.grad_windows, self.act_order, self.damp, self.device = grad_windows, act_order, damp, device
        self.costs: dict[str, dict[str, float]] = {}
        self.params: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, int]] = {}

    def process(self, layer: LayerView) -> None:
        names = [n for n in layer.linears if self.wants(n)]
        curv = layer_curvature(layer, names, self.grad_windows, targets=self.targets) \
            if self.mode == "attention" else {}
        for name in names:
            W = layer.linears[name].weight.detach().float()
            H = self.hessian(name)
            self.imatrix[name] = torch.diag(H).cpu() / 2  # each input's mean square
            self.shapes[name] = tuple(W.shape)
            self.params[name] = W.numel()
            row = {}
            if self.mode == "trace" and isinstance(self.specs[0], str):
                for t in ggml_options(self.specs, W.shape[1]):
                    dW = W - quantize_matrix(W, t, torch.diag(H))[0]
                    row[t] = float(torch.trace(H) / H.shape[0] * dW.pow(2).sum())
                self.costs[name] = row
                continue
            if self.mode == "trace":  # HAWQ-style: mean curvature x RTN noise
                for spec in self.specs:
                    dW = W - quantize_weight(W, spec).dequantize()
                    row[spec.label()] = float(torch.trace(H) / H.shape[0] * dW.pow(2).sum())
                self.costs[name] = row
                continue
            aware = self.mode == "attention" and _matches(name, self.attention)
            Hq = (curv[name].A if aware else H).to(self.device)
            if isinstance(self.specs[0], str):  # GGML types: GPTQ on each type this linear's rows take
                for t in ggml_options(self.specs, W.shape[1]):
                    if self.quantizer == "rtn":
                        dW = W - quantize_matrix(W, t, self.imatrix[name])[0].to(W.device)
                    else:
                        dW = W - gptq_ggml(W, Hq, t, percdamp=self.damp, act_order=self.act_order)[0].to(W.device)
                    row[t] = curv[name].cost(dW) if self.mode == "attention" else float(((dW @ H) * dW).sum())
                self.costs[name] = row
                continue
            for grid in sorted({(s.group_size, s.sym, s.zero_bits or 0) for s in self.specs}):
                same = [s for s in self.specs if (s.group_size, s.sym, s.zero_bits or 0) == grid]
                Qs = gptq_widths(W, Hq, same[0], [s.bits for s in same], percdamp=self.damp, act_order=self.act_order)
                for s in same:
                    dW = W - Qs[s.bits].to(W.device)
                    row[s.label()] = curv[name].cost(dW) if self.mode == "attention" else float(((dW @ H) * dW).sum())
            self.costs[name] = row
        self.release_layer()

    def finish(self, adapter, hidden) -> None:
        if self._want_head:
            self.head = head_importance(adapter, hidden)


def ggml_options(types: list[str], d_in: int) -> list[str]:
    """The distinct GGML types a linear with rows of ``d_in`` can take from ``types`` (each after
    llama.cpp's fallback; types that would fall back to F16 are left out)."""
    out = []
    for t in types:
        f = fallback(t, d_in)
        if f != "F16" and f not in out:
            out.append(f)
    if not out:
        raise PocketError(f"none of {', '.join(types)} holds rows of {d_in} inputs; allow a block-of-32 type")
    return out


def ggml_bits(t: str, shape: tuple[int, int]) -> int:
    ty = get_type(t)
    return shape[0] * shape[1] // ty.block * ty.type_size * 8


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def attention_hessians(patterns: list[str], select, grad_windows: int, targets=None):
    """The curvature hook for GPTQProcessor: attention-aware A for q/k/v of each layer."""

    def curvature(layer: LayerView) -> dict[str, torch.Tensor]:
        names = [n for n in layer.linears if select(n) and _matches(n, patterns)]
        if not names:
            return {}
        return {n: c.A for n, c in layer_curvature(layer, names, grad_windows, targets=targets).items()}

    return curvature


@register
class APTQ(Stage):
    method: Literal["aptq"] = "aptq"
    bpw: float | None = Field(None, description="budget: effective bits per weight of the quantized linears")
    bytes: int | None = Field(None, description="budget: bytes of the whole model's tensors (others in 16-bit; with "
                                                "formats, as the GGUF file stores them: norms F32, embed at its type)")
    bits: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6, 8], description="allowed bit widths")
    group_sizes: list[int] = Field(default_factory=lambda: [128], description="allowed group sizes (-1 = per row)")
    sym: bool = False
    formats: list[str] | None = Field(None, description="allowed grids as GGML types instead of bits x group_sizes "
                                                         "(e.g. [q8_0, q6_k, q5_k, q4_k, iq4_nl, q3_k]): the plan "
                                                         "exports to GGUF exactly, one type per tensor; rows a type "
                                                         "cannot hold take llama.cpp's fallback")
    embed: str | None = Field(None, description="GGML type of the token embedding (and tied head), counted in a "
                                                "bytes budget; with formats only")
    clip: bool = Field(False, description="search a clipping ratio per group (every candidate grid)")
    act_order: bool = True
    sensitivity: Literal["attention", "hessian", "trace"] = "attention"
    attention: list[str] = Field(default_factory=lambda: list(ATTENTION_PROJECTIONS),
                                 description="linears whose curvature is taken through the attention")
    analysis_windows: int = Field(16, ge=1, description="calibration windows for the sensitivity analysis")
    grad_windows: int = Field(4, ge=1, description="windows backpropagated per layer for the curvature")
    target: Literal["loss", "kl", "random"] = Field(
        "loss", description="output direction of the curvature: the gradient at each layer's output of the LM "
                            "loss on the calibration text ('loss') or on tokens drawn from the model itself "
                            "('kl': costs estimate the KL from the unquantized model), both in one unit across "
                            "layers, or random projections (per-layer Gauss-Newton)")
    blocksize: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0)
    quantizer: Literal["gptq", "rtn"] = Field("gptq", description="how each linear is put on its planned grid (and "
                                              "its cost measured): GPTQ, or importance-weighted RTN (GGML "
                                              "formats only; one analysis pass, no GPTQ pass)")

    needs_calibration = True

    @model_validator(mode="after")
    def _budget(self):
        if (self.bpw is None) == (self.bytes is None):
            raise ValueError("give exactly one budget: bpw or bytes")
        if any(b < 2 or b > 8 for b in self.bits):
            raise ValueError("bits must lie in 2..8")
        if any(g != -1 and g < 1 for g in self.group_sizes):
            raise ValueError("group sizes must be positive or -1")
        if self.formats is not None:
            if not self.formats:
                raise ValueError("formats needs at least one GGML type")
            self.formats = [get_type(f).name for f in self.formats]
        if self.quantizer == "rtn" and self.formats is None:
            raise ValueError("quantizer rtn needs formats (GGML types)")
        if self.embed is not None:
            if self.formats is None:
                raise ValueError("embed needs formats (GGML types)")
            self.embed = get_type(self.embed).name
        return self

    def specs(self) -> list[QuantSpec] | list[str]:
        if self.formats is not None:
            return list(self.formats)
        return [QuantSpec(bits=b, group_size=g, sym=self.sym, clip=self.clip)
                for b, g in itertools.product(self.bits, self.group_sizes)]

    def grids(self) -> list:
        return self.specs()

    def option_bits(self, spec, shape) -> int:
        return ggml_bits(spec, shape) if isinstance(spec, str) else spec.storage_bits(*shape)

    def other_bits(self, ctx, names: list[str]) -> int:
        """Bits of everything outside the planned linears: 16 per weight, or with GGML types what
        a GGUF file stores (the token embedding at ``embed`` or F16, norms F32, other matrices F16)."""
        if self.formats is None:
            return 16 * ctx.other_params(names)
        planned = {f"{n}.weight" for n in names}
        seen, bits = set(), 0
        for n, p in ctx.model.named_parameters():
            if n in planned or p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            if p.dim() == 1:
                bits += 32 * p.numel()
            elif p is ctx.adapter.embed.weight and self.embed is not None:
                bits += ggml_bits(fallback(self.embed, p.shape[1]), tuple(p.shape))
            else:
                bits += 16 * p.numel()
        return bits

    def budget_bits(self, ctx, names: list[str]) -> int:
        shapes = {n: tuple(ctx.module(n).weight.shape) for n in names}
        params = sum(a * b for a, b in shapes.values())
        if self.formats is not None:
            smallest = sum(min(ggml_bits(t, shp) for t in ggml_options(self.formats, shp[1]))
                           for shp in shapes.values())
        else:
            smallest = sum(min(s.storage_bits(*shp) for s in self.specs()) for shp in shapes.values())
        if self.bpw is not None:
            budget = int(self.bpw * params)
            what = f"{self.bpw} bpw"
        else:
            budget = self.bytes * 8 - self.other_bits(ctx, names)
            what = f"{self.bytes} bytes"
        if budget < smallest:
            raise PocketError(
                f"budget {what} is below the smallest allowed plan ({smallest / params:.4f} bpw with "
                f"{self._smallest()}); raise the budget or allow fewer bits / larger groups")
        return budget

    def _smallest(self) -> str:
        if self.formats is not None:
            return min(self.formats, key=lambda f: get_type(f).bpw)
        return f"{min(self.bits)}-bit groups"

    def run(self, ctx) -> dict:
        names = [n for n in ctx.linears() if self.selects(n)]
        budget = self.budget_bits(ctx, names)
        specs = self.specs()
        windows = ctx.windows()
        targets = None
        if self.sensitivity == "attention" and self.target != "random":
            from .sensitivity import loss_gradients

            targets = loss_gradients(ctx.model, windows[: self.grad_windows],
                                     labels="model" if self.target == "kl" else "data")
        rtn = self.quantizer == "rtn"
        ana = SensitivityProcessor(self.selects, specs, self.sensitivity, self.attention, self.grad_windows,
                                   self.act_order, self.damp, ctx.device, targets, self.quantizer,
                                   head=rtn and self.embed is not None)
        run_layerwise(ctx.model, windows[: self.analysis_windows], ana, offload=ctx.calibration.offload,
                      description="aptq analysis")
        if self.formats is not None:  # per linear, the types its rows take
            per = {n: ggml_options(specs, ana.shapes[n][1]) for n in names}
            options = [[(ggml_bits(t, ana.shapes[n]), ana.costs[n][t]) for t in per[n]] for n in names]
        else:
            per = {n: specs for n in names}
            options = [[(s.storage_bits(*ana.shapes[n]), ana.costs[n][s.label()]) for s in specs] for n in names]
        plan = allocate(options, budget)
        chosen = {n: per[n][j] for n, j in zip(names, plan)}
        if rtn:  # importance-weighted RTN onto the planned types, statistics of the analysis pass
            for n in names:
                lin = ctx.module(n)
                with torch.no_grad():
                    deq, gw, _, _ = quantize_matrix(lin.weight, chosen[n], ana.imatrix[n])
                    lin.weight.copy_(deq.to(lin.weight.dtype))
                ctx.record_ggml(n, gw, method="aptq")
            proc = ana
        else:
            curvature = attention_hessians(self.attention, self.selects, self.grad_windows, targets) \
                if self.sensitivity == "attention" else None
            proc = GPTQProcessor(ctx, self.selects, chosen.__getitem__, self.act_order, self.blocksize, self.damp,
                                 curvature=curvature, method="aptq", head=self.embed is not None)
            run_layerwise(ctx.model, windows, proc, offload=ctx.calibration.offload, description="aptq gptq")
        if self.embed is not None:
            emb = ctx.adapter.embed
            t = fallback(self.embed, emb.weight.shape[1])
            with torch.no_grad():
                deq, gw, _, _ = quantize_matrix(emb.weight, t, proc.head)
                emb.weight.copy_(deq.to(emb.weight.dtype))
            ctx.record_ggml(EMBED, gw, method="aptq")
        used = sum(options[k][j][0] for k, j in enumerate(plan))
        params = sum(ana.params.values())
        hist = {}
        for s in chosen.values():
            key = s if isinstance(s, str) else s.label()
            hist[key] = hist.get(key, 0) + 1
        return {"budget_bits": budget, "planned_bits": used, "planned_bpw": round(used / params, 6),
                "estimated_cost": sum(options[k][j][1] for k, j in enumerate(plan)), "plan_histogram": hist,
                "sensitivity": self.sensitivity, "costs": ana.costs}
