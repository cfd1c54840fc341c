"""Evaluation text and calibration windows.

Evaluation corpora: ``wikitext2`` (bundled copy of the WikiText-2 raw test split),
``hf:NAME[:CONFIG]:SPLIT[:COLUMN]`` (a hub dataset via ``datasets``) or a local ``.txt`` file.
Calibration text: ``python-docs`` (bundled, the default), a local file, or ``hf:...``.
The two bundled texts are disjoint by construction; pocketlm refuses to calibrate on the
evaluation corpus.
"""
from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from . import memory
from .errors import PocketError

BUNDLED = {
    "wikitext2": "wikitext-2-raw-test.txt",
    "python-docs": "calibration-python-docs.txt",
}
EVAL_ONLY = {"wikitext2"}
DEFAULT_CALIBRATION = "python-docs"
HUB_ALIASES = {"wikitext2": "hf:wikitext:wikitext-2-raw-v1:test:text"}


def _bundled_path(name: str) -> str:
    return str(resources.files("pocketlm") / "datasets" / BUNDLED[name])


def load_text(spec: str) -> str:
    """The raw text of a corpus. Rows are joined with a newline, empty rows dropped."""
    if spec in BUNDLED:
        return Path(_bundled_path(spec)).read_text(encoding="utf-8").rstrip("\n")
    if spec.startswith("hf:"):
        return _hub_text(spec)
    p = Path(spec)
    if p.is_file():
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PocketError(f"{spec} is not UTF-8 text; give a plain-text file") from None
    if p.suffix or os.sep in spec:
        raise PocketError(f"no such text file: {spec}")
    raise PocketError(
        f"unknown text '{spec}': use {', '.join(BUNDLED)}, a .txt file, or hf:NAME[:CONFIG]:SPLIT[:COLUMN]"
    )


def check_text(spec: str) -> None:
    """Refuse a local text that cannot be used (missing, not UTF-8, empty) before any model is
    loaded; built-in texts need no check and hub texts are checked when read."""
    if spec in BUNDLED or spec.startswith("hf:"):
        return
    if not load_text(spec).strip():
        raise PocketError(f"{spec} is empty; give a plain-text file with the text to use")


def _hub_text(spec: str) -> str:
    parts = spec[3:].split(":")
    if len(parts) < 2:
        raise PocketError(f"hub text '{spec}' needs at least hf:NAME:SPLIT")
    name, rest = parts[0], parts[1:]
    if len(rest) == 1:
        config, split, column = None, rest[0], "text"
    elif len(rest) == 2:
        config, split, column = rest[0], rest[1], "text"
    else:
        config, split, column = rest[0], rest[1], rest[2]
    try:
        import datasets
    except ImportError:
        raise PocketError("hub datasets need the 'datasets' package: pip install 'pocketlm[hub]'") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network or name errors come in many types
        raise PocketError(f"could not load {spec} from the hub ({type(e).__name__}); "
                          "use a local text file instead") from None
    rows = [r for r in ds[column] if r and r.strip()]
    return "\n".join(rows)


@lru_cache(maxsize=8)
def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize once (no special tokens added), as a 1-D LongTensor; cached per text. The
    tokenizer's working memory (~0.2 GB for 1.5 MB of text) goes back to the kernel after."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    memory.trim()
    return ids


def bos_id(tokenizer) -> int | None:
    """The BOS token a tokenizer puts before every text (Gemma's do; Llama-3/SmolLM2's do not)."""
    if not getattr(tokenizer, "add_bos_token", False):
        return None
    return getattr(tokenizer, "bos_token_id", None)


def _with_bos(windows: torch.Tensor, tokenizer) -> torch.Tensor:
    """Each window's first token replaced by BOS when the tokenizer adds one, as llama.cpp's
    perplexity and imatrix tools do (a model trained always to see BOS first degrades without
    it); the scored tokens are unchanged."""
    bos = bos_id(tokenizer)
    if bos is None:
        return windows
    windows = windows.clone()
    windows[:, 0] = bos
    return windows


def eval_windows(tokenizer, corpus: str = "wikitext2", seq_len: int = 2048,
                 max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (stride = length) over the tokenized corpus: (n, seq_len).
    A shorter run takes the first ``max_windows``; a trailing partial window is dropped. With a
    tokenizer that adds BOS, each window starts with it (see ``_with_bos``)."""
    ids = tokenize(tokenizer, load_text(corpus))
    n = ids.numel() // seq_len
    if n == 0:
        raise PocketError(f"{corpus} has {ids.numel()} tokens, fewer than one window of {seq_len}; "
                          "use a shorter --seq-len")
    if max_windows is not None:
        n = min(n, max_windows)
    return _with_bos(ids[: n * seq_len].view(n, seq_len), tokenizer)


def calibration_windows(tokenizer, n: int = 128, seq_len: int = 2048, text: str = DEFAULT_CALIBRATION,
                        seed: int = 0) -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens from the calibration text, fixed seed."""
    if text in EVAL_ONLY or (text.startswith("hf:wikitext")):
        raise PocketError(f"'{text}' is evaluation data; calibrate on other text (default: {DEFAULT_CALIBRATION})")
    ids = tokenize(tokenizer, load_text(text))
    if ids.numel() <= seq_len:
        raise PocketError(f"calibration text has {ids.numel()} tokens, not more than one window of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=g)
    return _with_bos(torch.stack([ids[s : s + seq_len] for s in starts.tolist()]), tokenizer)


def sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
