"""Magnitude pruning: drop the weights of smallest |W| in each linear. Needs no data."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..stages import register
from .masks import PruneStage, select


@register
class Magnitude(PruneStage):
    method: Literal["magnitude"] = "magnitude"
    per_row: bool = Field(False, description="compare weights within each output row instead of the whole matrix")
    barber_defaults: ClassVar[tuple[float, str]] = (0.1, "block")

    def run(self, ctx) -> dict:
        names = [n for n in ctx.linears() if self.selects(n)]
        for name in names:
            W = ctx.module(name).weight.detach()
            ctx.prune(name, select(W.abs().float(), self.target_for(name), self.per_row, name), self.method)
        return self.report(ctx, names)
