"""Fewer KV heads: merge groups of a layer's key/value heads into one (MHA/GQA -> GQA with fewer
KV heads), by plain mean pooling (Ainslie et al., 2023) or after aligning the heads with
rotations folded into the weights (Jin, Song et al., 2025; math in ``align``). The KV cache
shrinks by the same factor; the model stays a plain transformers model with a smaller
``num_key_value_heads``, which the GGUF export writes and llama.cpp runs.

Layer by layer on calibration text: each layer's statistics come from the inputs the already
merged layers produce."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from .. import kv
from ..calibrate import run_layerwise
from ..errors import PocketError
from ..models import head_dim
from ..stages import Stage, register
from ..stats import HessianProcessor
from . import align


def _heads(lin: torch.nn.Linear, d: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(heads, d, d_in) weight and (heads, d) bias of a projection."""
    w = lin.weight.data.reshape(-1, d, lin.weight.shape[1])
    b = None if lin.bias is None else lin.bias.data.reshape(-1, d)
    return w, b


def _new_linear(w: torch.Tensor, b: torch.Tensor | None, like: torch.nn.Linear) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=like.weight.dtype,
                          device=like.weight.device)
    lin.weight.data.copy_(w)
    if b is not None:
        lin.bias.data.copy_(b)
    return lin


class _Merger(HessianProcessor):
    def __init__(self, stage: "KVHeads", config):
        self.stage, self.config = stage, config
        self.report = {"groups": [], "key_error": {"mean": [], "aligned": []},
                       "value_error": {"mean": [], "aligned": []}}
        super().__init__(lambda name: name.endswith("self_attn.k_proj"))

    def process(self, layer) -> None:
        attn = layer.module.self_attn
        name = next(n for n in layer.linears if n.endswith("self_attn.k_proj"))
        H = self.hessian(name).double()
        self.report["groups"].append(self.stage.merge_layer(attn, self.config, H, self.report))


@register
class KVHeads(Stage):
    """Merge each layer's KV heads into ``kv_heads`` (or as many as ``kv_bytes_per_token``
    allows in a float16 cache)."""

    method: Literal["kv-heads"] = "kv-heads"
    kv_heads: int | None = Field(None, ge=1, description="KV heads per layer after merging")
    kv_bytes_per_token: int | None = Field(None, ge=1, description="instead: the float16 KV cache bytes per token "
                                                                    "(all layers) to fit")
    merge: Literal["mean", "aligned"] = Field("aligned", description="mean pooling, or align the heads first "
                                                                     "(rotations folded into the weights)")
    grouping: Literal["adjacent", "similarity"] = Field("adjacent", description="which heads merge: neighbours, or "
                                                                                "the most similar on calibration text")
    iters: int = Field(20, ge=1, le=1000, description="generalised Procrustes iterations")

    needs_calibration = True

    @model_validator(mode="after")
    def _one(self):
        if (self.kv_heads is None) == (self.kv_bytes_per_token is None):
            raise ValueError("give exactly one of kv_heads or kv_bytes_per_token")
        return self

    def target(self, config) -> int:
        """KV heads per layer after merging, checked against the model's heads."""
        nq, nkv = config.num_attention_heads, config.num_key_value_heads
        want = self.kv_heads
        if want is None:
            per_head = kv.cache_bytes(config, 1) // nkv  # float16 keys and values of one head in every layer
            fits = [n for n in range(nkv, 0, -1) if nkv % n == 0 and n * per_head <= self.kv_bytes_per_token]
            if not fits:
                raise PocketError(f"kv_bytes_per_token {self.kv_bytes_per_token} is below one KV head per layer "
                                  f"({per_head} bytes per token); ask for at least that")
            want = fits[0]
        if want >= nkv or nkv % want or nq % want:
            raise PocketError(f"kv_heads {want}: the model has {nkv} KV heads and {nq} query heads; give a smaller "
                              f"number that divides both (e.g. {max(n for n in range(1, nkv) if nkv % n == 0)})")
        return want

    def run(self, ctx) -> dict:
        config = ctx.model.config
        if getattr(config, "model_type", None) in ("qwen3", "gemma3_text") and self.merge == "aligned":
            note = "keys merged by mean: per-dimension q/k norms before RoPE do not commute with rotations"
        else:
            note = None
        self._target = self.target(config)
        self._keys_aligned = note is None and self.merge == "aligned"
        before = config.num_key_value_heads
        proc = _Merger(self, config)
        run_layerwise(ctx.model, ctx.windows(), proc, offload=ctx.calibration.offload, description="kv-heads")
        config.num_key_value_heads = self._target
        rep = {"kv_heads": [before, self._target], "kv_bytes_per_token": kv.cache_bytes(config, 1),
               "merge": self.merge, "grouping": self.grouping,
               "key_error": {k: _mean(v) for k, v in proc.report["key_error"].items()},
               "value_error": {k: _mean(v) for k, v in proc.report["value_error"].items()},
               "groups": proc.report["groups"]}
        if note:
            rep["note"] = note
        return rep

    def merge_layer(self, attn, config, H: torch.Tensor, report: dict) -> list[list[int]]:
        """Merge one attention module's KV heads in place; returns the groups (old head indices)."""
        nq, nkv, d = config.num_attention_heads, config.num_key_value_heads, head_dim(config)
        n_new, r = self._target, nq // nkv
        wk, bk = _heads(attn.k_proj, d)
        wv, bv = _heads(attn.v_proj, d)
        wq, bq = _heads(attn.q_proj, d)
        wo = attn.o_proj.weight.data.reshape(attn.o_proj.weight.shape[0], nq, d)  # (hidden, nq, d)
        Ck = (wk.reshape(nkv * d, -1).double() @ H @ wk.reshape(nkv * d, -1).double().T)
        Cv = (wv.reshape(nkv * d, -1).double() @ H @ wv.reshape(nkv * d, -1).double().T)
        size = nkv // n_new
        if self.grouping == "similarity":
            groups = align.group_heads(align.similarity(Cv, nkv, d) + align.similarity(Ck, nkv, d), size)
        else:
            groups = [list(range(j * size, (j + 1) * size)) for j in range(n_new)]
        new_k, new_v, new_bk, new_bv = [], [], [], []
        order = []  # query heads in their new order: each new KV head's query heads together
        wq, wo = wq.clone(), wo.clone()
        bq = None if bq is None else bq.clone()
        for group in groups:
            Bk, Bv = align.blocks(Ck, group, d), align.blocks(Cv, group, d)
            eye = torch.eye(d, dtype=torch.float64).repeat(len(group), 1, 1)
            Rk = align.procrustes_keys(Bk, self.iters) if self._keys_aligned else eye
            Qv = align.procrustes_values(Bv, self.iters) if self.merge == "aligned" else eye
            report["key_error"]["mean"].append(align.merge_error(Bk, eye))
            report["value_error"]["mean"].append(align.merge_error(Bv, eye))
            report["key_error"]["aligned"].append(align.merge_error(Bk, Rk))
            report["value_error"]["aligned"].append(align.merge_error(Bv, Qv))
            ks, vs, bks, bvs = [], [], [], []
            for i, h in enumerate(group):
                R, Q = Rk[i].to(wk.dtype), Qv[i].to(wv.dtype)
                ks.append(R.T @ wk[h])
                vs.append(Q.T @ wv[h])
                bks.append(None if bk is None else R.T @ bk[h])
                bvs.append(None if bv is None else Q.T @ bv[h])
                for qh in range(h * r, (h + 1) * r):  # the query heads reading kv head h
                    wq[qh] = R.T @ wq[qh]
                    if bq is not None:
                        bq[qh] = R.T @ bq[qh]
                    wo[:, qh] = wo[:, qh] @ Q
                    order.append(qh)
            new_k.append(torch.stack(ks).mean(0))
            new_v.append(torch.stack(vs).mean(0))
            new_bk.append(None if bk is None else torch.stack(bks).mean(0))
            new_bv.append(None if bv is None else torch.stack(bvs).mean(0))
        perm = torch.tensor(order)
        attn.q_proj.weight.data.copy_(wq[perm].reshape(nq * d, -1))
        if bq is not None:
            attn.q_proj.bias.data.copy_(bq[perm].reshape(-1))
        attn.o_proj.weight.data.copy_(wo[:, perm].reshape(wo.shape[0], nq * d))
        attn.k_proj = _new_linear(torch.cat(new_k), None if bk is None else torch.cat(new_bk), attn.k_proj)
        attn.v_proj = _new_linear(torch.cat(new_v), None if bv is None else torch.cat(new_bv), attn.v_proj)
        attn.num_key_value_groups = nq // n_new
        return groups


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None
