"""RTN: round every weight to the nearest point of its group's grid. Needs no calibration.

With ``format: gguf-<type>`` the grid is a GGML block type (``quant.ggml``): each block's scale
(and min) comes from the weighted search, every weight counting alike; ``imatrix`` is the same
with each input weighted by its mean square on calibration text (llama.cpp's importance matrix).
"""
from __future__ import annotations

import fnmatch
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from .. import hardware
from ..errors import warn
from ..stages import Stage, register
from .ggml import fallback, get_type, quantize_matrix
from .grid import QuantSpec, quantize_weight

EMBED = "model.embed_tokens"  # the record name of the token embedding (tied to the head when the model ties them)


class QuantStage(Stage):
    """Fields shared by the weight quantizers."""

    bits: int = Field(4, ge=2, le=8)
    group_size: int = Field(128, description="inputs per group; -1 = one group per output row")
    sym: bool = False
    clip: bool = Field(False, description="search a clipping ratio per group")
    format: str | None = Field(None, description="a GGML block type (gguf-q4_0, gguf-iq4_nl, gguf-q4_k, ...): the "
                                                 "linears are put on that type, written to GGUF as they are")
    types: dict[str, str] = Field(default_factory=dict,
                                  description="per-linear GGML types, {glob: type}; the last matching glob wins")
    embed: str | None = Field(None, description="GGML type of the token embedding (the output head too when tied)")

    @model_validator(mode="after")
    def _format(self):
        for t in [self.format, self.embed, *self.types.values()]:
            if t is not None:
                get_type(t)  # unknown types are refused here, with the list
        if self.types and self.format is None:
            raise ValueError("types needs format (the default GGML type)")
        if self.embed is not None and self.format is None:
            raise ValueError("embed needs format (the default GGML type)")
        if self.format is not None:
            t = get_type(self.format)
            self.__dict__.update(bits=round(t.bpw), group_size=t.block, sym=False)
        return self

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("must be a positive number of inputs, or -1 for one group per row")
        return v

    @model_validator(mode="after")
    def _costly_groups(self):
        if self.format is None and 0 < self.group_size < 32:
            per = lambda g: self.bits + (16 + (0 if self.sym else self.bits)) / g  # noqa: E731
            warn(f"group_size {self.group_size} stores a 16-bit scale every {self.group_size} weights: "
                 f"{per(self.group_size):.2f} bits per weight with {self.bits}-bit codes, against "
                 f"{per(32):.2f} at group 32 and {per(128):.2f} at 128; groups of 32 to 128 are the useful range")
        return self

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size, sym=self.sym, clip=self.clip)

    def grids(self) -> list:
        return [get_type(self.format).name] if self.format is not None else [self.spec()]

    def ggml_type(self, name: str, d_in: int) -> str | None:
        """The GGML type a linear gets (llama.cpp's fallback for rows the type cannot hold)."""
        if self.format is None:
            return None
        want = self.format
        for pat, t in self.types.items():
            if fnmatch.fnmatchcase(name, pat):
                want = t
        return fallback(want, d_in)

    def quantize_ggml(self, ctx, name: str, imatrix: torch.Tensor | None) -> str:
        """Importance-weighted RTN of one linear onto its type; returns the type."""
        mod = ctx.module(name) if name != EMBED else ctx.adapter.embed
        t = self.ggml_type(name, mod.weight.shape[1]) if name != EMBED else fallback(self.embed, mod.weight.shape[1])
        if t == "F16":
            return t
        with torch.no_grad():
            deq, gw, _, _ = quantize_matrix(mod.weight, t, imatrix)
            mod.weight.copy_(deq.to(mod.weight.dtype))
        ctx.record_ggml(name, gw, method=self.method)
        return t

    def type_report(self, ctx) -> dict:
        hist: dict[str, int] = {}
        for r in ctx.quant.values():
            t = getattr(r, "type", None)
            if t is not None:
                hist[t] = hist.get(t, 0) + 1
        return hist


@register
class RTN(QuantStage):
    method: Literal["rtn"] = "rtn"

    def run(self, ctx) -> dict:
        names = [n for n in ctx.linears() if self.selects(n)]
        if self.format is not None:
            for name in names:
                self.quantize_ggml(ctx, name, None)
            if self.embed:
                self.quantize_ggml(ctx, EMBED, None)
            return {"linears": len(names), "types": self.type_report(ctx)}
        spec = self.spec()
        for name in names:
            lin = ctx.module(name)
            with torch.no_grad():
                qw = quantize_weight(lin.weight, spec)
                lin.weight.copy_(qw.dequantize().to(lin.weight.dtype))
            ctx.record_quant(name, qw, method=self.method)
        return {"linears": len(names), "grid": spec.label()}


@register
class Imatrix(QuantStage):
    """RTN onto GGML types with each block's scale searched under the importance matrix (every
    input weighted by its mean square on the calibration windows). One calibration pass, layer
    by layer: each layer is quantized once its inputs are observed, so later layers' statistics
    see the quantized earlier ones."""

    method: Literal["imatrix"] = "imatrix"
    format: str = Field("gguf-iq4_nl", description="the default GGML type")
    sequential: bool = Field(True, description="statistics of each layer from the quantized earlier layers (one "
                                               "more pass per layer); false: all from the float model in one pass, "
                                               "as llama-imatrix does")
    calib_dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="bfloat16: the calibration pass runs under bfloat16 autocast (2-3x faster on CPUs "
                               "with bfloat16 units; the weights stay float32, the statistics change little); "
                               "auto: bfloat16 where this CPU multiplies it fast, else float32")

    needs_calibration = True

    def memory_bytes(self, linears):
        """The importance of every input (held), and for the largest linear its dequantized copy,
        packed bytes and the scale search's chunk of candidates."""
        held = sum(4 * d_in for _, d_in in linears.values())
        w_max = max((d_out * d_in for d_out, d_in in linears.values()), default=0)
        return held, 2 * 4 * w_max + 16 * 4 * (1 << 21)

    def stream_blocker(self) -> str | None:
        if not self.sequential:
            return "with sequential: false it quantizes every layer after the pass (use sequential: true)"
        return None

    def run(self, ctx) -> dict:
        from ..calibrate import run_layerwise
        from ..stats import ImatrixProcessor

        def quantize(layer, imatrix):
            for name in layer.linears:
                if self.selects(name):
                    self.quantize_ggml(ctx, name, imatrix[name])

        proc = ImatrixProcessor(self.selects, quantize if self.sequential else None, head=self.embed is not None)
        run_layerwise(ctx.model, ctx.windows(), proc, offload=ctx.calibration.offload, description="imatrix",
                      compute_dtype=hardware.compute_dtype(self.calib_dtype), stream=ctx.stream)
        if not self.sequential:
            for name, h in proc.imatrix.items():
                self.quantize_ggml(ctx, name, h)
        if self.embed:
            self.quantize_ggml(ctx, EMBED, proc.head)
        return {"linears": sum(self.selects(n) for n in ctx.linears()), "types": self.type_report(ctx)}
