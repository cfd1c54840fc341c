"""Per-linear calibration statistics, accumulated from the engine's hooks."""
from __future__ import annotations

import torch

from .calibrate import LayerProcessor


class HessianProcessor(LayerProcessor):
    """Accumulates H = 2/N X X^T for every wanted linear of the current layer (GPTQ, SparseGPT).
    Linears that read the same input tensor (q/k/v, gate/up) share one accumulator."""

    def __init__(self, select):
        self._select = select
        self._sum: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}
        self._alias: dict[str, str] = {}

    def wants(self, name: str) -> bool:
        return self._select(name)

    def observe(self, name: str, x: torch.Tensor) -> None:
        x = x.float()
        acc = self._sum.get(name)
        if acc is None:
            self._sum[name] = x.T @ x
            self._count[name] = x.shape[0]
        else:
            acc.addmm_(x.T, x)
            self._count[name] += x.shape[0]

    def share(self, name: str, source: str, x: torch.Tensor) -> None:
        if self._alias.get(name, source) != source:  # inputs shared only sometimes: keep apart
            raise RuntimeError(f"{name} shares its input inconsistently")
        self._alias[name] = self._alias.get(source, source)

    def hessian(self, name: str) -> torch.Tensor:
        key = self._alias.get(name, name)
        return self._sum[key] * (2.0 / self._count[key])

    def release_layer(self) -> None:
        self._sum.clear()
        self._count.clear()
        self._alias.clear()
