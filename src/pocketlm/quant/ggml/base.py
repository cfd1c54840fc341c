"""One GGML block type = one class: its level set, how it fits a block's parameters to weights
and their importance, and how it packs codes and parameters into llama.cpp's bytes.

Every type reads a weight back as ``a * L[q] + b``: L the type's fixed levels, q a code, and
(a, b) the scale and offset of the code's sub-block, derived from the stored parameters (a float16
scale per block; for K-quants and IQ4_XS a float16 super-block scale times small integer
sub-block scales and mins). ``fit`` chooses the parameters, ``encode`` the codes (the nearest
level given the parameters), ``pack`` writes both as the bytes ``gguf``'s dequantizers and
llama.cpp read.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from .search import nearest, weighted_error

Params = dict[str, torch.Tensor]


class GGMLType:
    name: ClassVar[str]
    block: ClassVar[int]  # weights per block (32, or 256 for a K-quant super-block)
    sub: ClassVar[int]  # weights per sub-block (one scale/offset each)
    type_size: ClassVar[int]  # bytes per block
    levels: ClassVar[torch.Tensor]

    @property
    def bpw(self) -> float:
        return self.type_size * 8 / self.block

    def __repr__(self) -> str:
        return self.name

    # --- what each type defines -------------------------------------------------------------
    def fit(self, x: torch.Tensor, w: torch.Tensor) -> Params:
        """Parameters for blocks x (n, block) with importance w (n, block)."""
        raise NotImplementedError

    def affine(self, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (n, block // sub): the scale and offset of every sub-block."""
        raise NotImplementedError

    def pack(self, q: torch.Tensor, p: Params) -> np.ndarray:
        """Codes (n, block) and parameters -> (n, type_size) uint8."""
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------
    def expand(self, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) per weight, (n, block)."""
        a, b = self.affine(p)
        return a.repeat_interleave(self.sub, -1), b.repeat_interleave(self.sub, -1)

    def encode(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        a, b = self.expand(p)
        return nearest((x - b) / torch.where(a == 0, torch.ones_like(a), a), self.levels)

    def decode(self, q: torch.Tensor, p: Params) -> torch.Tensor:
        a, b = self.expand(p)
        return a * self.levels[q] + b

    def error(self, x, w, q, p) -> torch.Tensor:
        """Weighted squared error per block."""
        a, b = self.expand(p)
        return weighted_error(x, w, a, b, q, self.levels)

    def quantize(self, x: torch.Tensor, w: torch.Tensor | None = None) -> tuple[torch.Tensor, Params]:
        x = x.float()
        w = torch.ones_like(x) if w is None else w.float().expand_as(x)
        p = self.fit(x, w)
        return self.encode(x, p), p


def f16_bytes(x: torch.Tensor) -> np.ndarray:
    """(n,) float32 holding float16 values -> (n, 2) bytes."""
    return x.numpy().astype(np.float16).reshape(-1, 1).view(np.uint8)


def u8(q: torch.Tensor) -> np.ndarray:
    return q.numpy().astype(np.uint8)


def nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 32) codes -> (..., 16) bytes: element j in the low nibble, j + 16 in the high one."""
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)
