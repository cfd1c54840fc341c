"""LLM-Barber (Su, Guan et al., 2024): rebuild the mask of an already-pruned model, block by
block, without retraining.

For each decoder layer, attention block first, then the MLP block: the block's input goes to the
sparse block and to a dense copy (the weights before pruning); the gradient G of
MSE(dense output, sparse output) with respect to the dense weights gives the score
S = |W| * sqrt(mean over windows of G^2), |W| the dense value of a pruned weight and the current
value of a kept one. Among pruned weights sorted by S descending and kept weights sorted
ascending, r pairs have the pruned weight scoring higher; the top floor(alpha*r) pairs swap
(the regrown weight gets its dense value, the dropped one becomes zero), so the number of kept
weights never changes. Rankings run over the whole block, each linear, or each
output row; with an N:M mask, swaps stay inside one M-group so the pattern holds.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat
from torch.func import functional_call

from ..calibrate import LayerProcessor, LayerView, run_layerwise
from ..errors import PocketError
from ..models import ModelAdapter
from ..stages import REGISTRY, Stage, register
from ..stats import HessianProcessor
from .judge import ModelJudge



def swap_count(pruned: torch.Tensor, kept: torch.Tensor, alpha: float) -> int:
    """floor(alpha * r), r = pairs (i-th best pruned vs i-th worst kept) where pruned wins."""
    n = min(pruned.numel(), kept.numel())
    if n == 0:
        return 0
    p = pruned.sort(descending=True).values[:n]
    k = kept.sort().values[:n]
    return math.floor(alpha * int((p > k).sum()))


def rebuild_flat(score: torch.Tensor, keep: torch.Tensor, alpha: float) -> torch.Tensor:
    """One ranking over all entries: the new keep-mask."""
    s, m = score.reshape(-1), keep.reshape(-1)
    p_idx, k_idx = (~m).nonzero().squeeze(1), m.nonzero().squeeze(1)
    n = swap_count(s[p_idx], s[k_idx], alpha)
    new = m.clone()
    if n:
        new[p_idx[s[p_idx].topk(n).indices]] = True
        new[k_idx[s[k_idx].topk(n, largest=False).indices]] = False
    return new.reshape(keep.shape)


def rebuild_rows(score: torch.Tensor, keep: torch.Tensor, alpha: float) -> torch.Tensor:
    """A ranking per output row."""
    inf = torch.tensor(float("inf"))
    p_sorted, p_idx = torch.where(keep, -inf, score).sort(dim=1, descending=True)
    k_sorted, k_idx = torch.where(keep, score, inf).sort(dim=1)
    wins = (p_sorted > k_sorted) & torch.isfinite(p_sorted) & torch.isfinite(k_sorted)
    n = torch.floor(alpha * wins.sum(1).float()).long()
    take = torch.arange(keep.shape[1])[None, :] < n[:, None]
    new = keep.clone()
    new.scatter_(1, p_idx, torch.where(take, True, new.gather(1, p_idx)))
    new.scatter_(1, k_idx, torch.where(take, False, new.gather(1, k_idx)))
    return new


def rebuild_nm(score: torch.Tensor, keep: torch.Tensor, alpha: float, m: int) -> torch.Tensor:
    """A ranking per output row over its M-groups: each group offers its best pruned weight
    against its worst kept weight; a swap stays inside its group, so N:M still holds."""
    d_out, d_in = keep.shape
    s, k = score.reshape(d_out, d_in // m, m), keep.reshape(d_out, d_in // m, m)
    inf = torch.tensor(float("inf"))
    p_best, p_at = torch.where(k, -inf, s).max(dim=-1)
    k_worst, k_at = torch.where(k, s, inf).min(dim=-1)
    wins = p_best > k_worst  # groups where a swap would help (both sides present)
    n = torch.floor(alpha * wins.sum(1).float()).long()
    rank = torch.where(wins, p_best, -inf).argsort(dim=1, descending=True).argsort(dim=1)
    do = wins & (rank < n[:, None])
    new = k.clone()
    new.scatter_(2, p_at[..., None], torch.where(do[..., None], True, new.gather(2, p_at[..., None])))
    new.scatter_(2, k_at[..., None], torch.where(do[..., None], False, new.gather(2, k_at[..., None])))
    return new.reshape(d_out, d_in)


def nm_of(keep: torch.Tensor, m_candidates=(4, 8, 16)) -> int | None:
    """The M of an N:M mask (every M-group keeps the same count), or None."""
    for m in m_candidates:
        if keep.shape[1] % m == 0:
            c = keep.reshape(keep.shape[0], -1, m).sum(-1)
            if bool((c == c.flatten()[0]).all()) and 0 < int(c.flatten()[0]) < m:
                return m
    return None


class BarberProcessor(LayerProcessor):
    """Rebuilds the masks of each layer's blocks from the layer's (sequential) inputs.

    Safeguards (not in the paper): the swap is tried at alpha times each of ``scales`` and the
    block keeps the one with the lowest output MSE on ``held_out`` calibration windows (windows
    the gradient never saw; without any, on the gradient's own windows), if that is below its
    mask's; otherwise it keeps its mask. With a ``judge`` (``ModelJudge`` on the held-out
    windows), that swap must also lower the model's output KL from the dense model, measured
    through the rest of the model, by more than the judge's noise margin, or the block keeps
    its mask."""

    def __init__(self, ctx, alpha: float, granularity: str, windows: int, scales=(1.0,), held_out: int = 0,
                 resolve: bool = False, damp: float = 0.01, judge: ModelJudge | None = None):
        self.ctx, self.alpha, self.granularity, self.windows, self.scales = ctx, alpha, granularity, windows, scales
        self.held_out, self.resolve, self.damp, self.judge = held_out, resolve, damp, judge
        self.adapter = ModelAdapter(ctx.model)
        self.swapped: dict[str, int] = {}
        self.mse: dict[str, tuple[float, float]] = {}  # block -> (before, after) on calibration inputs
        self.kl: list[float] = []  # the judge's model KL: at the start, then after each accepted block
        self.current = None  # the judge's per-chunk KL of the model as it stands
        self.alphas: list[float] = []  # the alpha each rebuilt block kept
        self.rejected = 0  # blocks whose MSE-passing swaps the judge turned down

    def process(self, layer: LayerView) -> None:
        n_grad = min(self.windows, len(layer.inputs))
        n_all = min(n_grad + self.held_out, len(layer.inputs))
        x_in = [layer.inputs[i] for i in range(n_all)]
        judged = x_in[n_grad:] if n_all > n_grad else x_in[:n_grad]  # the judge's windows, as it was built
        confirm = None
        if self.judge is not None:
            confirm = lambda: self._confirm(layer, judged)  # noqa: E731
            if self.current is None:
                self.current = self.judge.kl(layer.index, judged, layer.all_kwargs)
                self.kl.append(self.judge.mean(self.current))
        for kind, norm, block, post in self.adapter.blocks(layer.module):
            prefix = _name_of(layer, block)
            local = {n: m for n, m in block.named_modules() if f"{prefix}.{n}" in self.ctx.masks}
            if not local and kind == "mlp":
                continue
            with torch.no_grad():
                feats = [norm(x.to(layer.device)) for x in x_in]
            if local:
                self._rebuild(block, local, prefix, feats[:n_grad], feats[n_grad:], layer.kwargs, kind, confirm)
            if kind == "attention":  # the MLP block sees the (rebuilt) attention's output
                with torch.no_grad():
                    x_in = [x.to(layer.device) + post(_call(block, f, layer.kwargs, kind)) for x, f in zip(x_in, feats)]

    def _confirm(self, layer: LayerView, inputs: list[torch.Tensor]) -> bool:
        """Does the layer's current state lower the model's KL from the dense model, beyond the
        judge's margin? (``process`` measured the starting KL before the first swap.)"""
        kl = self.judge.kl(layer.index, inputs, layer.all_kwargs)
        if self.judge.better(kl, self.current):
            self.current = kl
            self.kl.append(self.judge.mean(kl))
            return True
        self.rejected += 1
        return False

    def _rebuild(self, block, local, prefix, feats, held, kwargs, kind, confirm=None) -> None:
        full = {n: f"{prefix}.{n}" for n in local}
        dense = {f"{n}.weight": self.ctx.dense[full[n]].detach().to(m.weight).requires_grad_(True)
                 for n, m in local.items()}
        g2 = {n: torch.zeros_like(dense[f"{n}.weight"]) for n in local}
        targets, before = [], 0.0
        hessians = _HessianHooks(local) if self.resolve else None
        for f in feats:  # gradient of MSE(dense, sparse) at the dense weights, and the dense outputs
            with torch.no_grad():
                sparse = _call(block, f, kwargs, kind)
                if hessians is not None:
                    hessians.capture = False
            with torch.enable_grad():
                out = _call(block, f, kwargs, kind, params=dense)
                loss = F.mse_loss(out.float(), sparse.float())
                grads = torch.autograd.grad(loss, list(dense.values()))
            targets.append(out.detach())
            before += float(loss.detach()) / len(feats)  # the sparse block's MSE, before any swap
            for n, g in zip(local, grads):
                g2[n] += g.float().pow(2)
            if hessians is not None:
                hessians.capture = True
        if hessians is not None:
            hessians.remove()
        if held:  # judge swaps on windows the gradient never saw
            with torch.no_grad():
                frozen = {k: v.detach() for k, v in dense.items()}
                targets = [_call(block, f, kwargs, kind, params=frozen) for f in held]
            before = _block_mse(block, held, targets, kwargs, kind)
        else:
            held = feats
        old_w = {n: m.weight.detach().clone() for n, m in local.items()}
        old_k = {n: self.ctx.masks[full[n]] for n in local}
        # |W|: a pruned weight would come back with its dense value, a kept one would lose its
        # current value (which a pruner like SparseGPT has updated)
        scores = {n: torch.where(old_k[n], old_w[n].cpu(), self.ctx.dense[full[n]]).float().abs()
                  * (g2[n].cpu() / len(feats)).sqrt() for n in local}
        best, new, new_w, alpha = before, None, None, None
        for scale in self.scales:  # each candidate starts from the pruner's mask
            cand = self._new_masks(scores, old_k, min(1.0, self.alpha * scale))
            self._apply(local, full, old_w, old_k, cand, hessians)
            mse = _block_mse(block, held, targets, kwargs, kind)
            if mse < best:  # keep its weights: no second solve when it wins
                best, new, alpha = mse, cand, min(1.0, self.alpha * scale)
                new_w = {n: m.weight.detach().clone() for n, m in local.items()}
        if new is not None:
            _set(local, full, self.ctx.masks, new_w, new)
            if confirm is not None and not confirm():
                new = None
        if new is None:
            new, best = old_k, before
            _set(local, full, self.ctx.masks, old_w, old_k)
        else:
            self.alphas.append(alpha)
        self.mse[prefix] = (before, best)
        for n in local:
            self.swapped[full[n]] = int((new[n] & ~old_k[n]).sum())

    def _new_masks(self, scores, keeps, alpha) -> dict[str, torch.Tensor]:
        if self.granularity == "block":
            names = list(keeps)
            flat = rebuild_flat(torch.cat([scores[n].reshape(-1) for n in names]),
                                torch.cat([keeps[n].reshape(-1) for n in names]), alpha)
            new, at = {}, 0
            for n in names:
                new[n] = flat[at : at + keeps[n].numel()].reshape(keeps[n].shape)
                at += keeps[n].numel()
            return new
        new = {}
        for n, keep in keeps.items():
            m = nm_of(keep)
            if m is not None:
                new[n] = rebuild_nm(scores[n], keep, alpha, m)
            elif self.granularity == "row":
                new[n] = rebuild_rows(scores[n], keep, alpha)
            else:
                new[n] = rebuild_flat(scores[n], keep, alpha)
        return new

    def _apply(self, local, full, old_w, old_k, new, hessians=None) -> None:
        """Kept weights keep their current values, regrown ones get their dense values; with
        ``hessians`` (a pruner that reconstructs, SparseGPT) the rows whose mask changed are
        solved again from the dense weights, as SparseGPT solves them for its own mask."""
        from .sparsegpt import sparsegpt

        for n, lin in local.items():
            w = lin.weight
            nk = new[n].to(w.device)
            with torch.no_grad():
                if hessians is not None and not torch.equal(new[n], old_k[n]):
                    # each row's solve depends only on its own mask: only the rows with a swap are solved
                    rows = (nk != old_k[n].to(w.device)).any(dim=1)
                    solved, _ = sparsegpt(self.ctx.dense[full[n]].to(w)[rows], hessians.hessian(n), None,
                                          percdamp=self.damp, keep=nk[rows])
                    w.copy_(old_w[n])
                    w[rows] = solved.to(w)
                elif hessians is not None:
                    w.copy_(old_w[n])
                else:
                    stay = nk & old_k[n].to(w.device)
                    w.copy_(torch.where(stay, old_w[n],
                                        torch.where(nk, self.ctx.dense[full[n]].to(w), torch.zeros_like(w))))
            self.ctx.masks[full[n]] = new[n]


def _set(local, full, masks, weights, keeps) -> None:
    """Put back a state of the block's linears: their weights and masks."""
    with torch.no_grad():
        for n, lin in local.items():
            lin.weight.copy_(weights[n])
            masks[full[n]] = keeps[n]


class _HessianHooks:
    """H = 2/N X X^T of each linear's input over the block's sparse forwards (the engine's
    accumulator, fed by hooks on the block's own linears)."""

    def __init__(self, local: dict):
        self.acc, self.capture = HessianProcessor(lambda name: True), True
        self.handles = [lin.register_forward_pre_hook(self._hook(n)) for n, lin in local.items()]

    def _hook(self, name):
        def hook(_mod, args):
            if self.capture:
                self.acc.observe(name, args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    def hessian(self, name: str) -> torch.Tensor:
        return self.acc.hessian(name)

    def remove(self):
        for h in self.handles:
            h.remove()


def _block_mse(block, feats, targets, kwargs, kind) -> float:
    with torch.no_grad():
        return sum(float(F.mse_loss(_call(block, f, kwargs, kind).float(), t.float()))
                   for f, t in zip(feats, targets)) / len(feats)


def _call(block, x, kwargs, kind, params=None):
    args = (x,) if kind == "mlp" else ()
    kw = {} if kind == "mlp" else {"hidden_states": x, **kwargs}
    out = functional_call(block, params, args, kw, strict=False) if params else block(*args, **kw)
    return out[0] if isinstance(out, tuple) else out


def _name_of(layer: LayerView, block) -> str:
    for n, m in layer.module.named_modules():
        if m is block:
            return f"{layer.prefix}.{n}"
    raise RuntimeError("block not found in its layer")


@register
class Barber(Stage):
    method: Literal["barber"] = "barber"
    alpha: float | None = Field(None, gt=0, le=1, description="fraction of winning pairs swapped (default by pruner)")
    granularity: Literal["block", "layer", "row"] | None = Field(
        None, description="ranking over the block, each linear, or each output row (default by pruner; "
                          "N:M masks always swap within groups)")
    windows: int | None = Field(None, ge=1, description="calibration windows for the gradient (default: all but "
                                                        "the held-out ones)")
    scales: list[PositiveFloat] = Field([4.0, 2.0, 1.0, 0.5, 0.25], min_length=1, description=(
        "alpha times each of these is tried; a block keeps the swap with the lowest output MSE on the held-out "
        "windows, if below its mask's ([1.0]: alpha alone, as the paper)"))
    resolve: bool | None = Field(None, description="solve a changed mask's weights again (SparseGPT's column sweep "
                                                   "from the dense weights); default: when SparseGPT pruned")
    damp: float = Field(0.01, gt=0, description="damping of that solve, as a fraction of mean(diag H)")
    held_out: int = Field(2, ge=0, description="calibration windows after the gradient's, held out to accept or "
                                               "reject each block's swaps (0: judge on the gradient's windows)")
    judge: Literal["block", "model"] = Field(
        "model", description="what a block's swaps must lower on those windows: the block's output MSE only, or "
                             "also the model's output KL from the dense model (one pass through the rest of the "
                             "model per block)")
    margin: float = Field(2.0, ge=0, description="model judge: the KL must fall by at least this many standard "
                                                 "errors of its paired per-chunk change (0: any decrease)")

    needs_calibration = True
    needs_dense_weights: ClassVar[bool] = True

    def run(self, ctx) -> dict:
        if not ctx.masks:
            raise PocketError("barber rebuilds a pruning mask: put a pruning stage (wanda, sparsegpt, "
                              "magnitude) before it in the recipe")
        if not ctx.dense:
            raise PocketError("barber needs the dense weights of the pruned model; run the pruner in the same recipe")
        pruner = REGISTRY.get(ctx.pruned_by)  # its defaults for alpha and granularity live on it
        alpha, gran = getattr(pruner, "barber_defaults", (0.1, "layer"))
        alpha = self.alpha if self.alpha is not None else alpha
        gran = self.granularity or gran
        windows = ctx.windows()
        held = min(self.held_out, windows.shape[0] - 1)
        n_grad = min(self.windows or windows.shape[0] - held, windows.shape[0] - held)
        resolve = self.resolve if self.resolve is not None else getattr(pruner, "barber_resolves", False)
        judge = None
        if self.judge == "model":
            ids = windows[n_grad : n_grad + held] if held else windows[:n_grad]
            judge = ModelJudge(ctx.model, ids, {n: ctx.dense[n] for n in ctx.masks}, margin=self.margin)
        proc = BarberProcessor(ctx, alpha, gran, n_grad, tuple(self.scales), held, resolve, self.damp, judge)
        run_layerwise(ctx.model, windows, proc, offload=ctx.calibration.offload, description="barber")
        before = sum(b for b, _ in proc.mse.values())
        after = sum(a for _, a in proc.mse.values())
        model = {} if judge is None else {"model_kl_before": proc.kl[0], "model_kl_after": proc.kl[-1],
                                          "blocks_rejected_by_model": proc.rejected, "margin": self.margin}
        return {**model, "judge": self.judge, "alpha": alpha, "scales": list(self.scales),
                "alphas_kept": {str(a): proc.alphas.count(a) for a in sorted(set(proc.alphas))}, "granularity": gran,
                "swapped": sum(proc.swapped.values()), "gradient_windows": n_grad,
                "held_out_windows": held, "blocks_rebuilt": sum(a < b for b, a in proc.mse.values()),
                "blocks": len(proc.mse), "resolve": resolve,
                "block_mse_before": before, "block_mse_after": after}
