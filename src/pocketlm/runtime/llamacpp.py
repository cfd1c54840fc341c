"""GGUF files through llama.cpp (llama-cpp-python): logits for the evaluation protocol,
llama-bench-style speed, and the tokenizer/chat the file carries."""
from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import PocketError


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise PocketError("running GGUF files needs llama-cpp-python: pip install llama-cpp-python") from None
    return llama_cpp


def load(path: str | os.PathLike, n_ctx: int = 2048, threads: int | None = None, logits_all: bool = True):
    """A llama_cpp.Llama for ``path`` (a clear error for a missing or unreadable file)."""
    llama_cpp = _llama_cpp()
    path = Path(path)
    if not path.is_file():
        raise PocketError(f"no such GGUF file: {path}")
    from ..models import _check_gguf

    _check_gguf(str(path))
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads,
                               n_threads_batch=threads, logits_all=logits_all, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise PocketError(f"llama.cpp could not load {path} ({e}); is it a complete GGUF file?") from None


class LlamaCppScorer:
    """Next-token log-probabilities from llama.cpp's own logits (a scorer for ``measure``)."""

    dtype = "gguf"

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, threads: int | None = None):
        self.llm = load(path, n_ctx, threads)
        self.path = str(path)

    def window(self, i: int, ids: torch.Tensor, chunk: int):
        llm = self.llm
        llm.reset()
        llm.eval(ids.tolist())
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float32)
        for c in range(0, logits.shape[0], chunk):
            yield torch.log_softmax(torch.from_numpy(logits[c : c + chunk].copy()), dim=-1)


@contextmanager
def _llama_log():
    """Collect llama.cpp's log lines while the block runs (pocketlm keeps them off the screen)."""
    import ctypes

    llama_cpp = _llama_cpp()
    from llama_cpp import _logger

    lines: list[str] = []
    keep = llama_cpp.llama_log_callback(lambda level, text, user: lines.append(text.decode("utf-8", "replace")))
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def bench(path: str | os.PathLike, threads: int, prompt: int = 512, gen: int = 128, reps: int = 3,
          ctx: int | None = None) -> dict:
    """Like llama-bench: prompt processing (``prompt`` tokens in one batch) and generation
    (``gen`` tokens one at a time) in tokens/s, the best of ``reps`` runs, plus file bytes, the
    process's peak RSS, and the KV cache llama.cpp allocated for a context of ``ctx`` tokens
    (default: the prompt and generated tokens), as its own log reports it."""
    n_ctx = max(prompt + gen + 8, ctx or 0)
    with _llama_log() as log:
        llm = load(path, n_ctx=n_ctx, threads=threads, logits_all=False)
    kv_mib = sum(float(m) for m in re.findall(r"KV buffer size\s*=\s*([0-9.]+) MiB", "".join(log)))
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    pp, tg = [], []
    for _ in range(reps):
        toks = rng.integers(100, vocab, prompt).tolist()
        llm.reset()
        t = time.perf_counter()
        llm.eval(toks)
        pp.append(prompt / (time.perf_counter() - t))
        llm.reset()
        llm.eval(toks[:1])
        t = time.perf_counter()
        for k in range(gen):
            llm.eval([int(rng.integers(100, vocab))])
        tg.append(gen / (time.perf_counter() - t))
    return {"file": str(path), "bytes": Path(path).stat().st_size, "threads": threads,
            "pp_tokens": prompt, "pp_tok_s": round(max(pp), 2), "tg_tokens": gen, "tg_tok_s": round(max(tg), 2),
            "peak_rss_mib": round(_peak_rss_mib(), 1), "n_ctx": llm.n_ctx(), "kv_cache_mib": round(kv_mib, 2)}


def _peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM on Linux (ru_maxrss survives exec, so a child started from
    a big process would report its parent's size), ru_maxrss elsewhere."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
