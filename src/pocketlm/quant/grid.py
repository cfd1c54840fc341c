"""The quantization grid: b-bit integer codes with a scale (and zero point) per group of
``group_size`` consecutive inputs of each output row.

A weight w in a group with scale s and zero point z is stored as the code
q = clamp(round(w / s) + z, 0, 2^b - 1) and read back as s * (q - z).
- asymmetric: the group's range [min(w, 0), max(w, 0)] is spread over all 2^b codes, z is an
  integer code stored with b bits (the GPTQ convention);
- symmetric: s = max|w| / (2^(b-1) - 1), z = 2^(b-1) is implied and not stored.
Scales are stored in float16 (``scale_bits``). A row whose length is not a multiple of the
group size ends with a shorter group, which still pays for a full scale (and zero).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class QuantSpec(BaseModel):
    """How one weight matrix is quantized."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(4, ge=2, le=8, description="bits per weight code")
    group_size: int = Field(128, description="inputs per group; -1 = one group per output row")
    sym: bool = Field(False, description="symmetric grid (no stored zero point)")
    clip: bool = Field(False, description="search a clipping ratio per group that minimises its error")
    scale_bits: int = Field(16, description="bits of each stored scale")
    zero_bits: int | None = Field(None, description="bits of each stored zero point (default: bits; GGUF's "
                                                    "*_1 formats store it as a float16 offset)")
    signed_scale: bool = Field(False, description="symmetric grid whose scale carries the sign of the group's "
                                                  "largest-magnitude weight, which lands on the extra code "
                                                  "-2^(b-1) (GGML's Q4_0/Q5_0 rounding: 2^b levels, not 2^b - 1)")

    @model_validator(mode="after")
    def _check(self):
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError("group_size must be a positive number of inputs, or -1 for one group per row")
        return self

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, d_in: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(d_in / self.group_size)

    def group_len(self, d_in: int) -> int:
        return d_in if self.group_size == -1 else self.group_size

    @property
    def param_bits(self) -> int:
        """Bits stored per group: its scale, and its zero point when asymmetric."""
        return self.scale_bits + (0 if self.sym else self.zero_bits or self.bits)

    def storage_bits(self, d_out: int, d_in: int) -> int:
        """Every bit stored for a d_out x d_in matrix: codes, scales and zero points."""
        return d_out * d_in * self.bits + d_out * self.n_groups(d_in) * self.param_bits

    def bpw(self, d_out: int, d_in: int) -> float:
        return self.storage_bits(d_out, d_in) / (d_out * d_in)

    def label(self) -> str:
        g = "row" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}-{g}-{'sym' if self.sym else 'asym'}"


CLIP_RATIOS = torch.linspace(1.0, 0.7, 13)


def find_params(w: torch.Tensor, spec: QuantSpec, weight: torch.Tensor | None = None,
                bits: torch.Tensor | None = None):
    """Scale and zero point for each row of ``w`` (rows x cols, one group per row); ``bits``
    optionally gives each row its own width (rows of several candidate grids stacked).

    With ``spec.clip``, the range is shrunk by the ratio (from 1.0 down to 0.7) that
    minimises the row's squared error, weighted per column by ``weight`` when given."""
    w = w.float()
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    bits = torch.full_like(lo, spec.bits) if bits is None else bits.to(lo)
    if not spec.clip:
        return _params_from_range(lo, hi, spec, bits)
    maxq = (2**bits - 1)[:, None]
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_z = _params_from_range(lo, hi, spec, bits)
    for r in CLIP_RATIOS.tolist():
        s, z = _params_from_range(lo * r, hi * r, spec, bits)
        err = (fake_quant(w, s[:, None], z[:, None], maxq) - w).pow(2)
        err = (err * weight).sum(1) if weight is not None else err.sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, bits: torch.Tensor):
    sign = torch.ones_like(lo)
    if spec.sym and spec.signed_scale:  # x = s * (q - 2^(b-1)) with the extreme weight at q = 0
        sign = torch.where(hi >= -lo, -1.0, 1.0)
        scale = torch.maximum(-lo, hi) / 2 ** (bits - 1)
    elif spec.sym:
        scale = torch.maximum(-lo, hi) / (2 ** (bits - 1) - 1)
    else:
        scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.scale_bits == 16:
        scale = fp16_ceil(scale.clamp(min=2**-24))
    scale = scale * sign
    if spec.sym:
        zero = 2 ** (bits - 1)
    else:
        zero = torch.round(-lo / scale)
    return scale, zero


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Round up to a float16 value, so the stored scale still covers the group's range."""
    h = x.to(torch.float16)
    up = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.float() < x, up, h).float()


def codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: "int | torch.Tensor") -> torch.Tensor:
    q = torch.round(w / scale) + zero
    if isinstance(maxq, torch.Tensor):
        return torch.minimum(q.clamp(min=0), maxq)
    return torch.clamp(q, 0, maxq)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: "int | torch.Tensor") -> torch.Tensor:
    """Quantize and dequantize (the value the stored code reads back as)."""
    return scale * (codes(w, scale, zero, maxq) - zero)


@dataclass
class QuantizedWeight:
    """A quantized d_out x d_in matrix: codes plus per-group scales and zero points."""

    spec: QuantSpec
    codes: torch.Tensor  # uint8, d_out x d_in
    scales: torch.Tensor  # float32 (float16 values), d_out x n_groups
    zeros: torch.Tensor  # uint8, d_out x n_groups

    def dequantize(self) -> torch.Tensor:
        d_in = self.codes.shape[1]
        g = self.spec.group_len(d_in)
        idx = torch.arange(d_in) // g
        return self.scales[:, idx] * (self.codes.float() - self.zeros[:, idx].float())

    @property
    def bpw(self) -> float:
        return self.spec.bpw(*self.codes.shape)


def quantize_weight(w: torch.Tensor, spec: QuantSpec, col_weight: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of a whole matrix, group by group."""
    d_out, d_in = w.shape
    g = spec.group_len(d_in)
    q = torch.empty(d_out, d_in, dtype=torch.uint8)
    scales = torch.empty(d_out, spec.n_groups(d_in))
    zeros = torch.empty(d_out, spec.n_groups(d_in), dtype=torch.uint8)
    w = w.detach().float().cpu()
    for j, c0 in enumerate(range(0, d_in, g)):
        blk = w[:, c0 : c0 + g]
        cw = col_weight[c0 : c0 + g].float().cpu() if col_weight is not None else None
        s, z = find_params(blk, spec, cw)
        q[:, c0 : c0 + g] = codes(blk, s[:, None], z[:, None], spec.maxq).to(torch.uint8)
        scales[:, j], zeros[:, j] = s, z.to(torch.uint8)
    return QuantizedWeight(spec, q, scales, zeros)
