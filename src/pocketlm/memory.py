"""The process's resident memory, as the kernel counts it (Linux /proc; 0 elsewhere)."""
from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")


def _field(name: str) -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss() -> int:
    """Resident bytes now."""
    return _field("VmRSS")


def peak() -> int:
    """Highest resident bytes since the process started or since ``reset_peak``."""
    return _field("VmHWM")


def reset_peak() -> bool:
    """Start counting the peak afresh (Linux: writing 5 to clear_refs); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def return_freed_memory() -> bool:
    """Make glibc give large freed blocks (256 KiB and up) back to the kernel at once, instead of
    keeping them in its heap, so that resident memory follows the tensors alive (what a memory
    plan counts); training's large activations are then mapped and unmapped per use."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def trim() -> None:
    """Hand the heap's free pages back to the kernel (glibc malloc_trim), e.g. after a model
    was cast to a smaller dtype, so that the plan starts from what is really in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
