"""GPTQ (Frantar et al., 2023): quantize a weight column by column, spreading each column's
rounding error over the columns not yet quantized through the inverse Hessian of the layer's
inputs, H = 2/N X X^T (their Algorithm 1: lazy batches of 128 columns, Cholesky of H^-1)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..calibrate import LayerView, run_layerwise
from ..stages import register
from ..stats import HessianProcessor, head_importance
from .ggml import GGMLWeight, get_type, importance_weights
from .ggml.search import nearest
from .grid import QuantizedWeight, QuantSpec, codes, fake_quant, find_params
from .rtn import EMBED, QuantStage


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01, tries: int = 6, fresh=None) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H); the damping
    grows tenfold each time the factorisation fails. Every step runs in one d x d buffer (LAPACK
    factorises and inverts in place): a copy of H, or, with ``fresh`` (a function returning a new
    copy of H, for a retry), H itself, which then holds the result."""
    damp = percdamp * torch.mean(torch.diag(H))
    info = torch.empty((), dtype=torch.int32)
    for k in range(tries):
        A = H.clone() if fresh is None else (H if k == 0 else fresh())
        A.diagonal().add_(damp)
        torch.linalg.cholesky_ex(A, out=(A, info))
        if info == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            if info == 0:
                return A
        damp = damp * 10
    raise RuntimeError("Hessian is not positive definite even with heavy damping")


@torch.no_grad()
def gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
         act_order: bool = False, row_bits: torch.Tensor | None = None,
         keep: torch.Tensor | None = None, round_col=None) -> tuple[torch.Tensor, QuantizedWeight | None, float]:
    """Quantize ``W`` (d_out x d_in) given ``H`` (d_in x d_in).

    Returns the dequantized weight, its codes/scales/zeros, and GPTQ's own loss estimate
    sum((w - q)^2 / [H^-1]_jj) / 2. Groups are contiguous in the original column order; with
    ``act_order`` their scales are fixed up front from the original weights ("static groups"),
    so the stored format needs no permutation. ``row_bits`` gives rows their own bit width
    (several candidate widths of one matrix stacked; see ``gptq_widths``). ``keep`` is
    a pruning mask to preserve: pruned weights stay exactly zero and their error is spread
    like any rounding error. ``round_col(j, w)``, if given, is the grid: it rounds column j
    (original order) of values w to the grid fixed up front (a GGML type's blocks); the
    returned QuantizedWeight is then None.

    Longer than 60 lines on purpose: the lazy-batch column sweep (Frantar et al., 2023,
    Algorithm 1) with its grid bookkeeping reads best in one piece, next to the paper.
    """
    W = W.detach().clone().float()
    H0 = H.detach().float()  # the caller's, never written: working copies are made from it
    d_out, d_in = W.shape
    gl = spec.group_len(d_in)
    n_groups = spec.n_groups(d_in)
    if row_bits is None:
        bits = torch.full((d_out,), float(spec.bits), device=W.device)
    else:
        bits = row_bits.float().to(W.device)
    maxq = 2**bits - 1
    diag = torch.diag(H0).clone()
    dead = diag == 0
    diag[dead] = 1
    W[:, dead] = 0

    scales = torch.zeros(d_out, n_groups, device=W.device)
    zeros = torch.zeros(d_out, n_groups, device=W.device)
    have = torch.zeros(n_groups, dtype=torch.bool)
    if round_col is not None:
        have[:] = True
    elif act_order:  # static groups: every group's grid from the original weights
        hd = diag if spec.clip else None  # a clipping search weighs each input by its energy
        for g in range(n_groups):
            cols = slice(g * gl, (g + 1) * gl)
            scales[:, g], zeros[:, g] = find_params(W[:, cols], spec, weight=None if hd is None else hd[cols],
                                                    bits=bits)
        have[:] = True
    if act_order:
        perm = torch.argsort(diag, descending=True)
        W = W[:, perm]
    else:
        perm = torch.arange(d_in, device=W.device)

    def working_h() -> torch.Tensor:
        """H in the sweep's column order, dead inputs given a unit diagonal: one d x d copy."""
        Hw = H0[perm[:, None], perm[None, :]] if act_order else H0.clone()
        Hw.diagonal()[dead[perm]] = 1
        return Hw
    if keep is not None:
        keep = keep.to(W.device)[:, perm].float()

    U = damped_inverse_cholesky(working_h(), percdamp, fresh=working_h)
    Q = torch.zeros_like(W)
    loss = torch.zeros(d_out, device=W.device)
    col_of = perm.tolist()
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = col_of[i1 + i]
            g = col // gl
            if not have[g]:  # first column of a group: its grid from the updated weights
                block = W1[:, i : i + gl]
                if block.shape[1] < min(gl, d_in - col):
                    block = torch.cat([block, W[:, i2 : i2 + gl - block.shape[1]]], dim=1)
                scales[:, g], zeros[:, g] = find_params(block, spec, bits=bits)
                have[g] = True
            w = W1[:, i]
            d = U1[i, i]
            q = fake_quant(w, scales[:, g], zeros[:, g], maxq) if round_col is None else round_col(col, w)
            if keep is not None:
                q = q * keep[:, i1 + i]
            Q[:, i1 + i] = q
            err = (w - q) / d
            loss += (w - q) ** 2 / d**2 / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    del U, W, W1, Err1  # the largest buffers go before the codes are computed

    if act_order:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
    if round_col is not None:
        return Q, None, loss.sum().item()
    idx = torch.arange(d_in, device=Q.device) // gl
    q_codes = torch.empty(d_out, d_in, dtype=torch.uint8, device=Q.device)
    for r in range(0, d_out, 256):  # row blocks: the expanded scales never exist for the whole matrix
        rows = slice(r, r + 256)
        q_codes[rows] = codes(Q[rows], scales[rows][:, idx], zeros[rows][:, idx], maxq[rows, None])
    qw = QuantizedWeight(spec, q_codes.cpu(), scales.cpu(), zeros.to(torch.uint8).cpu())
    return Q, qw, loss.sum().item()


def gptq_ggml(W: torch.Tensor, H: torch.Tensor, type_name: str, blocksize: int = 128, percdamp: float = 0.01,
              act_order: bool = True, keep: torch.Tensor | None = None):
    """GPTQ onto a GGML block type. Each block's parameters (scale, min, sub-block scales) are
    fixed up front from the original weights by the importance-weighted search, the importance
    being diag(H) (each input's mean square); the column sweep then rounds every weight to the
    nearest level of its block's grid and spreads the error as usual.
    Returns (dequantized weight, GGMLWeight, GPTQ loss)."""
    t = get_type(type_name)
    d_out, d_in = W.shape
    if d_in % t.block:
        raise ValueError(f"{t.name} needs rows that are a multiple of {t.block} inputs, got {d_in}")
    Wf = W.detach().float().cpu()
    imp = importance_weights(Wf, torch.diag(H).cpu())
    nb = d_in // t.block
    x = Wf.reshape(-1, t.block)
    p = t.fit(x, imp.expand(d_out, d_in).reshape(-1, t.block))
    a, b = t.expand(p)
    a, b = a.reshape(d_out, d_in).to(W.device), b.reshape(d_out, d_in).to(W.device)
    safe_a = torch.where(a == 0, torch.ones_like(a), a)
    levels = t.levels.to(W.device)

    def round_col(j: int, w: torch.Tensor) -> torch.Tensor:
        return a[:, j] * levels[nearest((w - b[:, j]) / safe_a[:, j], levels)] + b[:, j]

    spec = QuantSpec(bits=8, group_size=-1)  # unused by the GGML path
    Q, _, loss = gptq(W, H, spec, blocksize, percdamp, act_order, keep=keep, round_col=round_col)
    q = t.encode(Q.cpu().reshape(-1, t.block), p)
    deq = t.decode(q, p).reshape(d_out, d_in)
    data = t.pack(q, p).reshape(d_out, nb * t.type_size)
    return deq, GGMLWeight(t.name, (d_out, d_in), data), loss


def gptq_widths(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, widths: list[int], **kw) -> dict[int, torch.Tensor]:
    """GPTQ of one matrix at several bit widths in a single pass: rows are independent given H,
    so the candidates are stacked row-wise. Returns {bits: dequantized weight}."""
    d_out = W.shape[0]
    stacked = W.detach().float().repeat(len(widths), 1)
    row_bits = torch.tensor(widths, dtype=torch.float32).repeat_interleave(d_out)
    Q, _, _ = gptq(stacked, H, spec, row_bits=row_bits, **kw)
    return {b: Q[k * d_out : (k + 1) * d_out] for k, b in enumerate(widths)}


class GPTQProcessor(HessianProcessor):
    """Quantizes each selected linear of a layer with GPTQ once the layer has been observed.
    ``spec_for(name)`` gives each linear its grid (mixed precision): a QuantSpec, or the name of
    a GGML type; ``curvature(name, layer)`` may replace the plain H (APTQ's attention-aware
    curvature for q/k/v). With ``head``, the output head's input importance is kept in ``head``."""

    def __init__(self, ctx, select, spec_for, act_order=True, blocksize=128, damp=0.01, curvature=None,
                 method="gptq", head: bool = False):
        super().__init__(select)
        self.ctx, self.spec_for, self.curvature = ctx, spec_for, curvature
        self.act_order, self.blocksize, self.damp, self.method = act_order, blocksize, damp, method
        self.losses: dict[str, float] = {}
        self._want_head, self.head = head, None

    def finish(self, adapter, hidden) -> None:
        if self._want_head:
            self.head = head_importance(adapter, hidden)

    def state(self) -> dict:
        return {"losses": self.losses}

    def restore(self, state: dict) -> None:
        self.losses = dict(state["losses"])

    def process(self, layer: LayerView) -> None:
        extra = self.curvature(layer) if self.curvature else {}
        left = self.users(n for n in layer.linears if self.wants(n) and n not in extra)
        for name, lin in layer.linears.items():
            if not self.wants(name):
                continue
            H = extra.get(name)
            if H is None:
                key = self._alias.get(name, name)
                left[key] -= 1
                H = self.hessian(name, last=left[key] == 0)
            spec = self.spec_for(name)
            if spec == "F16":  # a GGML type whose rows do not fit, even after llama.cpp's fallback
                continue
            if isinstance(spec, str):
                Q, gw, loss = gptq_ggml(lin.weight, H.to(self.ctx.device), spec, self.blocksize, self.damp,
                                        self.act_order, keep=self.ctx.masks.get(name))
                self.ctx.record_ggml(name, gw, method=self.method)
            else:
                Q, qw, loss = gptq(lin.weight, H.to(self.ctx.device), spec, self.blocksize, self.damp,
                                   self.act_order, keep=self.ctx.masks.get(name))
                self.ctx.record_quant(name, qw, method=self.method)
            lin.weight.data.copy_(Q.to(lin.weight.dtype))
            self.losses[name] = loss
        self.release_layer()


@register
class GPTQ(QuantStage):
    method: Literal["gptq"] = "gptq"
    act_order: bool = Field(True, description="quantize columns by descending diag(H), static groups")
    blocksize: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0, description="damping as a fraction of mean(diag H)")

    needs_calibration = True

    def stream_blocker(self) -> str | None:
        return None

    def memory_bytes(self, linears):
        """H (d_in x d_in, float32) of every linear (an upper bound: linears reading one input
        share it); for the largest, a scaled copy (when its H is shared; the last user takes the
        accumulator itself), the working copy and LAPACK's buffer, and three copies of the weight."""
        held = sum(4 * d_in * d_in for _, d_in in linears.values())
        d_max = max((d_in for _, d_in in linears.values()), default=0)
        w_max = max((d_out * d_in for d_out, d_in in linears.values()), default=0)
        return held, 3 * 4 * d_max * d_max + 3 * 4 * w_max

    def run(self, ctx) -> dict:
        spec = self.spec()
        if self.format is not None:
            def spec_for(name):
                return self.ggml_type(name, ctx.module(name).weight.shape[1])
        else:
            def spec_for(name):
                return spec
        proc = GPTQProcessor(ctx, self.selects, spec_for, self.act_order, self.blocksize, self.damp,
                             head=self.embed is not None)
        run_layerwise(ctx.model, ctx.windows(), proc, offload=ctx.calibration.offload, description="gptq",
                      stream=ctx.stream)
        rep = {"linears": len(proc.losses), "gptq_loss": round(sum(proc.losses.values()), 4)}
        if self.format is not None:
            if self.embed:
                self.quantize_ggml(ctx, EMBED, proc.head)
            return {**rep, "types": self.type_report(ctx)}
        return {**rep, "grid": spec.label()}
