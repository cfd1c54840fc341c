"""SparseGPT (Frantar & Alistarh, 2023): GPTQ's machinery for pruning. Columns are processed in
blocks of 128; each block's mask drops the weights of lowest w^2 / [U]_jj^2 (U the upper
Cholesky factor of H^-1), every pruned weight's error is spread over the columns not yet
processed, as GPTQ does with rounding errors. N:M patterns choose the mask every M columns."""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from ..calibrate import run_layerwise
from ..quant.gptq import damped_inverse_cholesky
from ..stages import register
from ..stats import HessianProcessor
from .masks import PruneLayer, PruneStage, Target, check_nm


@torch.no_grad()
def sparsegpt(W: torch.Tensor, H: torch.Tensor, target: Target | None, blocksize: int = 128, percdamp: float = 0.01,
              name: str = "weight", keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` (d_out x d_in) given ``H``; returns (updated weight, keep-mask). Unstructured
    targets remove exactly round(s * numel) weights in total (block quotas add up to it).
    With ``keep`` (a given mask, ``target`` unused) only the weights are solved: the same
    column sweep spreads each pruned weight's error over the kept weights after it."""
    if keep is not None:
        return _sweep(W, H, blocksize, percdamp, fixed=keep)
    return _sweep(W, H, blocksize, percdamp, target=target, name=name)


def _sweep(W, H, blocksize, percdamp, target=None, name="weight", fixed=None):
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    d_out, d_in = W.shape
    if target is not None and target.nm is not None:
        n_keep, m = target.nm
        check_nm(name, d_in, m)
        blocksize = max(m, blocksize // m * m)  # N:M groups never straddle a block
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    U = damped_inverse_cholesky(H, percdamp)
    keep = torch.ones(d_out, d_in, dtype=torch.bool, device=W.device)
    pruned = 0
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        drop = torch.zeros_like(W1, dtype=torch.bool)
        if fixed is not None:
            drop = ~fixed[:, i1:i2].to(W.device)
        elif target.nm is None:
            quota = round(target.sparsity * d_out * i2) - pruned
            if quota > 0:
                score = (W1.pow(2) / d[None, :].pow(2)).reshape(-1)
                drop.view(-1)[score.topk(quota, largest=False).indices] = True
            pruned += max(quota, 0)
        for i in range(i2 - i1):
            if fixed is None and target.nm is not None and i % m == 0:
                score = W1[:, i : i + m].pow(2) / d[None, i : i + m].pow(2)
                drop[:, i : i + m].scatter_(1, score.topk(m - n_keep, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = torch.where(drop[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        keep[:, i1:i2] = ~drop
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W * keep, keep


class SparseGPTProcessor(PruneLayer, HessianProcessor):
    def __init__(self, ctx, stage: "SparseGPT"):
        HessianProcessor.__init__(self, stage.selects)
        PruneLayer.__init__(self, ctx, stage)

    def choose(self, name, weight):
        s = self.stage
        W, keep = sparsegpt(weight, self.hessian(name), s.target_for(name), s.blocksize, s.damp, name)
        return keep, W


@register
class SparseGPT(PruneStage):
    method: Literal["sparsegpt"] = "sparsegpt"
    blocksize: int = Field(128, ge=1, description="columns whose mask is chosen together")
    damp: float = Field(0.01, gt=0, description="damping as a fraction of mean(diag H)")
    barber_defaults: ClassVar[tuple[float, str]] = (0.1, "layer")
    barber_resolves: ClassVar[bool] = True

    needs_calibration = True

    def run(self, ctx) -> dict:
        proc = SparseGPTProcessor(ctx, self)
        run_layerwise(ctx.model, ctx.windows(), proc, offload=ctx.calibration.offload, description="sparsegpt")
        return self.report(ctx, proc.names)
