"""Perplexity by the standard protocol, and agreement with an uncompressed reference.

Perplexity: the corpus is tokenized once and cut into non-overlapping windows of ``seq_len``
tokens (stride = window); each window is scored on its own and perplexity is
exp(mean NLL over every scored token), a window of L tokens scoring L - 1 of them.
With a ``reference`` model, the same windows also give the reference's perplexity, the mean
KL divergence KL(P_ref || P_model) of the next-token distributions and the top-1 agreement,
over the same scored positions.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from . import progress
from .data import eval_windows
from .models import ModelAdapter


@dataclass
class EvalResult:
    corpus: str
    windows: int
    seq_len: int
    stride: int
    tokens_scored: int
    dtype: str
    ppl: float
    nll: float
    seconds: float
    ref_ppl: float | None = None
    kl: float | None = None
    top1: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _logprobs(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(head(hidden).float(), dim=-1)


class ReferenceCache:
    """A reference model's next-token log-probabilities on fixed windows, in a float32 file, so
    that many compressed variants are compared against one reference pass (benchmarks)."""

    def __init__(self, path: str | Path, windows: torch.Tensor):
        self.path = Path(path)
        meta = json.loads(self.path.with_suffix(".json").read_text())
        if meta["windows_sha256"] != _digest(windows):
            raise ValueError(f"{self.path} holds log-probabilities of other windows")
        self.arr = np.memmap(self.path, dtype=np.float32, mode="r", shape=tuple(meta["shape"]))

    @classmethod
    def build(cls, model: nn.Module, windows: torch.Tensor, path: str | Path, chunk: int = 512) -> "ReferenceCache":
        path = Path(path)
        if path.with_suffix(".json").is_file():
            try:
                return cls(path, windows)
            except ValueError:
                pass
        adapter = ModelAdapter(model)
        n, L = windows.shape
        shape = (n, L - 1, model.config.vocab_size)
        tmp = path.with_suffix(".partial")
        arr = np.memmap(tmp, dtype=np.float32, mode="w+", shape=shape)
        with torch.inference_mode(), progress.bar("reference", n) as advance:
            for i, w in enumerate(windows):
                h = adapter.hidden_states(w[None].to(next(model.parameters()).device))[0, :-1]
                for c in range(0, h.shape[0], chunk):
                    arr[i, c : c + chunk] = _logprobs(adapter.head, h[c : c + chunk]).cpu().numpy()
                advance()
        arr.flush()
        del arr
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps({"shape": list(shape), "windows_sha256": _digest(windows)}))
        return cls(path, windows)

    def logprobs(self, i: int, c: int, chunk: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.arr[i, c : c + chunk], copy=True))


def _digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()


@torch.inference_mode()
def evaluate_windows(model: nn.Module, windows: torch.Tensor, reference: "nn.Module | ReferenceCache | None" = None,
                     chunk: int = 512, corpus: str = "custom") -> EvalResult:
    """Score ``windows`` (n, L) of token ids; see the module doc."""
    t0 = time.perf_counter()
    adapter = ModelAdapter(model)
    cache = reference if isinstance(reference, ReferenceCache) else None
    ref = ModelAdapter(reference) if reference is not None and cache is None else None
    dev = next(model.parameters()).device
    nll = ref_nll = kl = 0.0
    agree = count = 0
    n, seq_len = windows.shape
    with progress.bar("evaluating", n) as advance:
        for i, w in enumerate(windows):
            ids = w[None].to(dev)
            h = adapter.hidden_states(ids)[0, :-1]
            h_ref = ref.hidden_states(ids)[0, :-1] if ref else None
            targets = ids[0, 1:]
            for c in range(0, h.shape[0], chunk):
                lp = _logprobs(adapter.head, h[c : c + chunk])
                tgt = targets[c : c + chunk]
                nll += -lp.gather(1, tgt[:, None]).sum().item()
                if reference is not None:
                    lp_ref = _logprobs(ref.head, h_ref[c : c + chunk]) if ref else cache.logprobs(i, c, chunk).to(lp)
                    ref_nll += -lp_ref.gather(1, tgt[:, None]).sum().item()
                    kl += (lp_ref.exp() * (lp_ref - lp)).sum().item()
                    agree += (lp_ref.argmax(-1) == lp.argmax(-1)).sum().item()
                count += tgt.numel()
            advance()
    res = EvalResult(corpus=corpus, windows=n, seq_len=seq_len, stride=seq_len, tokens_scored=count,
                     dtype=str(model.dtype).replace("torch.", ""), ppl=math.exp(nll / count), nll=nll / count,
                     seconds=time.perf_counter() - t0)
    if reference is not None:
        res.ref_ppl = math.exp(ref_nll / count)
        res.kl = kl / count
        res.top1 = agree / count
    return res


def perplexity(model: nn.Module, tokenizer, corpus: str = "wikitext2", seq_len: int = 2048,
               max_windows: int | None = None, reference: "nn.Module | ReferenceCache | None" = None) -> EvalResult:
    """Perplexity of ``model`` on ``corpus`` (and KL/top-1 against ``reference`` if given)."""
    windows = eval_windows(tokenizer, corpus, seq_len, max_windows)
    return evaluate_windows(model, windows, reference=reference, corpus=corpus)


def evaluate(model: "nn.Module | str", tokenizer=None, corpus: str = "wikitext2", seq_len: int = 2048,
             windows: int | None = None, reference: "nn.Module | str | None" = None) -> EvalResult:
    """Python API: perplexity of ``model`` (loaded model or spec) on ``corpus``, optionally with
    KL divergence and top-1 agreement against ``reference``."""
    from . import models

    if isinstance(model, str):
        model, tokenizer, _ = models.load(model)
    if isinstance(reference, str):
        reference, _, _ = models.load(reference)
    if tokenizer is None:
        raise ValueError("evaluate() needs the tokenizer when given a loaded model")
    return perplexity(model, tokenizer, corpus, seq_len, windows, reference)
