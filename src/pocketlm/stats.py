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

    def hessian(self, name: str, last: bool = False) -> torch.Tensor:
        """H of ``name``; ``last``: no other linear will ask for this accumulator, which is then
        scaled in place and handed over (no d_in x d_in copy)."""
        key = self._alias.get(name, name)
        if last:
            return self._sum.pop(key).mul_(2.0 / self._count[key])
        return self._sum[key] * (2.0 / self._count[key])

    def users(self, names) -> dict[str, int]:
        """How many of ``names`` read each accumulator (to know which use is the last)."""
        count: dict[str, int] = {}
        for n in names:
            key = self._alias.get(n, n)
            count[key] = count.get(key, 0) + 1
        return count

    def release_layer(self) -> None:
        self._sum.clear()
        self._count.clear()
        self._alias.clear()


class ImatrixProcessor(LayerProcessor):
    """The importance matrix: for every wanted linear, the mean square of each input over the
    calibration tokens (diag of X X^T / N; llama.cpp's ``llama-imatrix`` collects the same), and
    with ``head`` that of the output head's inputs (the final norm's outputs).
    ``quantize(layer, imatrix)`` is called after each layer is observed, with the layer's
    {linear: importance}, so a quantizer can transform the layer in one pass."""

    def __init__(self, select, quantize=None, head: bool = False):
        self._select, self._quantize, self._head = select, quantize, head
        self.modifies_layer = quantize is not None
        self._sum: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}
        self._alias: dict[str, str] = {}
        self.imatrix: dict[str, torch.Tensor] = {}
        self.head: torch.Tensor | None = None

    def wants(self, name: str) -> bool:
        return self._select(name)

    def observe(self, name: str, x: torch.Tensor) -> None:
        sq = x.float().pow(2).sum(0)
        if name in self._sum:
            self._sum[name] += sq
            self._count[name] += x.shape[0]
        else:
            self._sum[name], self._count[name] = sq, x.shape[0]

    def share(self, name: str, source: str, x: torch.Tensor) -> None:
        self._alias[name] = self._alias.get(source, source)  # same input tensor (q/k/v, gate/up): count it once

    def process(self, layer) -> None:
        got = {n: self._sum[n] / self._count[n] for n in self._sum}
        got.update({n: got[src] for n, src in self._alias.items()})
        self._sum.clear()
        self._count.clear()
        self._alias.clear()
        self.imatrix.update(got)
        if self._quantize is not None:
            self._quantize(layer, got)

    def finish(self, adapter, hidden) -> None:
        if self._head:
            self.head = head_importance(adapter, hidden)


def head_importance(adapter, hidden) -> torch.Tensor:
    """Mean square of each input of the output head (the final norm of the last layer's outputs)."""
    total, count = None, 0
    dev = next(adapter.norm.parameters()).device
    with torch.no_grad():
        for i in range(len(hidden)):
            h = adapter.norm(hidden[i].to(dev)).float()
            h = h.reshape(-1, h.shape[-1])
            sq = h.pow(2).sum(0).cpu()
            total = sq if total is None else total + sq
            count += h.shape[0]
    return total / count
