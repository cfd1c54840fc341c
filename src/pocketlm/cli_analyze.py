"""``pocketlm analyze``: per-linear sensitivity, Block Influence, attention span or the RoPE bound
of a model, as tables, JSON and PNG (the computations live in ``analyze.py``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .cli_common import _check, _local_inputs, out
from .errors import PocketError
from .fsutil import check_output
from .models import DEFAULT_MODEL


def analyze_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="built-in name, .gguf file, model directory or hub id"),
    out_dir: Path = typer.Option(Path("analysis"), "--out", help="folder for sensitivity.json and the heat maps"),
    calib_windows: int = typer.Option(16, help="calibration windows"),
    calib_len: int = typer.Option(2048, help="tokens per calibration window"),
    sensitivity: str = typer.Option("attention", help="attention (APTQ), hessian (plain 2XX^T) or trace"),
    bits: str = typer.Option("2,3,4,5,6,8", help="bit widths to measure"),
    group_size: int = typer.Option(128, help="group size of the measured grids"),
    layers: bool = typer.Option(False, "--layers", help="instead: ShortGPT Block Influence of every layer"),
    remove_fraction: float = typer.Option(0.25, help="with --layers: mark the lowest-BI layers of this fraction"),
    rope: bool = typer.Option(False, "--rope", help="instead: the RoPE-base bound and perplexity by position "
                                                    "on long evaluation windows"),
    seq_len: Optional[int] = typer.Option(None, help="with --rope: tokens per window (default: the model's "
                                                     "context, at most 8192)"),
    windows: int = typer.Option(2, help="with --rope: evaluation windows"),
    attention: bool = typer.Option(False, "--attention", help="instead: per layer, the share of attention mass "
                                                              "within the last 64..1024 tokens (how local it is)"),
):
    """Per-linear quantization sensitivity (table, JSON, heat map PNG by layer and projection),
    with --layers the Block Influence of every decoder layer (table, JSON, bar chart PNG), or
    with --rope the context the rope base supports (Xu et al., 2024), the base each usual
    context length needs, and perplexity by position on long windows (table, JSON, PNG)."""
    _check("calib-windows", calib_windows, 1)
    _check("calib-len", calib_len, 2)
    check_output(out_dir, True, "dir", inputs=_local_inputs(model))
    if group_size != -1:
        _check("group-size", group_size, 1)
    if attention:
        return _attention(model, out_dir, calib_windows, calib_len)
    if rope:
        return _rope(model, out_dir, windows, seq_len)
    if layers:
        return _layers(model, out_dir, calib_windows, calib_len, remove_fraction)
    _sensitivity(model, out_dir, calib_windows, calib_len, sensitivity, bits, group_size)


def _attention(model: str, out_dir: Path, calib_windows: int, calib_len: int) -> None:
    from . import analyze as ana, models

    m, tok, _ = models.load(model)
    res = ana.attention(m, tok, out_dir, calib_windows, calib_len)
    t = Table(title=f"share of attention mass within the last w tokens ({model}; high = local)")
    t.add_column("layer", justify="right")
    for w in res["widths"]:
        t.add_column(f"w={w}", justify="right")
    for i, row in enumerate(res["local_mass"]):
        t.add_row(str(i), *[f"{v:.3f}" for v in row])
    out.print(t)
    out.print(f"wrote {out_dir}/attention_span.json and attention_span.png")


def _rope(model: str, out_dir: Path, windows: int, seq_len: int | None) -> None:
    from . import analyze as ana, models

    _check("windows", windows, 1)
    _check("seq-len", seq_len, 2)
    longest = getattr(models.load_config(model), "max_position_embeddings", None) or 8192
    if seq_len is not None and seq_len > longest:
        raise PocketError(f"--seq-len {seq_len} is longer than the model's context ({longest} tokens); "
                          f"use at most {longest}")
    m, tok, _ = models.load(model)
    res = ana.rope(m, tok, out_dir, windows, seq_len or min(longest, 8192))
    t = Table(title=f"RoPE base {res['rope_theta']:g} at head dim {res['head_dim']}: supports "
                    f"{res['supported_context']:,} tokens (trained on {res['trained_context'] or '?'})")
    t.add_column("context")
    t.add_column("smallest base that supports it", justify="right")
    for n, b in res["base_needed"].items():
        t.add_row(f"{int(n):,}", f"{b:.2g}")
    out.print(t)
    bp = res["by_position"]
    t = Table(title=f"perplexity by position, {bp['windows']} x {bp['seq_len']} tokens of {bp['corpus']}")
    t.add_column("positions from", justify="right")
    t.add_column("perplexity", justify="right")
    for start, v in zip(bp["bucket_start"], bp["bucket_ppl"]):
        t.add_row(f"{start:,}", f"{v:.3f}")
    out.print(t)
    out.print(f"wrote {out_dir}/rope.json and rope_by_position.png")


def _layers(model: str, out_dir: Path, calib_windows: int, calib_len: int, remove_fraction: float) -> None:
    from . import analyze as ana, models

    if not 0 < remove_fraction < 1:
        raise PocketError("--remove-fraction must lie between 0 and 1")
    m, tok, _ = models.load(model)
    res = ana.layers(m, tok, out_dir, calib_windows, calib_len, remove_fraction)
    t = Table(title=f"Block Influence of {model}'s layers (1 - mean cos(in, out); low = removable)")
    t.add_column("layer", justify="right")
    t.add_column("BI", justify="right")
    t.add_column("ShortGPT removes", justify="center")
    for i, v in enumerate(res["block_influence"]):
        t.add_row(str(i), f"{v:.4f}", "x" if i in res["lowest"] else "")
    out.print(t)
    out.print(f"wrote {out_dir}/block_influence.json and block_influence.png")


def _sensitivity(model: str, out_dir: Path, calib_windows: int, calib_len: int, sensitivity: str, bits: str,
                 group_size: int) -> None:
    from . import analyze as ana, models

    if sensitivity not in ("attention", "hessian", "trace"):
        raise PocketError(f"unknown --sensitivity '{sensitivity}'; use attention, hessian or trace")
    try:
        bit_list = tuple(int(b) for b in bits.split(","))
    except ValueError:
        raise PocketError(f"--bits takes comma-separated integers, got '{bits}'") from None
    if any(b < 2 or b > 8 for b in bit_list):
        raise PocketError("--bits must lie in 2..8")
    m, tok, _ = models.load(model)
    res = ana.run(m, tok, out_dir, calib_windows, calib_len, sensitivity, bit_list, group_size)
    label = res["specs"][min(1, len(res["specs"]) - 1)]
    rows, cols, vals = ana.layer_table(res, label)
    t = Table(title=f"{sensitivity} sensitivity of {model} at {label} "
                    "(estimated loss increase; higher = more sensitive)")
    t.add_column("layer")
    for c in cols:
        t.add_column(c, justify="right")
    for r, v in zip(rows, vals):
        t.add_row(r, *[f"{x:.3g}" for x in v])
    out.print(t)
    out.print(f"wrote {out_dir}/sensitivity.json and heat maps")
