"""The block-of-32 types: one float16 scale (and for *_1 an offset) per 32 weights.

Q4_0  x = d * (q - 8)          Q5_0  x = d * (q - 16)        Q8_0  x = d * q, q in -127..127
Q4_1  x = d * q + m            Q5_1  x = d * q + m
IQ4_NL x = d * K[q]: K the 16 non-uniform levels of llama.cpp's ``kvalues_iq4nl``, denser near 0.
Byte layouts: d (, m), [Q5: the 32 fifth bits as a little-endian uint32], nibbles (element j low,
j + 16 high) or int8 values.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import GGMLType, Params, f16_bytes, nibbles, u8
from .search import fit_scale, fit_scale_min

#: llama.cpp's IQ4_NL levels (also IQ4_XS's)
KVALUES_IQ4 = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                           dtype=torch.float32)


class _Scaled32(GGMLType):
    """x = d * L[q]: one float16 scale per block of 32."""

    block = sub = 32

    def fit(self, x, w) -> Params:
        return {"d": fit_scale(x, w, self.levels)}

    def affine(self, p):
        d = p["d"][:, None]
        return d, torch.zeros_like(d)


class _Offset32(GGMLType):
    """x = d * q + m: a float16 scale and offset per block of 32."""

    block = sub = 32
    nmax: int

    def fit(self, x, w) -> Params:
        d, m = fit_scale_min(x, w, self.nmax, nonpos_min=False, round16=True)
        return {"d": d, "m": m}

    def affine(self, p):
        return p["d"][:, None], p["m"][:, None]


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=-1, bitorder="little")


class Q4_0(_Scaled32):
    name, type_size = "Q4_0", 18
    levels = torch.arange(-8, 8, dtype=torch.float32)

    def pack(self, q, p):
        return np.concatenate([f16_bytes(p["d"]), nibbles(u8(q))], -1)


class Q5_0(_Scaled32):
    name, type_size = "Q5_0", 22
    levels = torch.arange(-16, 16, dtype=torch.float32)

    def pack(self, q, p):
        c = u8(q)
        return np.concatenate([f16_bytes(p["d"]), _fifth_bits(c), nibbles(c)], -1)


class Q8_0(_Scaled32):
    name, type_size = "Q8_0", 34
    levels = torch.arange(-127, 128, dtype=torch.float32)  # -128 is left out, as llama.cpp does

    def pack(self, q, p):
        return np.concatenate([f16_bytes(p["d"]), (q.numpy() - 127).astype(np.int8).view(np.uint8)], -1)


class IQ4_NL(_Scaled32):
    name, type_size = "IQ4_NL", 18
    levels = KVALUES_IQ4

    def pack(self, q, p):
        return np.concatenate([f16_bytes(p["d"]), nibbles(u8(q))], -1)


class Q4_1(_Offset32):
    name, type_size, nmax = "Q4_1", 20, 15
    levels = torch.arange(16, dtype=torch.float32)

    def pack(self, q, p):
        return np.concatenate([f16_bytes(p["d"]), f16_bytes(p["m"]), nibbles(u8(q))], -1)


class Q5_1(_Offset32):
    name, type_size, nmax = "Q5_1", 24, 31
    levels = torch.arange(32, dtype=torch.float32)

    def pack(self, q, p):
        c = u8(q)
        return np.concatenate([f16_bytes(p["d"]), f16_bytes(p["m"]), _fifth_bits(c), nibbles(c)], -1)
