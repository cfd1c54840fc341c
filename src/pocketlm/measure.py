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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from . import progress
from .calibrate import ActivationStore, LayerProcessor, run_layerwise
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
    #: mean token NLL (and KL, with a reference) of each window, in order: a paired comparison of
    #: two models on the same windows gets its standard error from these
    window_nll: list[float] = field(default_factory=list)
    window_kl: list[float] = field(default_factory=list)
    #: perplexity of the tokens at positions [bucket_start[k], bucket_start[k + 1]) of every
    #: window: where in a long window a model starts to lose track
    bucket_start: list[int] = field(default_factory=list)
    bucket_ppl: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def logprobs(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities of hidden states (positions, hidden), in float32."""
    return F.log_softmax(head(hidden).float(), dim=-1)


def kl_sum(ref: torch.Tensor, lp: torch.Tensor) -> float:
    """Sum over positions of KL(ref || lp), both log-probabilities (positions, vocab)."""
    return (ref.exp() * (ref - lp)).sum().item()


class TorchScorer:
    """Next-token log-probabilities of a transformers model, the head applied in chunks."""

    def __init__(self, model: nn.Module):
        self.adapter = ModelAdapter(model)
        self.device = next(model.parameters()).device
        self.dtype = str(model.dtype).replace("torch.", "")

    def window(self, i: int, ids: torch.Tensor, chunk: int):
        """Log-probabilities (positions, vocab) for every position but the last, ``chunk``
        positions at a time (every scorer chunks alike, so their chunks line up)."""
        h = self.adapter.hidden_states(ids[None].to(self.device))[0, :-1]
        for c in range(0, h.shape[0], chunk):
            yield logprobs(self.adapter.head, h[c : c + chunk]).cpu()


class ReferenceCache:
    """A reference model's next-token log-probabilities on fixed windows, in a float32 file, so
    that many compressed variants are compared against one reference pass (benchmarks)."""

    def __init__(self, path: str | Path, windows: torch.Tensor):
        self.path, self.dtype = Path(path), "float32"
        meta = json.loads(self.path.with_suffix(".json").read_text())
        if meta["windows_sha256"] != _digest(windows):
            raise ValueError(f"{self.path} holds log-probabilities of other windows")
        self.arr = np.memmap(self.path, dtype=np.float32, mode="r", shape=tuple(meta["shape"]))

    @classmethod
    def build(cls, model: "nn.Module | object", windows: torch.Tensor, path: str | Path) -> "ReferenceCache":
        path = Path(path)
        if path.with_suffix(".json").is_file():
            try:
                return cls(path, windows)
            except ValueError:
                pass
        scorer = as_scorer(model)
        n, L = windows.shape
        tmp = path.with_suffix(".partial")
        arr = None
        with torch.inference_mode(), progress.bar("reference", n) as advance:
            for i, w in enumerate(windows):
                at = 0
                for lp in scorer.window(i, w, 512):
                    if arr is None:
                        arr = np.memmap(tmp, dtype=np.float32, mode="w+", shape=(n, L - 1, lp.shape[-1]))
                    arr[i, at : at + lp.shape[0]] = lp.numpy()
                    at += lp.shape[0]
                advance()
        shape = list(arr.shape)
        arr.flush()
        del arr
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps({"shape": shape, "windows_sha256": _digest(windows)}))
        return cls(path, windows)

    def window(self, i: int, ids: torch.Tensor, chunk: int):
        for c in range(0, self.arr.shape[1], chunk):
            yield torch.from_numpy(np.array(self.arr[i, c : c + chunk], copy=True))


class StreamedScorer:
    """Log-probabilities of a model too large to load: every window goes through one decoder
    layer at a time, each layer read from the safetensors files and freed after (the engine's
    streamed pass, nothing written); the last layer's outputs are kept (on disk with
    ``offload``) and the final norm and head applied per chunk, as ``TorchScorer`` does."""

    def __init__(self, spec: str, windows: torch.Tensor, dtype: torch.dtype = torch.float32,
                 offload: bool = True, device: str = "cpu"):
        from .stream import open_streamed

        model, _, _, streamer = open_streamed(spec, None, dtype, device)
        keep = _KeepLast()
        run_layerwise(model, windows, keep, offload=offload, description="streamed layers", stream=streamer)
        self.hidden, self.adapter = keep.hidden, ModelAdapter(model)
        self.device, self.dtype = device, str(dtype).replace("torch.", "")

    def window(self, i: int, ids: torch.Tensor, chunk: int):
        h = self.adapter.norm(self.hidden[i][0, :-1].to(self.device))
        for c in range(0, h.shape[0], chunk):
            yield logprobs(self.adapter.head, h[c : c + chunk]).cpu()


class _KeepLast(LayerProcessor):
    """Transforms nothing (so the engine runs each layer once per window, no observing pass);
    keeps the engine's buffer of the last layer's outputs."""

    hidden: ActivationStore | None = None

    def finish(self, adapter, hidden) -> ActivationStore:
        self.hidden = hidden
        return hidden


def as_scorer(x):
    """A transformers model becomes a TorchScorer; scorers (a ReferenceCache, llama.cpp) pass as they are."""
    return TorchScorer(x) if isinstance(x, nn.Module) else x


def _digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()


@torch.inference_mode()
def evaluate_windows(model, windows: torch.Tensor, reference=None, corpus: str = "custom",
                     chunk: int = 512, buckets: int = 8) -> EvalResult:
    """Score ``windows`` (n, L) of token ids with ``model`` (a transformers model or a scorer:
    llama.cpp, a ReferenceCache) and optionally ``reference``; see the module doc. The
    predicted positions are also split into ``buckets`` equal spans for perplexity by position."""
    t0 = time.perf_counter()
    scorer = as_scorer(model)
    ref = as_scorer(reference) if reference is not None else None
    nll = ref_nll = kl = 0.0
    agree = count = 0
    n, seq_len = windows.shape
    per_nll, per_kl = [], []
    starts = [k * (seq_len - 1) // buckets for k in range(buckets)]
    edges = torch.tensor(starts[1:])
    bucket_sum, bucket_count = torch.zeros(buckets, dtype=torch.float64), torch.zeros(buckets, dtype=torch.float64)
    with progress.bar("evaluating", n) as advance:
        for i, w in enumerate(windows):
            targets = w[1:]
            at = 0
            nll0, kl0, count0 = nll, kl, count
            ref_chunks = ref.window(i, w, chunk) if ref is not None else None
            for lp in scorer.window(i, w, chunk):
                tgt = targets[at : at + lp.shape[0]]
                token_nll = -lp.gather(1, tgt[:, None])[:, 0].double()
                which = torch.bucketize(torch.arange(at, at + lp.shape[0]), edges, right=True)
                bucket_sum.index_add_(0, which, token_nll)
                bucket_count.index_add_(0, which, torch.ones_like(token_nll))
                at += lp.shape[0]
                nll += token_nll.sum().item()
                if ref_chunks is not None:
                    lp_ref = next(ref_chunks).to(lp)
                    ref_nll += -lp_ref.gather(1, tgt[:, None]).sum().item()
                    kl += kl_sum(lp_ref, lp)
                    agree += (lp_ref.argmax(-1) == lp.argmax(-1)).sum().item()
                count += tgt.numel()
            per_nll.append((nll - nll0) / (count - count0))
            per_kl.append((kl - kl0) / (count - count0))
            advance()
    res = EvalResult(corpus=corpus, windows=n, seq_len=seq_len, stride=seq_len, tokens_scored=count,
                     dtype=scorer.dtype, ppl=math.exp(nll / count), nll=nll / count,
                     seconds=time.perf_counter() - t0, window_nll=per_nll, bucket_start=starts,
                     bucket_ppl=[math.exp(a / max(b, 1)) for a, b in zip(bucket_sum.tolist(), bucket_count.tolist())])
    if reference is not None:
        res.ref_ppl = math.exp(ref_nll / count)
        res.kl = kl / count
        res.top1 = agree / count
        res.window_kl = per_kl
    return res


def perplexity(model, tokenizer, corpus: str = "wikitext2", seq_len: int = 2048,
               max_windows: int | None = None, reference=None) -> EvalResult:
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
