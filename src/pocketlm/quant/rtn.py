"""RTN: round every weight to the nearest point of its group's grid. Needs no calibration."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from ..stages import Stage, register
from .grid import QuantSpec, quantize_weight


class QuantStage(Stage):
    """Fields shared by the weight quantizers."""

    bits: int = Field(4, ge=2, le=8)
    group_size: int = Field(128, description="inputs per group; -1 = one group per output row")
    sym: bool = False
    clip: bool = Field(False, description="search a clipping ratio per group")
    format: str | None = Field(None, description="a GGUF block grid (gguf-q4_0, gguf-q4_1, gguf-q5_0, gguf-q5_1, "
                                                 "gguf-q8_0): sets bits, sym and groups of 32, for exact GGUF export")

    @model_validator(mode="after")
    def _format(self):
        if self.format is not None:
            from ..export.ggml_blocks import parse_format

            f = parse_format(self.format)
            self.__dict__.update(bits=f.bits, group_size=32, sym=f.sym)
        return self

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("must be a positive number of inputs, or -1 for one group per row")
        return v

    def spec(self) -> QuantSpec:
        if self.format is not None:
            from ..export.ggml_blocks import parse_format

            return parse_format(self.format).spec.model_copy(update={"clip": self.clip})
        return QuantSpec(bits=self.bits, group_size=self.group_size, sym=self.sym, clip=self.clip)


@register
class RTN(QuantStage):
    method: Literal["rtn"] = "rtn"

    def run(self, ctx) -> dict:
        spec = self.spec()
        names = [n for n in ctx.linears() if self.selects(n)]
        for name in names:
            lin = ctx.module(name)
            with torch.no_grad():
                qw = quantize_weight(lin.weight, spec)
                lin.weight.copy_(qw.dequantize().to(lin.weight.dtype))
            ctx.record_quant(name, qw, method=self.method)
        return {"linears": len(names), "grid": spec.label()}
