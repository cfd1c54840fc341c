"""Progress bars with ETA for long steps (rich); silent when disabled."""
from __future__ import annotations

import os
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_enabled = os.environ.get("POCKETLM_QUIET", "") == ""
console = Console(stderr=True)


@contextmanager
def bar(description: str, total: int):
    """Yields an ``advance(n=1, note=None)`` callable."""
    if not _enabled:
        yield lambda n=1, note=None: None
        return
    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*cols, console=console, transient=False) as p:
        task = p.add_task(description, total=total)

        def advance(n: int = 1, note: str | None = None):
            p.update(task, advance=n, description=f"{description} {note}" if note else description)

        yield advance
