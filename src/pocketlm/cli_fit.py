"""``pocketlm fit``: the best GGUF file for a budget of file bytes, RAM or decode speed."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_common import _check, _local_inputs, out
from .errors import PocketError
from .fsutil import check_output


def fit_cmd(
    model: str = typer.Argument(..., help="built-in name, .gguf file, model directory or hub id"),
    out_dir: Path = typer.Option(..., "--out", help="output folder: model.gguf, fit.json, report.html"),
    nbytes: Optional[str] = typer.Option(None, "--bytes", help="largest file: 95MB, 90MiB or a number of bytes"),
    ram: Optional[str] = typer.Option(None, help="largest RAM while running at --ctx (file, KV cache, runtime)"),
    min_decode: Optional[float] = typer.Option(None, help="slowest acceptable decode speed, tokens/s on this machine"),
    ctx: int = typer.Option(4096, help="context the RAM budget is for"),
    layers: str = typer.Option("0,1", help="candidates: numbers of lowest-Block-Influence layers removed first"),
    windows: int = typer.Option(4, help="WikiText-2 windows each candidate is scored on"),
    calib_windows: int = typer.Option(16, help="calibration windows"),
    calib_len: int = typer.Option(2048, help="tokens per calibration window"),
    threads: int = typer.Option(2, help="llama.cpp threads for the speed and memory measurements"),
    sizes: Optional[str] = typer.Option(None, help="fractions of the file limit to try, e.g. 1,0.9,0.8 (default 1, "
                                                   "and 0.85 too for --ram / --min-decode)"),
    ray: Optional[str] = typer.Option(None, help="measure candidates as Ray tasks: auto (this machine's cluster, "
                                                 "or a local one) or a cluster address"),
    anchors: Optional[Path] = typer.Option(None, help="other tools' files measured alike (benchmark JSON lines), "
                                                      "drawn in the report"),
    overwrite: bool = typer.Option(False, help="replace --out if it exists"),
):
    """Search pocketlm's GGUF candidates for the lowest KL within the budget; measure them."""
    from . import fit, report
    from .recipe import parse_bytes

    try:
        removed = tuple(sorted({int(x) for x in layers.split(",")}))
    except ValueError:
        raise PocketError(f"--layers takes comma-separated counts like 0,1,2, got '{layers}'") from None
    if any(n < 0 for n in removed):
        raise PocketError("--layers counts must be >= 0")
    try:
        fractions = tuple(float(x) for x in sizes.split(",")) if sizes else None
    except ValueError:
        raise PocketError(f"--sizes takes comma-separated fractions like 1,0.9, got '{sizes}'") from None
    if fractions and not all(0 < f <= 1 for f in fractions):
        raise PocketError("--sizes fractions must be in (0, 1]")
    for name, v, lo in (("min-decode", min_decode, 0.001), ("ctx", ctx, 16), ("windows", windows, 1),
                        ("calib-windows", calib_windows, 1), ("calib-len", calib_len, 2), ("threads", threads, 1)):
        _check(name, v, lo)
    budget = fit.Budget(parse_bytes(nbytes) if nbytes else None, parse_bytes(ram) if ram else None, min_decode, ctx)
    budget.check()
    check_output(out_dir, overwrite, "dir", inputs=_local_inputs(model, anchors))
    if ray:  # before any work: an unreachable cluster is a one-line error, not one after the probe
        from . import sweep

        sweep.connect(ray)
    anc = report.Anchors.load(anchors)
    res = fit.run(model, budget, out_dir, windows, 2048, calib_windows, calib_len, removed, threads, overwrite, anc,
                  sizes=fractions, ray=ray)
    best = next(c for c in res["candidates"] if c["name"] == res["chosen"])
    out.print(f"chose {res['chosen']}: {best['measured']['file_bytes']:,} bytes, KL {best['measured']['kl']}, "
              f"decode {res['chosen_measured_again']['tg_tok_s']} tok/s; budgets met: "
              + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in res["meets"].items()))
    out.print(f"wrote {out_dir}/model.gguf, fit.json, report.html ({res['seconds']} s)")
