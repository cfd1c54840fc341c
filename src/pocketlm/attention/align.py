"""The math of merging KV heads, on Gram matrices of the heads' outputs (pure functions).

A layer's key (or value) outputs over calibration tokens enter only through their Gram matrix
C = W H W^T, with H the Gram matrix of the layer's normed inputs: C[h, g] is the d x d block
between heads h and g. Merging a group of heads into one (GQA conversion, Ainslie et al., 2023)
replaces each head's output by the group's mean; aligning the heads first (Jin, Song et al.,
2025) rotates each head by an orthogonal Q_h, folded exactly into the weights, so that the
heads agree before they are averaged:

- values: generalised Procrustes, Q_h = U V^T from the SVD of V_h^T M with M = mean_g V_g Q_g,
  iterated; V_h^T M = mean_g C[h, g] Q_g needs only the Gram blocks. Folded as W_V,h <- Q_h^T
  W_V,h and W_O,h <- W_O,h Q_h (every query head reading kv head h).
- keys: only rotations that commute with RoPE: one 2 x 2 rotation (det +1) per frequency pair
  (dimensions i and i + d/2, the rotate-half layout), the same generalised Procrustes per
  pair; folded into W_K,h and into W_Q of every query head reading h, so scores are unchanged.
"""
from __future__ import annotations

import torch


def blocks(C: torch.Tensor, heads: list[int], d: int) -> torch.Tensor:
    """The (n, n, d, d) Gram blocks between the given heads."""
    idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
    sub = C[idx][:, idx]
    n = len(heads)
    return sub.reshape(n, d, n, d).permute(0, 2, 1, 3)


def procrustes_values(B: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Orthogonal Q_h (n, d, d) that make the heads' outputs agree (generalised Procrustes on
    the Gram blocks B (n, n, d, d)); the first head's frame is kept (Q_0 = I)."""
    n, _, d, _ = B.shape
    Q = torch.eye(d, dtype=B.dtype).repeat(n, 1, 1)
    for _ in range(iters):
        for h in range(1, n):
            S = sum(B[h, g] @ Q[g] for g in range(n)) / n
            U, _, Vt = torch.linalg.svd(S)
            Q[h] = U @ Vt
    return Q


def pair_index(d: int) -> torch.Tensor:
    """(d/2, 2): the dimensions each RoPE rotation acts on (i, i + d/2), rotate-half layout."""
    i = torch.arange(d // 2)
    return torch.stack([i, i + d // 2], 1)


def procrustes_keys(B: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Block-diagonal rotations R_h (n, d, d), one 2 x 2 rotation of det +1 per RoPE pair, that
    make the heads' keys agree; R_0 = I."""
    n, _, d, _ = B.shape
    pairs = pair_index(d)
    R = torch.eye(d, dtype=B.dtype).repeat(n, 1, 1)
    for p in pairs:
        sub = B[:, :, p][:, :, :, p]  # (n, n, 2, 2)
        r = torch.eye(2, dtype=B.dtype).repeat(n, 1, 1)
        for _ in range(iters):
            for h in range(1, n):
                S = sum(sub[h, g] @ r[g] for g in range(n)) / n
                U, _, Vt = torch.linalg.svd(S)
                fix = torch.diag(torch.tensor([1.0, torch.linalg.det(U @ Vt).sign().item()], dtype=B.dtype))
                r[h] = U @ fix @ Vt
        for h in range(n):
            R[h][p[:, None], p[None, :]] = r[h]
    return R


def merge_error(B: torch.Tensor, Q: torch.Tensor) -> float:
    """Mean over the group of E||Q_h^T y_h - mean_g Q_g^T y_g||^2 relative to mean E||y_h||^2:
    what replacing each head's (rotated) output by the group mean loses."""
    n = B.shape[0]
    err = 0.0
    for h in range(n):
        A = [(-1.0 / n) * Q[g].T for g in range(n)]
        A[h] = A[h] + Q[h].T
        err += sum(torch.trace(A[g] @ B[g, k] @ A[k].T).item() for g in range(n) for k in range(n))
    energy = sum(torch.trace(B[h, h]).item() for h in range(n))
    return err / max(energy, 1e-30)


def similarity(C: torch.Tensor, n_heads: int, d: int) -> torch.Tensor:
    """(n, n) similarity of heads' outputs up to an orthogonal alignment: the nuclear norm of the
    cross-Gram block over the geometric mean of the heads' energies (1 = identical up to a rotation)."""
    B = blocks(C, list(range(n_heads)), d)
    energy = torch.stack([torch.trace(B[h, h]) for h in range(n_heads)])
    nuc = torch.stack([torch.stack([torch.linalg.matrix_norm(B[h, g], "nuc") for g in range(n_heads)])
                       for h in range(n_heads)])
    return nuc / (energy[:, None] * energy[None, :]).sqrt().clamp_min(1e-30)


def group_heads(sim: torch.Tensor, size: int) -> list[list[int]]:
    """Groups of ``size`` heads, greedily: the unassigned head most similar to the others seeds
    a group, which takes the unassigned heads most similar to it."""
    left = list(range(sim.shape[0]))
    groups = []
    while left:
        sub = sim[left][:, left]
        seed = left[int(sub.sum(1).argmax())]
        rest = sorted((h for h in left if h != seed), key=lambda h: -float(sim[seed, h]))
        group = sorted([seed, *rest[: size - 1]])
        groups.append(group)
        left = [h for h in left if h not in group]
    return groups
