"""GGML block types as quantization grids: importance-weighted fitting, llama.cpp's byte layouts,
and llama.cpp's fallback rule for rows a type cannot hold.

``TYPES`` maps a type name to its class (one per type; adding a type is adding a class and a
line here). ``quantize_matrix`` puts a whole weight matrix on a type; ``GGMLWeight`` holds the
result as the very bytes a GGUF file stores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import PocketError
from .base import GGMLType
from .blocks32 import IQ4_NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
from .kquants import IQ4_XS, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K

TYPES: dict[str, GGMLType] = {t.name: t() for t in (Q8_0, Q6_K, Q5_1, Q5_K, Q5_0, Q4_1, Q4_K, IQ4_NL, Q4_0,
                                                    IQ4_XS, Q3_K, Q2_K)}

#: llama.cpp's substitute when a row is not a multiple of the type's block (``tensor_type_fallback``
#: in llama-quant.cpp); a 32-block type that does not fit either becomes F16.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}


def get_type(name: str) -> GGMLType:
    key = name.upper().removeprefix("GGUF-")
    if key not in TYPES:
        raise PocketError(f"unknown GGML type '{name}'; use one of {', '.join(TYPES)}")
    return TYPES[key]


def fits(name: str, d_in: int) -> bool:
    return d_in % get_type(name).block == 0


def fallback(name: str, d_in: int) -> str:
    """The type llama.cpp writes for a tensor of rows of ``d_in`` asked to be ``name``."""
    name = get_type(name).name
    if fits(name, d_in):
        return name
    alt = FALLBACK.get(name, name)
    return alt if fits(alt, d_in) else "F16"


def bpw(name: str) -> float:
    return get_type(name).bpw


@dataclass
class GGMLWeight:
    """A d_out x d_in matrix stored as a GGML type: ``data`` is (d_out, row bytes) uint8."""

    type: str
    shape: tuple[int, int]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.size)

    @property
    def bpw(self) -> float:
        return self.nbytes * 8 / (self.shape[0] * self.shape[1])

    def dequantize(self) -> torch.Tensor:
        from gguf.quants import dequantize
        from gguf import GGMLQuantizationType

        out = dequantize(self.data, GGMLQuantizationType[self.type])
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(self.shape)


def importance_weights(w: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """Per-weight importance of a d_out x d_in matrix: the input's mean square (column-wise), or
    uniform without calibration data. Columns never seen (0) get a tiny weight so that their
    blocks still get a sensible grid."""
    if imatrix is None:
        return torch.ones(1, w.shape[1])
    h = imatrix.float().cpu().clamp(min=0)
    floor = 1e-6 * h.mean().clamp(min=1e-30)
    return (h + floor)[None, :]


def quantize_matrix(w: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None,
                    rows_per_chunk: int | None = None) -> tuple[torch.Tensor, GGMLWeight, torch.Tensor, dict]:
    """Importance-weighted round-to-nearest of ``w`` onto ``type_name``.

    Returns the dequantized weight, the packed ``GGMLWeight``, the codes (d_out, d_in) and the
    parameters (per block, blocks of a row consecutive)."""
    t = get_type(type_name)
    d_out, d_in = w.shape
    if d_in % t.block:
        raise PocketError(f"{t.name} needs rows that are a multiple of {t.block} inputs, got {d_in}; "
                          f"use {fallback(t.name, d_in)} (llama.cpp's fallback) for this tensor")
    W = w.detach().float().cpu()
    imp = importance_weights(W, imatrix)
    nb = d_in // t.block
    rows = rows_per_chunk or max(1, (1 << 21) // d_in)
    deq = torch.empty_like(W)
    data = np.empty((d_out, nb * t.type_size), np.uint8)
    q_all = torch.empty(d_out, d_in, dtype=torch.uint8)
    params: dict[str, list] = {}
    for r0 in range(0, d_out, rows):
        x = W[r0 : r0 + rows].reshape(-1, t.block)
        wt = imp.expand(x.shape[0] // nb, d_in).reshape(-1, t.block)
        q, p = t.quantize(x, wt)
        deq[r0 : r0 + rows] = t.decode(q, p).reshape(-1, d_in)
        data[r0 : r0 + rows] = t.pack(q, p).reshape(-1, nb * t.type_size)
        q_all[r0 : r0 + rows] = q.reshape(-1, d_in).to(torch.uint8)
        for k, v in p.items():
            params.setdefault(k, []).append(v)
    params = {k: torch.cat(v) for k, v in params.items()}
    return deq, GGMLWeight(t.name, (d_out, d_in), data), q_all, params
