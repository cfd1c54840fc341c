"""Wanda (Sun et al., 2024): score S_ij = |W_ij| * ||X_j||_2 and drop the lowest scores within
each output row (or keep the N highest of every M inputs); no weight update. Layer by layer,
sequentially: later layers see the inputs the pruned earlier layers produce."""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from ..calibrate import LayerProcessor, run_layerwise
from ..stages import register
from .masks import PruneLayer, PruneStage, select


class ColumnNorms(LayerProcessor):
    """Accumulates the squared norm of every input feature of each wanted linear, ||X_j||^2.
    Linears reading the same tensor (q/k/v, gate/up) share one accumulator."""

    def __init__(self, select_fn):
        self._select = select_fn
        self._sq: dict[str, torch.Tensor] = {}
        self._alias: dict[str, str] = {}

    def wants(self, name: str) -> bool:
        return self._select(name)

    def observe(self, name: str, x: torch.Tensor) -> None:
        sq = x.float().pow(2).sum(0)
        if name in self._sq:
            self._sq[name] += sq
        else:
            self._sq[name] = sq

    def share(self, name: str, source: str, x: torch.Tensor) -> None:
        self._alias[name] = self._alias.get(source, source)

    def norms(self, name: str) -> torch.Tensor:
        return self._sq[self._alias.get(name, name)].sqrt()

    def release_layer(self) -> None:
        self._sq.clear()
        self._alias.clear()


class WandaProcessor(PruneLayer, ColumnNorms):
    def __init__(self, ctx, stage: "Wanda"):
        ColumnNorms.__init__(self, stage.selects)
        PruneLayer.__init__(self, ctx, stage)

    def choose(self, name, weight):
        score = weight.abs().float() * self.norms(name)[None, :]
        return select(score, self.stage.target_for(name), self.stage.per_row, name), None


@register
class Wanda(PruneStage):
    method: Literal["wanda"] = "wanda"
    per_row: bool = Field(True, description="compare scores within each output row (Wanda's choice)")
    barber_defaults: ClassVar[tuple[float, str]] = (0.01, "row")

    needs_calibration = True

    def run(self, ctx) -> dict:
        proc = WandaProcessor(ctx, self)
        run_layerwise(ctx.model, ctx.windows(), proc, offload=ctx.calibration.offload, description="wanda")
        return self.report(ctx, proc.names)
