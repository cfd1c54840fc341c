"""The context length a RoPE base supports, and the base a context length needs.

Xu, Men et al., "Base of RoPE Bounds Context Length" (NeurIPS 2024): with rotary frequencies
theta_i = base^(-2i/d), i < d/2, the attention a query pays to a similar key m tokens away keeps
its ability to discriminate only while

    B(m) = sum_{i < d/2} cos(m * theta_i)  >=  0 .

A base supports context length L when B(m) >= 0 for every m <= L; the supported length is
the last m before B first turns negative. B is not monotone in the base, so the base a target
length needs is found by scanning bases upward, not by inverting a formula.
"""
from __future__ import annotations

import numpy as np

#: longest context examined (positions); a base whose B stays non-negative this far "supports >= CAP"
CAP = 1 << 24


def frequencies(base: float, head_dim: int) -> np.ndarray:
    """theta_i = base^(-2i/d) for i < d/2."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even and >= 2, got {head_dim}")
    if base <= 1:
        raise ValueError(f"the RoPE base must exceed 1, got {base}")
    return base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def bound(m: np.ndarray, base: float, head_dim: int) -> np.ndarray:
    """B(m) for each relative distance in ``m``."""
    theta = frequencies(base, head_dim)
    return np.cos(np.outer(np.asarray(m, dtype=np.float64), theta)).sum(axis=1)


def supported_length(base: float, head_dim: int, cap: int = CAP) -> int:
    """The largest L with B(m) >= 0 for all m <= L (``cap`` if B stays non-negative that far).
    Positions are examined in growing chunks, so a base that fails early costs little."""
    theta = frequencies(base, head_dim)
    start, chunk = 0, 4096
    while start <= cap:
        m = np.arange(start, min(start + chunk, cap + 1), dtype=np.float64)
        neg = np.flatnonzero(np.cos(np.outer(m, theta)).sum(axis=1) < 0)
        if neg.size:
            return int(m[neg[0]]) - 1
        start += chunk
        chunk = min(chunk * 2, 1 << 18)
    return cap


def base_grid(lo: float = 10.0, hi: float = 1e13) -> np.ndarray:
    """Bases with two significant digits (1.0e4, 1.1e4, ..., 9.9e4, 1.0e5, ...), the resolution
    of the paper's table: B's sign pattern changes so quickly with the base (a base may support
    4078 tokens while bases 0.4% either side support 3600) that a finer answer means nothing."""
    out = [m * 10.0**e for e in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
           for m in np.arange(10, 100) / 10]
    return np.array([b for b in out if lo <= b <= hi])


def required_base(length: int, head_dim: int, lo: float = 10.0, hi: float = 1e13) -> float:
    """The smallest base on the two-significant-digit grid whose supported length reaches
    ``length`` (bases are scanned upward; B is not monotone in the base)."""
    for b in base_grid(lo, hi):
        if supported_length(float(b), head_dim, cap=length) >= length:
            return float(b)
    raise ValueError(f"no base up to {hi:g} supports {length} tokens at head dim {head_dim}")


def report(config) -> dict:
    """The bound for a transformers config: per rotary base the model uses (global layers, and
    sliding-window layers when it has them), the supported length against the trained one."""
    from .models import head_dim as head_dim_of, rope_theta

    head_dim = head_dim_of(config)
    trained = getattr(config, "max_position_embeddings", None)
    out = {"head_dim": head_dim, "trained_context": trained}
    base = rope_theta(config)
    out["rope_theta"] = base
    out["supported_context"] = supported_length(base, head_dim)
    types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in types:
        local = rope_theta(config, "sliding_attention")
        out["rope_theta_sliding"] = local
        out["supported_context_sliding"] = supported_length(local, head_dim)
        out["sliding_window"] = getattr(config, "sliding_window", None)
    return out
