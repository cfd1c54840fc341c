"""Super-blocks of 256 weights (K-quants and IQ4_XS): one float16 super-block scale d (and dmin)
times small integer scales (and mins) of 8 sub-blocks of 32 or 16 sub-blocks of 16.

Q2_K  16 x 16, x = d*s_j*q - dmin*m_j, q 0..3,  s, m 4-bit     (2.625 bpw)
Q3_K  16 x 16, x = d*s_j*(q - 4),      q 0..7,  s 6-bit signed (3.4375 bpw)
Q4_K   8 x 32, x = d*s_j*q - dmin*m_j, q 0..15, s, m 6-bit     (4.5 bpw)
Q5_K   8 x 32, x = d*s_j*q - dmin*m_j, q 0..31, s, m 6-bit     (5.5 bpw)
Q6_K  16 x 16, x = d*s_j*(q - 32),     q 0..63, s int8         (6.5625 bpw)
IQ4_XS 8 x 32, x = d*s_j*K[q], K the IQ4_NL levels, s 6-bit signed (4.25 bpw)

Fitting, for every type: each sub-block's continuous scale (and min) by the importance-weighted
search; the integer sub-block scales (and mins) with one float16 d (dmin) by the same search on
the sub-block scales, each weighted by what its error costs (sum w L^2 of its codes, sum w for a
min); then alternately the codes given the parameters and the weighted least-squares (d, dmin)
given the codes and integer scales, keeping the best. Byte layouts follow ``gguf``'s
dequantizers (gguf-py ``quants.py``), which the tests check bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import GGMLType, Params, f16_bytes, u8
from .blocks32 import KVALUES_IQ4
from .search import fit_scale, fit_scale_min, fp16, quantize_subscales

QK = 256
REFITS = 2


def _ls1(x, w, u):
    """argmin_d sum w (x - d u)^2 per row."""
    den = (w * u * u).sum(-1)
    return torch.where(den > 0, (w * x * u).sum(-1) / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.zeros_like(den))


def _ls2(x, w, u, v):
    """argmin_{d,e} sum w (x - d u - e v)^2 per row."""
    a, b, c = (w * u * u).sum(-1), (w * u * v).sum(-1), (w * v * v).sum(-1)
    r1, r2 = (w * x * u).sum(-1), (w * x * v).sum(-1)
    det = a * c - b * b
    ok = det.abs() > 1e-12 * (a * c).abs().clamp(min=1e-30)
    dets = torch.where(ok, det, torch.ones_like(det))
    d = torch.where(ok, (c * r1 - b * r2) / dets, _ls1(x, w, u))
    e = torch.where(ok, (a * r2 - b * r1) / dets, torch.zeros_like(det))
    return d, e


class _KType(GGMLType):
    block = QK
    has_min: bool
    sc_range: tuple[int, int]  # integer sub-block scales (and mins: 0..sc_range[1])

    def affine(self, p):
        a = p["d"][:, None] * p["sc"]
        b = -p["dmin"][:, None] * p["mn"] if self.has_min else torch.zeros_like(a)
        return a, b

    def fit(self, x, w) -> Params:
        n, m = x.shape[0], self.block // self.sub
        xs, ws = x.reshape(n * m, self.sub), w.reshape(n * m, self.sub)
        lo, hi = self.sc_range
        if self.has_min:
            nmax = len(self.levels) - 1
            s, b = fit_scale_min(xs, ws, nmax, nonpos_min=True)
            q = torch.clamp(torch.round((xs - b[:, None]) / torch.where(s > 0, s, 1)[:, None]), 0, nmax)
            cost_s = (ws * q * q).sum(-1).reshape(n, m)
            d, sc = quantize_subscales(s.reshape(n, m), cost_s, 0, hi)
            dmin, mn = quantize_subscales((-b).reshape(n, m), ws.sum(-1).reshape(n, m), 0, hi)
            p = {"d": d, "dmin": dmin, "sc": sc, "mn": mn}
        else:
            s = fit_scale(xs, ws, self.levels, round16=False)
            L = self.levels[self.encode_sub(xs, s)]
            d, sc = quantize_subscales(s.reshape(n, m), (ws * L * L).sum(-1).reshape(n, m), lo, hi)
            p = {"d": d, "sc": sc}
        return self._refit(x, w, p)

    def encode_sub(self, xs, s):
        from .search import nearest

        return nearest(xs / torch.where(s == 0, torch.ones_like(s), s)[:, None], self.levels)

    def _refit(self, x, w, p: Params) -> Params:
        """Alternate codes and least-squares (d, dmin) given the integer scales; keep the best."""
        q = self.encode(x, p)
        best, best_err = p, self.error(x, w, q, p)
        for _ in range(REFITS):
            u = (p["sc"].repeat_interleave(self.sub, -1)) * self.levels[q]
            if self.has_min:
                v = -p["mn"].repeat_interleave(self.sub, -1)
                d, dmin = _ls2(x, w, u, v)
                p = {**p, "d": fp16(d), "dmin": fp16(dmin)}
            else:
                p = {**p, "d": fp16(_ls1(x, w, u))}
            q = self.encode(x, p)
            err = self.error(x, w, q, p)
            better = err < best_err
            best = {k: torch.where(better.reshape(-1, *[1] * (v.dim() - 1)), v, best[k]) for k, v in p.items()}
            best_err = torch.minimum(err, best_err)
        return best


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins -> 12 bytes (gguf-py ``get_scale_min``)."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _crumbs(c: np.ndarray, groups: int) -> np.ndarray:
    """2-bit codes (n, 256): element h*128 + k*32 + p -> bits 2k of byte h*32 + p."""
    c = c.reshape(-1, groups, 4, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(c.shape[0], -1)


def _bitplane(bit: np.ndarray) -> np.ndarray:
    """One bit per element (n, 256): element k*32 + p -> bit k of byte p."""
    b = bit.reshape(-1, 8, 32)
    return sum((b[:, k] << k) for k in range(8)).astype(np.uint8)


class Q2_K(_KType):
    name, sub, type_size, has_min, sc_range = "Q2_K", 16, 84, True, (0, 15)
    levels = torch.arange(4, dtype=torch.float32)

    def pack(self, q, p):
        scales = (u8(p["sc"]) & 0x0F) | (u8(p["mn"]) << 4)
        return np.concatenate([scales, _crumbs(u8(q), 2), f16_bytes(p["d"]), f16_bytes(p["dmin"])], -1)


class Q3_K(_KType):
    name, sub, type_size, has_min, sc_range = "Q3_K", 16, 110, False, (-32, 31)
    levels = torch.arange(-4, 4, dtype=torch.float32)

    def pack(self, q, p):
        c = u8(q)
        u = (p["sc"].numpy() + 32).astype(np.uint8)
        scales = np.empty((c.shape[0], 12), np.uint8)
        scales[:, :8] = (u[:, :8] & 0x0F) | ((u[:, 8:] & 0x0F) << 4)
        hi = (u >> 4) & 3
        scales[:, 8:] = hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)
        return np.concatenate([_bitplane(c >> 2), _crumbs(c & 3, 2), scales, f16_bytes(p["d"])], -1)


class Q4_K(_KType):
    name, sub, type_size, has_min, sc_range = "Q4_K", 32, 144, True, (0, 63)
    levels = torch.arange(16, dtype=torch.float32)

    def pack(self, q, p):
        c = u8(q).reshape(-1, 4, 2, 32)
        qs = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(c.shape[0], -1)
        return np.concatenate([f16_bytes(p["d"]), f16_bytes(p["dmin"]), _k_scales(u8(p["sc"]), u8(p["mn"])), qs], -1)


class Q5_K(_KType):
    name, sub, type_size, has_min, sc_range = "Q5_K", 32, 176, True, (0, 63)
    levels = torch.arange(32, dtype=torch.float32)

    def pack(self, q, p):
        full = u8(q)
        c = (full & 0x0F).reshape(-1, 4, 2, 32)
        qs = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(c.shape[0], -1)
        return np.concatenate([f16_bytes(p["d"]), f16_bytes(p["dmin"]), _k_scales(u8(p["sc"]), u8(p["mn"])),
                               _bitplane(full >> 4), qs], -1)


class Q6_K(_KType):
    name, sub, type_size, has_min, sc_range = "Q6_K", 16, 210, False, (-128, 127)
    levels = torch.arange(-32, 32, dtype=torch.float32)

    def pack(self, q, p):
        c = u8(q)
        n = c.shape[0]
        lo = (c & 0x0F).reshape(n, 2, 2, 64)
        ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, -1)
        qh = _crumbs(c >> 4, 2)
        scales = p["sc"].numpy().astype(np.int8).view(np.uint8)
        return np.concatenate([ql, qh, scales, f16_bytes(p["d"])], -1)


class IQ4_XS(_KType):
    name, sub, type_size, has_min, sc_range = "IQ4_XS", 32, 136, False, (-32, 31)
    levels = KVALUES_IQ4

    def pack(self, q, p):
        c = u8(q).reshape(-1, 8, 2, 16)
        qs = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(c.shape[0], -1)
        u = (p["sc"].numpy() + 32).astype(np.uint16)
        sl = ((u[:, 0::2] & 0x0F) | ((u[:, 1::2] & 0x0F) << 4)).astype(np.uint8)
        sh = sum(((u[:, j] >> 4) & 3) << (2 * j) for j in range(8)).astype(np.uint16)
        return np.concatenate([f16_bytes(p["d"]), sh.reshape(-1, 1).view(np.uint8), sl, qs], -1)
