"""What this machine computes fast: whether bfloat16 matrix products are worth using.

bfloat16 halves activation memory and, on CPUs with bfloat16 units (AVX512-BF16, AMX, Arm
BF16), runs matrix products 2-3x faster than float32. On CPUs without them (most AVX2 laptops
and many AMD servers) PyTorch falls back to a generic kernel that is tens of times slower than
float32. ``compute_dtype("auto")`` measures both once per process on a small product and picks
bfloat16 only where it is at most ``TOLERANCE`` times slower (it still halves the memory).
"""
from __future__ import annotations

import functools
import time

import torch

#: bfloat16 is chosen when its product takes at most this times float32's
TOLERANCE = 1.25


def _seconds(dtype: torch.dtype, n: int = 256, reps: int = 3) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: the first call picks the kernel
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return (time.perf_counter() - t0) / reps


@functools.cache
def bfloat16_is_fast(device: str = "cpu") -> bool:
    """True when bfloat16 matrix products on ``device`` are about as fast as float32 or faster."""
    if device != "cpu":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return _seconds(torch.bfloat16) <= TOLERANCE * _seconds(torch.float32)


def compute_dtype(name: str, device: str = "cpu") -> torch.dtype | None:
    """The autocast dtype for ``name`` (``auto``, ``bfloat16`` or ``float32``); None means
    float32, no autocast."""
    if name == "auto":
        name = "bfloat16" if bfloat16_is_fast(device) else "float32"
    return torch.bfloat16 if name == "bfloat16" else None
