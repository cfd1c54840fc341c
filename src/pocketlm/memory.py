"""The process's resident memory, as the kernel counts it (Linux /proc; 0 elsewhere)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _kib_field(path: Path, name: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _field(name: str) -> int:
    return _kib_field(_STATUS, name) or 0


def rss() -> int:
    """Resident bytes now."""
    return _field("VmRSS")


def peak() -> int:
    """Highest resident bytes since the process started or since ``reset_peak``."""
    return _field("VmHWM")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # "max" (no limit), or no such file


def _cgroup_room(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's memory cgroup limit (v1 or v2), page cache counted as
    free; None without a limit."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        v1 = "memory" in controllers.split(",")
        if not v1 and controllers:
            continue
        d = (root / "memory" if v1 else root) / rel.lstrip("/")
        limit = _read_int(d / ("memory.limit_in_bytes" if v1 else "memory.max"))
        used = _read_int(d / ("memory.usage_in_bytes" if v1 else "memory.current"))
        if limit is None or used is None or limit >= 2**60:
            continue
        cache = 0
        try:
            stat = dict(x.split() for x in (d / "memory.stat").read_text().splitlines())
            cache = int(stat.get("cache" if v1 else "file", 0))
        except (OSError, ValueError):
            pass
        return max(0, limit - used + cache)
    return None


def available() -> int | None:
    """Bytes this process could still take: the kernel's MemAvailable, or less when its memory
    cgroup has a limit; None where neither can be read."""
    got = [v for v in (_kib_field(Path("/proc/meminfo"), "MemAvailable"), _cgroup_room()) if v is not None]
    return min(got) if got else None


def reset_peak() -> bool:
    """Start counting the peak afresh (Linux: writing 5 to clear_refs); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


_M_MMAP_THRESHOLD = -3
_MAPPED = 256 * 1024  # blocks this large and up get their own mapping
_HEAP = 32 * 1024 * 1024  # glibc's own ceiling for the threshold on 64-bit


def _mmap_threshold(nbytes: int) -> bool:
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


def return_freed_memory() -> bool:
    """Make glibc give large freed blocks (256 KiB and up) back to the kernel at once, instead of
    keeping them in its heap, so that resident memory follows the tensors alive (what a memory
    plan counts); training's large activations are then mapped and unmapped per use."""
    return _mmap_threshold(_MAPPED)


@contextmanager
def mapped_allocations():
    """Inside: blocks of 256 KiB and up are each mapped on their own, so that freeing them later
    (a streamed layer's weights) unmaps them at once. Outside it: blocks up to 32 MiB come from
    the heap again, where a forward pass's activations are reused rather than mapped, zeroed and
    faulted in each time (that costs ~20% of a forward on 2 cores)."""
    _mmap_threshold(_MAPPED)
    try:
        yield
    finally:
        _mmap_threshold(_HEAP)


def trim() -> None:
    """Hand the heap's free pages back to the kernel (glibc malloc_trim), e.g. after a model
    was cast to a smaller dtype, so that the plan starts from what is really in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
