"""The layout of pocketlm's output directory, in one place: its file names and its manifest.

    DIR/model.safetensors, config.json, tokenizer files   the model (transformers loads it)
    DIR/sparse.safetensors     pruned linears: bitmask + kept values (``sparse.py``)
    DIR/quantization.safetensors   each quantized linear's scales and zeros, or GGML bytes
    DIR/recipe.yaml            the recipe that made it
    DIR/pocketlm.json          the manifest: source, stages' reports, sizes, evaluation, linears
    DIR/report.html            the manifest as one page (``report/``)

Writers put these names inside the temporary folder of an atomic write; readers go through
:func:`manifest`, which refuses a damaged one in one line.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import PocketError

MANIFEST = "pocketlm.json"
RECIPE = "recipe.yaml"
QUANT = "quantization.safetensors"
SPARSE = "sparse.safetensors"
REPORT = "report.html"


def manifest(model_dir: str | Path) -> dict | None:
    """The manifest of an output directory (None when it is not one)."""
    p = Path(model_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PocketError(f"{p} is damaged (not JSON); re-run the compression that wrote it") from None
    if not isinstance(data, dict):
        raise PocketError(f"{p} is damaged (not a JSON object); re-run the compression that wrote it")
    return data


def write_manifest(folder: str | Path, man: dict) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(man, indent=2))
