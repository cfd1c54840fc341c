"""What the ``pocketlm`` commands share: the console, number formatting, option range checks."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from .errors import PocketError

out = Console()


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def _check(name: str, value, lo, hi=None) -> None:
    """A numeric option in its range (NaN and infinities refused), before any work."""
    if value is None:
        return
    if value != value or value in (float("inf"), float("-inf")) or value < lo or (hi is not None and value > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise PocketError(f"--{name} must be {rng}, got {value}")


def _local_inputs(*specs) -> list[str]:
    """The files and folders among the given specs (built-in names and hub ids are not paths)."""
    return [str(s) for s in specs if s is not None and Path(s).exists()]


def _bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"
