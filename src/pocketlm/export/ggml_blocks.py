"""Pack a quantizer's integer codes into GGML block formats, bit for bit.

Every format here stores blocks of 32 consecutive inputs of a row with a float16 scale d (and,
for the *_1 formats, a float16 offset m):
- Q4_0: x = d * (q - 8), 4-bit q        - Q4_1: x = d * q + m, 4-bit q   (d may be negative:
  GGML puts a group's largest-magnitude weight on q = 0, using all 16 levels; so does our grid)
- Q5_0: x = d * (q - 16), 5-bit q       - Q5_1: x = d * q + m, 5-bit q
- Q8_0: x = d * q, 8-bit signed q
Our grid (``quant.grid``) writes x = s * (q - z). A symmetric grid (z = 2^(b-1)) maps to the *_0
formats exactly; an asymmetric one maps to *_1 with d = s and m = -s * z, m rounded to float16.
4-bit and 5-bit codes share a nibble layout: byte j holds element j (low nibble) and element
j + 16 (high nibble); Q5 keeps the 32 fifth bits in a little-endian 32-bit word.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PocketError
from ..quant.grid import QuantSpec

BLOCK = 32


@dataclass(frozen=True)
class BlockFormat:
    name: str
    bits: int
    sym: bool  # *_0 (scale only) or *_1 (scale and offset)

    @property
    def spec(self) -> QuantSpec:
        """The pocketlm grid whose codes this format stores as they are."""
        return QuantSpec(bits=self.bits, group_size=BLOCK, sym=self.sym, zero_bits=None if self.sym else 16,
                         signed_scale=self.sym and self.bits < 8)

    @property
    def block_bytes(self) -> int:
        body = BLOCK if self.bits == 8 else BLOCK // 2 + (4 if self.bits == 5 else 0)  # nibbles (+ fifth bits)
        return 2 + (0 if self.sym else 2) + body

    @property
    def bpw(self) -> float:
        return self.block_bytes * 8 / BLOCK


FORMATS = {f.name: f for f in (BlockFormat("Q4_0", 4, True), BlockFormat("Q4_1", 4, False),
                               BlockFormat("Q5_0", 5, True), BlockFormat("Q5_1", 5, False),
                               BlockFormat("Q8_0", 8, True))}


def parse_format(name: str) -> BlockFormat:
    """'gguf-q4_0' (or 'Q4_0') -> the block format."""
    key = name.upper().removeprefix("GGUF-")
    if key not in FORMATS:
        raise ValueError(f"unknown format '{name}'; use one of {', '.join('gguf-' + k.lower() for k in FORMATS)}")
    return FORMATS[key]


def format_for(spec: QuantSpec) -> BlockFormat | None:
    """The block format that holds ``spec``'s codes exactly, if any."""
    for f in FORMATS.values():
        if f.spec.bits == spec.bits and f.spec.sym == spec.sym and spec.group_size == BLOCK \
                and spec.scale_bits == 16 and (spec.signed_scale <= f.spec.signed_scale):
            return f
    return None


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, fmt: BlockFormat) -> np.ndarray:
    """Codes (d_out, d_in) in [0, 2^b), per-group scales and zero points (d_out, d_in / 32) ->
    the tensor's bytes, shaped (d_out, d_in / 32 * block_bytes), written by the GGML type's own
    packer (``quant.ggml``)."""
    from ..quant.ggml import get_type

    d_out, d_in = codes.shape
    if d_in % BLOCK:
        raise PocketError(f"{fmt.name} needs rows that are a multiple of {BLOCK} inputs, got {d_in}")
    s = scales.float().reshape(-1)
    z = zeros.float().reshape(-1)
    if not torch.equal(s.to(torch.float16).float(), s):
        raise PocketError(f"{fmt.name}: scales are not float16 values; quantize with a 16-bit scale grid")
    q = codes.long().reshape(-1, BLOCK)
    if fmt.sym:
        mid = 2 ** (fmt.bits - 1)
        if not torch.all(z == mid):
            raise PocketError(f"{fmt.name} stores symmetric codes (zero point {mid}); this grid is asymmetric")
        params = {"d": s}
        if fmt.bits == 8:  # Q8_0's levels are -127..127: index = code - 128 + 127
            q = q - 1
    else:
        params = {"d": s, "m": (-s * z).to(torch.float16).float()}
    return get_type(fmt.name).pack(q, params).reshape(d_out, -1)


def unpack_codes(data: np.ndarray, d_in: int, fmt: BlockFormat) -> np.ndarray:
    """The codes stored in a tensor's bytes (d_out, ...), in [0, 2^b): the inverse of ``pack``."""
    blocks = data.reshape(-1, fmt.block_bytes)
    at = 2 if fmt.sym else 4
    if fmt.bits == 8:
        q = blocks[:, at:].view(np.int8).astype(np.int32) + 128
    else:
        hi = 0
        if fmt.bits == 5:
            hi = np.unpackbits(blocks[:, at : at + 4], axis=-1, bitorder="little").astype(np.int32) << 4
            at += 4
        qs = blocks[:, at:].astype(np.int32)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1) | hi
    return q.reshape(-1, d_in)
