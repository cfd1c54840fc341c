"""Importance-weighted scale search for block quantization: pure functions on batches of blocks.

Every GGML block type stores, per block (or sub-block) of inputs, a scale ``a`` (and an offset
``b`` for the types with a min) and per weight a code q indexing a fixed level set L; the weight
reads back as ``a * L[q] + b``. Given the weights x of n blocks and a per-weight importance w
(the imatrix: mean x^2 of each input over calibration tokens), these functions choose ``a`` (and
``b``) to minimise the weighted error sum_j w_j (x_j - a L[q_j] - b)^2: a sweep over candidate
scales around the range-based one; for each candidate the codes by rounding to the nearest level
and then the closed-form weighted least-squares refit of ``a`` (and ``b``) given those codes.
The idea follows llama.cpp's ``make_qx_quants`` / ``make_qkx2_quants`` (ggml-quants.c) and the
"importance matrix" quantization it introduced; the code here is written from the maths.

Every candidate is scored with its scale rounded to float16 (what is stored), and the range-based
scale is always among the candidates, so the result's weighted error is never above it.
"""
from __future__ import annotations

import torch

# candidate scales: the range-based scale times these factors (1.0, the range-based one, first).
# Steps of 0.04 over 0.8-1.2 reach within 0.02% of the weighted error of steps of 0.02 on
# SmolLM2's linears with its calibration imatrix (IQ4_NL and Q4_0 levels), in half the time;
# a narrower range or only the outer end of an asymmetric level set loses 1-30%.
SYM_FACTORS = torch.tensor([1.0, 0.8, 0.84, 0.88, 0.92, 0.96, 1.04, 1.08, 1.12, 1.16, 1.2])
ASYM_STEPS = torch.cat([torch.tensor([0.0]), torch.linspace(-1.0, 1.0, 21)])  # extra levels spread


def fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value (as float32)."""
    return x.to(torch.float16).float()


def nearest(y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (``levels`` sorted ascending) for every value of ``y``."""
    n = levels.numel()
    step = levels[1:] - levels[:-1]
    if bool((step == step[0]).all()):  # uniform: round
        return torch.clamp(torch.round((y - levels[0]) / step[0]), 0, n - 1).long()
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(y.contiguous(), mids)


def _safe(a: torch.Tensor) -> torch.Tensor:
    return torch.where(a == 0, torch.ones_like(a), a)


def weighted_error(x, w, a, b, q, levels) -> torch.Tensor:
    """sum_j w_j (x_j - a L[q_j] - b)^2 per block (a, b broadcast against x)."""
    return (w * (x - a * levels[q] - b).pow(2)).sum(-1)


def _values(y: torch.Tensor, levels: torch.Tensor, uniform: bool) -> torch.Tensor:
    """The nearest level's value for every value of ``y``."""
    if uniform:
        return torch.clamp(torch.round(y), float(levels[0]), float(levels[-1]))
    return levels[torch.bucketize(y, (levels[1:] + levels[:-1]) / 2)]


def is_uniform(levels: torch.Tensor) -> bool:
    step = levels[1:] - levels[:-1]
    return bool((step == 1).all())


def fit_scale(x: torch.Tensor, w: torch.Tensor, levels: torch.Tensor, factors: torch.Tensor = SYM_FACTORS,
              round16: bool = True) -> torch.Tensor:
    """The scale a (per block, x: (n, g)) of the grid a * L[q] minimising the weighted error.

    Candidates map the block's largest-magnitude weight onto the outermost level on either side
    (both signs of a) times each factor; each candidate's codes get the least-squares scale
    sum w x L / sum w L^2. The best scale found (float16 when ``round16``) is returned."""
    amax_i = x.abs().argmax(-1, keepdim=True)
    xmax = x.gather(-1, amax_i).squeeze(-1)  # signed extreme weight, (n,)
    lo, hi = float(levels[0]), float(levels[-1])
    ends = [e for e in (lo, hi) if e != 0 and not (e == hi and lo == -hi)]  # map the extreme onto an end
    uniform = is_uniform(levels)
    wx = w * x
    swxx = (wx * x).sum(-1, dtype=torch.float64)
    best_a = torch.zeros_like(xmax)
    best_err = torch.full(xmax.shape, float("inf"), dtype=torch.float64)
    safe_max = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
    first = None
    for end in ends:
        for f in factors.tolist():
            cand = safe_max / (end * f)
            if round16:
                cand = fp16(cand)
            cand = torch.where(cand == 0, torch.full_like(cand, 2.0**-24), cand)
            first = cand if first is None else first
            L = _values(x / cand[:, None], levels, uniform)
            sxl = (wx * L).sum(-1, dtype=torch.float64)
            sll = (w * L * L).sum(-1, dtype=torch.float64)
            refit = torch.where(sll > 0, sxl / torch.where(sll > 0, sll, torch.ones_like(sll)), cand.double()).float()
            if round16:
                refit = fp16(refit)
            for a in (cand, refit):  # the candidate, and its refit on the same codes (an upper bound)
                a64 = a.double()  # the error from the block's sums, in float64: no pass over the weights
                err = swxx - 2 * a64 * sxl + a64 * a64 * sll
                better = err < best_err
                best_a = torch.where(better, a, best_a)
                best_err = torch.where(better, err, best_err)
    # the sums rank near-ties only to float32 products; the range-based scale (the first
    # candidate) is compared exactly, so the result is never worse than it
    exact = [(w * (x - a[:, None] * _values(x / _safe(a)[:, None], levels, uniform)).pow(2)).sum(-1)
             for a in (best_a, first)]
    best_a = torch.where(exact[1] < exact[0], first, best_a)
    return torch.where(xmax == 0, torch.zeros_like(best_a), best_a)


def _solve_scale_min(sw, sl, sll, sx, sxl, nonpos_min: bool):
    """Weighted least squares of x ~ s L + b from the sums sum w, sum w L, sum w L^2, sum w x and
    sum w x L; with ``nonpos_min`` a positive b is replaced by b = 0 and its own best s."""
    D = sw * sll - sl * sl
    ok = D > 1e-30
    Ds = torch.where(ok, D, torch.ones_like(D))
    s = torch.where(ok, (sw * sxl - sx * sl) / Ds, torch.zeros_like(D))
    b = torch.where(ok, (sll * sx - sl * sxl) / Ds, sx / torch.where(sw > 0, sw, torch.ones_like(sw)))
    if nonpos_min:
        pos = b > 0
        s = torch.where(pos, sxl / torch.where(sll > 0, sll, torch.ones_like(sll)), s)
        b = torch.where(pos, torch.zeros_like(b), b)
    return s, b


def fit_scale_min(x: torch.Tensor, w: torch.Tensor, nmax: int, nonpos_min: bool = True,
                  steps: torch.Tensor = ASYM_STEPS, round16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale s >= 0 and offset b of the grid s * q + b, q in 0..nmax, minimising the weighted error
    (x: (n, g)). ``nonpos_min`` keeps b <= 0 (K-quants store -b as an unsigned min).

    Candidates spread the range [min, max] over nmax + step levels; each candidate's codes get
    the weighted least-squares (s, b), which is kept if it beats the candidate itself."""
    lo = x.min(-1).values
    hi = x.max(-1).values
    if nonpos_min:
        lo = lo.clamp(max=0)
    rng = hi - lo
    sw, sx = w.sum(-1), (w * x).sum(-1)
    wx = w * x
    best_s, best_b = torch.zeros_like(lo), lo.clone()
    best_err = torch.full_like(lo, float("inf"))
    for step in steps.tolist():
        cs, cb = rng / (nmax + step), lo
        if round16:
            cs, cb = fp16(cs), fp16(cb)
        q = torch.clamp(torch.round((x - cb[:, None]) / _safe(cs)[:, None]), 0, nmax)
        sl, sll, sxl = (w * q).sum(-1), (w * q * q).sum(-1), (wx * q).sum(-1)
        s, b = _solve_scale_min(sw, sl, sll, sx, sxl, nonpos_min)
        s = torch.where(s > 0, s, cs)
        if round16:
            s, b = fp16(s), fp16(b)
        for a, c in ((cs, cb), (s, b)):  # the candidate, and its refit on the same codes
            err = (w * (x - a[:, None] * q - c[:, None]).pow(2)).sum(-1)
            better = err < best_err
            best_s, best_b = torch.where(better, a, best_s), torch.where(better, c, best_b)
            best_err = torch.where(better, err, best_err)
    return best_s, best_b


def quantize_subscales(s: torch.Tensor, weight: torch.Tensor, lo: int, hi: int,
                       factors: torch.Tensor = SYM_FACTORS) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer sub-block scales: s (n, m) ~ d * k with k in [lo, hi] and one float16 d per row,
    minimising sum weight (s - d k)^2 (weight: how much each sub-block's error costs, e.g.
    sum w L^2 of its codes). Returns (d, k)."""
    levels = torch.arange(lo, hi + 1, dtype=s.dtype)
    return_d = fit_scale(s, weight, levels, factors)
    k = levels[nearest(s / _safe(return_d)[:, None], levels)]
    return return_d, k
