"""RTN: round every weight to the nearest point of its group's grid. Needs no calibration."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from ..stages import Stage, register
from .grid import QuantSpec, quantize_weight


class QuantStage(Stage):
    """Fields shared by the weight quantizers."""

    bits: int = Field(4, ge=2, le=8)
    group_size: int = Field(128, description="inputs per group; -1 = one group per output row")
    sym: bool = False
    clip: bool = Field(False, description="search a clipping ratio per group")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("must be a positive number of inputs, or -1 for one group per row")
        return v

    def spec(self) -> QuantSpec:
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
