"""Sparsity targets and the mask choices the pruners share.

A target is either a ratio s (drop round(s * n) weights of each row, or of the whole matrix)
or an N:M pattern: in every M consecutive inputs of a row keep at most N weights (2:4, 4:8).
Masks are boolean with True = weight kept.
"""
from __future__ import annotations

import fnmatch
import re
from typing import ClassVar, NamedTuple

import torch
from pydantic import Field, field_validator

from ..errors import PocketError
from ..stages import Stage

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class Target(NamedTuple):
    sparsity: float  # fraction of weights removed
    nm: tuple[int, int] | None  # (N kept, of every M), or None for unstructured


def parse_target(value: float | str) -> Target:
    """0.5 -> 50% unstructured; "2:4" -> 2 of every 4 kept."""
    if isinstance(value, str):
        m = _NM.match(value)
        if not m:
            raise ValueError(f"'{value}' is not an N:M pattern such as 2:4")
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ValueError(f"pattern {n}:{mm} must keep between 1 and M-1 of every M weights")
        return Target(1 - n / mm, (n, mm))
    if not 0 <= value < 1:
        raise ValueError(f"sparsity {value} must lie in [0, 1)")
    return Target(float(value), None)


class PruneStage(Stage):
    """Fields shared by the pruners: one target for every selected linear, with overrides."""

    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of weights removed (unstructured)")
    pattern: str | None = Field(None, description="N:M pattern instead of a ratio: keep N of every M inputs (2:4)")
    overrides: dict[str, float | str] = Field(
        default_factory=dict, description="glob over linear names -> sparsity or N:M pattern (last match wins)")

    #: LLM-Barber's defaults for masks this pruner chose (Su et al., 2024): (alpha, granularity),
    #: and whether the rebuilt rows' weights are solved again (pruners that update weights)
    barber_defaults: ClassVar[tuple[float, str]] = (0.1, "layer")
    barber_resolves: ClassVar[bool] = False

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v):
        if v is not None:
            parse_target(v)
        return v

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v):
        for k, t in v.items():
            try:
                parse_target(t)
            except ValueError as e:
                raise ValueError(f"override '{k}': {e}") from None
        return v

    def target_for(self, name: str) -> Target:
        t = parse_target(self.pattern) if self.pattern else parse_target(self.sparsity)
        for pat, val in self.overrides.items():
            if fnmatch.fnmatchcase(name, pat):
                t = parse_target(val)
        return t

    def report(self, ctx, names: list[str]) -> dict:
        kept = sum(int(ctx.masks[n].sum()) for n in names)
        total = sum(ctx.masks[n].numel() for n in names)
        return {"linears": len(names), "sparsity": round(1 - kept / total, 6) if total else None,
                "target": self.pattern or self.sparsity}


class PruneLayer:
    """Mixin for the pruners' layer processors: once a layer has been observed, prune each
    wanted linear with the keep-mask (and optionally updated weight) ``choose`` returns."""

    def __init__(self, ctx, stage: PruneStage):
        self.ctx, self.stage, self.names = ctx, stage, []

    def choose(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def process(self, layer) -> None:
        for name, lin in layer.linears.items():
            if self.wants(name):
                keep, weight = self.choose(name, lin.weight.detach())
                self.ctx.prune(name, keep, self.stage.method, weight)
                self.names.append(name)
        self.release_layer()


def check_nm(name: str, d_in: int, m: int) -> None:
    if d_in % m:
        raise PocketError(f"{name} has {d_in} inputs, not a multiple of M={m}; use another N:M pattern "
                          f"or leave it out with 'ignore'")


def select(score: torch.Tensor, target: Target, per_row: bool, name: str = "weight") -> torch.Tensor:
    """Keep-mask that drops the lowest scores: exactly round(s * d_in) per row (``per_row``) or
    round(s * numel) in the matrix; with N:M, the N highest of every M inputs of each row."""
    d_out, d_in = score.shape
    if target.nm is not None:
        n, m = target.nm
        check_nm(name, d_in, m)
        groups = score.reshape(d_out, d_in // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
        return keep.reshape(d_out, d_in)
    keep = torch.ones(d_out, d_in, dtype=torch.bool, device=score.device)
    if per_row:
        k = round(target.sparsity * d_in)
        if k:
            keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
        return keep
    k = round(target.sparsity * score.numel())
    if k:
        keep.view(-1)[score.reshape(-1).topk(k, largest=False).indices] = False
    return keep
