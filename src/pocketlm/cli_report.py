"""``pocketlm report``: the HTML report of one or more output directories."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .cli_common import out
from .fsutil import check_output


def report_cmd(
    dirs: List[Path] = typer.Argument(..., help="output directories of pocketlm compress or recover"),
    out_file: Path = typer.Option(Path("report.html"), "--out", help="the HTML file to write"),
    anchors: Optional[Path] = typer.Option(None, help="other tools' files measured the same way, as benchmark JSON "
                                                      "lines (e.g. bench/results/gguf.jsonl): drawn beside yours"),
    overwrite: bool = typer.Option(False, help="replace --out if it exists"),
):
    """One self-contained HTML page comparing the models in DIRS (opens without a network)."""
    from . import report

    check_output(out_file, overwrite, "file", inputs=[str(d) for d in dirs] + ([str(anchors)] if anchors else []))
    runs = [report.Run.load(d) for d in dirs]
    anc = report.Anchors.load(anchors)
    path = report.write_runs(runs, anc, out_file, overwrite=overwrite)
    out.print(f"wrote {path} ({len(runs)} model{'s' if len(runs) != 1 else ''}"
              + (f", {len(anc.points)} files of other tools" if anc.points else "") + ")")
