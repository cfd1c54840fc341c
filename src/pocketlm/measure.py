"""Perplexity by the standard protocol, and agreement with an uncompressed reference.

Perplexity: the corpus is tokenized once and cut into non-overlapping windows of ``seq_len``
tokens (stride = window); each window is scored on its own and perplexity is
exp(mean NLL over every scored token), a window of L tokens scoring L - 1 of them.
With a ``reference`` model, the same windows also give the reference's perplexity, the mean
KL divergence KL(P_ref || P_model) of the next-token distributions and the top-1 agreement,
over the same scored positions.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

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


@torch.inference_mode()
def evaluate_windows(model: nn.Module, windows: torch.Tensor, reference: nn.Module | None = None,
                     chunk: int = 512, corpus: str = "custom") -> EvalResult:
    """Score ``windows`` (n, L) of token ids; see the module doc."""
    t0 = time.perf_counter()
    adapter = ModelAdapter(model)
    ref = ModelAdapter(reference) if reference is not None else None
    dev = next(model.parameters()).device
    nll = ref_nll = kl = 0.0
    agree = count = 0
    n, seq_len = windows.shape
    with progress.bar("evaluating", n) as advance:
        for w in windows:
            ids = w[None].to(dev)
            h = adapter.hidden_states(ids)[0, :-1]
            h_ref = ref.hidden_states(ids)[0, :-1] if ref else None
            targets = ids[0, 1:]
            for c in range(0, h.shape[0], chunk):
                lp = _logprobs(adapter.head, h[c : c + chunk])
                tgt = targets[c : c + chunk]
                nll += -lp.gather(1, tgt[:, None]).sum().item()
                if ref is not None:
                    lp_ref = _logprobs(ref.head, h_ref[c : c + chunk])
                    ref_nll += -lp_ref.gather(1, tgt[:, None]).sum().item()
                    kl += (lp_ref.exp() * (lp_ref - lp)).sum().item()
                    agree += (lp_ref.argmax(-1) == lp.argmax(-1)).sum().item()
                count += tgt.numel()
            advance()
    res = EvalResult(corpus=corpus, windows=n, seq_len=seq_len, stride=seq_len, tokens_scored=count,
                     dtype=str(model.dtype).replace("torch.", ""), ppl=math.exp(nll / count), nll=nll / count,
                     seconds=time.perf_counter() - t0)
    if ref is not None:
        res.ref_ppl = math.exp(ref_nll / count)
        res.kl = kl / count
        res.top1 = agree / count
    return res


def perplexity(model: nn.Module, tokenizer, corpus: str = "wikitext2", seq_len: int = 2048,
               max_windows: int | None = None, reference: nn.Module | None = None) -> EvalResult:
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
