"""``pocketlm analyze``: per-linear quantization sensitivity of a model, as a table and a heat map."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .calibrate import run_layerwise
from .data import calibration_windows
from .fsutil import atomic_dir
from .quant.aptq import ATTENTION_PROJECTIONS, SensitivityProcessor
from .quant.grid import QuantSpec


def sensitivity(model, windows: torch.Tensor, bits=(2, 3, 4, 5, 6, 8), group_size: int = 128,
                mode: str = "attention", grad_windows: int = 4, select=None) -> dict:
    """{linear: {spec label: cost}} plus shapes, from one analysis pass (model unchanged)."""
    from .quant.sensitivity import loss_gradients

    specs = [QuantSpec(bits=b, group_size=group_size) for b in bits]
    select = select or (lambda n: ".layers." in n)
    # as APTQ does by default: each layer's output error weighted by the LM loss gradient there
    targets = loss_gradients(model, windows[:grad_windows]) if mode == "attention" else None
    proc = SensitivityProcessor(select, specs, mode, list(ATTENTION_PROJECTIONS), grad_windows, targets=targets)
    run_layerwise(model, windows, proc, description="sensitivity")
    return {"mode": mode, "specs": [s.label() for s in specs], "costs": proc.costs,
            "shapes": {n: list(s) for n, s in proc.shapes.items()}}


def layer_table(result: dict, spec_label: str) -> tuple[list[str], list[str], np.ndarray]:
    """Rows = decoder layers, columns = projections, values = cost at ``spec_label``."""
    rows, cols = {}, []
    for name, row in result["costs"].items():
        parts = name.split(".")
        i = next(k for k, p in enumerate(parts) if p.isdigit())
        layer, proj = int(parts[i]), ".".join(parts[i + 1:])
        proj = proj.split(".")[-1]
        if proj not in cols:
            cols.append(proj)
        rows.setdefault(layer, {})[proj] = row[spec_label]
    layers = sorted(rows)
    vals = np.array([[rows[l].get(c, math.nan) for c in cols] for l in layers])
    return [str(l) for l in layers], cols, vals


def run(model, tokenizer, out: str | Path, windows: int, seq_len: int, mode: str, bits, group_size: int,
        overwrite: bool = True) -> dict:
    from .plots import heatmap

    win = calibration_windows(tokenizer, windows, seq_len)
    res = sensitivity(model, win, bits, group_size, mode)
    res["calibration"] = {"windows": windows, "seq_len": seq_len}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "sensitivity.json").write_text(json.dumps(res, indent=1))
        for b in (3, 4):
            label = QuantSpec(bits=b, group_size=group_size).label()
            if label in res["specs"]:
                rows, cols, vals = layer_table(res, label)
                heatmap(np.log10(np.maximum(vals, 1e-12)), rows, cols,
                        f"{mode} sensitivity at {label}", "log10 estimated cost", tmp / f"sensitivity-{label}.png")
    return res


def layers(model, tokenizer, out: str | Path, windows: int, seq_len: int, remove_fraction: float = 0.25,
           overwrite: bool = True) -> dict:
    """ShortGPT's Block Influence of every decoder layer: JSON and bar chart (PNG), marking the
    layers a removal of ``remove_fraction`` of them would take."""
    from .plots import bars
    from .prune.shortgpt import block_influence

    win = calibration_windows(tokenizer, windows, seq_len)
    bi = block_influence(model, win)
    k = max(1, round(remove_fraction * len(bi)))
    lowest = sorted(sorted(range(len(bi)), key=bi.__getitem__)[:k])
    res = {"block_influence": bi, "lowest": lowest, "remove_fraction": remove_fraction,
           "calibration": {"windows": windows, "seq_len": seq_len}}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "block_influence.json").write_text(json.dumps(res, indent=1))
        bars(bi, f"Block Influence (red: the {k} lowest, removed by ShortGPT at {remove_fraction:.0%})",
             "BI = 1 - mean cos(h_in, h_out)", tmp / "block_influence.png", lowest)
    return res


TARGETS = (4096, 8192, 32768, 131072)


def rope(model, tokenizer, out: str | Path, windows: int, seq_len: int, corpus: str = "wikitext2",
         overwrite: bool = True) -> dict:
    """The RoPE-base bound (Xu et al., 2024) for the model's head dim and base, the smallest base
    each usual context length needs, and perplexity by position on long windows of the
    evaluation text (where a model stops using its context): JSON and a PNG."""
    from . import rope as R
    from .measure import perplexity
    from .plots import lines

    rep = R.report(model.config)
    rep["base_needed"] = {str(n): R.required_base(n, rep["head_dim"]) for n in TARGETS}
    r = perplexity(model, tokenizer, corpus, seq_len, windows)
    rep["by_position"] = {"corpus": corpus, "windows": r.windows, "seq_len": r.seq_len, "ppl": r.ppl,
                          "bucket_start": r.bucket_start, "bucket_ppl": r.bucket_ppl}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "rope.json").write_text(json.dumps(rep, indent=1))
        lines(r.bucket_start, {f"{r.windows} x {r.seq_len} tokens": r.bucket_ppl},
              f"perplexity by position (rope base {rep['rope_theta']:g} supports {rep['supported_context']} tokens)",
              "position in the window (bucket start)", "perplexity", tmp / "rope_by_position.png")
    return rep


def attention(model, tokenizer, out: str | Path, windows: int, seq_len: int, widths=None,
              overwrite: bool = True) -> dict:
    """Per layer, the share of attention mass within the last w keys on calibration text (how
    local each layer is; the most local ones are the candidates for sliding-window layers):
    JSON and a heat map (layers x widths)."""
    from .attention.span import WIDTHS, attention_span
    from .plots import heatmap

    widths = [w for w in (widths or WIDTHS) if w < seq_len]
    win = calibration_windows(tokenizer, windows, seq_len)
    span = attention_span(model, win, widths)
    res = {"widths": widths, "local_mass": span, "calibration": {"windows": windows, "seq_len": seq_len}}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "attention_span.json").write_text(json.dumps(res, indent=1))
        heatmap(np.array(span), [str(i) for i in range(len(span))], [str(w) for w in widths],
                "share of attention mass within the last w tokens", "share", tmp / "attention_span.png")
    return res
