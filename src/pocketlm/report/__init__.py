"""``pocketlm report``: one self-contained HTML page about compressed models (base against
compressed, quality against size with other tools' files, per-layer allocation and sensitivity,
Block Influence, per-window perplexity, recovery), readable without a network."""
from __future__ import annotations

from pathlib import Path

from ..fsutil import atomic_file
from .page import build, fit_page
from .runs import Anchors, Run

__all__ = ["write", "write_runs", "Run", "Anchors", "build", "fit_page"]


def write(dirs: list[str | Path], out: str | Path, anchors: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the report of the output directories ``dirs`` to ``out`` (atomically)."""
    return write_runs([Run.load(d) for d in dirs], Anchors.load(anchors), out, overwrite)


def write_runs(runs: list[Run], anchors: Anchors, out: str | Path, overwrite: bool = False) -> Path:
    text = build(runs, anchors)
    with atomic_file(out, overwrite=overwrite) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(out)
