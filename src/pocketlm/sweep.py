"""Run a sweep's independent tasks (``fit``'s candidates, a benchmark's configurations) in this
process, one after the other, or as Ray tasks on a cluster, one task per item.

``ray`` is ``None`` (in this process), ``"auto"`` (the cluster this machine belongs to, as
``ray start`` or ``RAY_ADDRESS`` set it up, else a local one started for the sweep, with a
worker per CPU) or a cluster's address (``HOST:6379``, or ``ray://HOST:10001`` through Ray
Client). The task function must be importable by the workers (a module-level function of an
installed package), and every path it is given must exist where it runs: on one machine this
holds by itself; on a cluster, install pocketlm on every node and give paths on a shared
folder (docs/fit.md). Results come back in the order of the items, whatever order the tasks
finish in.
"""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Callable, Sequence

from .errors import PocketError

_JOINED: list[str] = []  # the address this process connected to (Ray allows one cluster per process)


def run(fn: Callable, items: Sequence, ray: str | None = None, on_done: Callable | None = None,
        cpus: float = 1) -> list:
    """``[fn(x) for x in items]``, in this process or as Ray tasks; ``on_done(i, result)`` is
    called as each finishes."""
    if not ray:
        out = []
        for i, x in enumerate(items):
            out.append(fn(x))
            if on_done:
                on_done(i, out[-1])
        return out
    R = connect(ray)
    task = R.remote(num_cpus=cpus, max_retries=0)(fn)
    refs = [task.remote(x) for x in items]
    index = {r: i for i, r in enumerate(refs)}
    out: list = [None] * len(refs)
    pending = list(refs)
    while pending:
        ready, pending = R.wait(pending, num_returns=1)
        i = index[ready[0]]
        try:
            out[i] = R.get(ready[0])
        except R.exceptions.RayTaskError as e:  # the task's own error, raised here as itself
            raise e.as_instanceof_cause() from None
        if on_done:
            on_done(i, out[i])
    return out


def command(item: tuple[list[str], dict]) -> dict:
    """A sweep task that runs one command (``argv``, with ``env`` added to this process's
    environment) and returns its exit code and output: for sweeps whose items are processes,
    such as the benchmarks' configurations."""
    argv, env = item
    r = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
    return {"returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}


def connect(address: str):
    """The ``ray`` module, connected to the cluster ``address`` names (see the module doc)."""
    try:
        import ray as R
    except ImportError:
        raise PocketError("--ray needs Ray: pip install 'pocketlm[ray]'") from None
    if address != "auto":
        _reachable(address)
    if R.is_initialized():  # this process joined a cluster already (Ray allows one): keep it if it is that one
        if address != "auto" and _JOINED and _JOINED[0] != address:
            raise PocketError(f"this process is connected to the Ray cluster at {_JOINED[0]}, not {address}; "
                              f"pass --ray {_JOINED[0]} or run the sweep in a new process")
        return R
    if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"  # what `ray start` does when it finds the token: do the same
    opts = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address == "auto":
        try:
            R.init(address="auto", **opts)
        except ConnectionError:  # no cluster running here: start one for this process
            R.init(**opts)
        _JOINED[:] = [R.get_runtime_context().gcs_address]  # what a later explicit address must name
        return R
    try:
        R.init(address=address, **opts)
    except (ConnectionError, ValueError) as e:
        raise PocketError(f"cannot reach a Ray cluster at {address} ({str(e).splitlines()[0]}); "
                          "start one with `ray start --head` or pass --ray auto") from None
    _JOINED[:] = [address]
    return R


def _reachable(address: str) -> None:
    """Refuse an address nothing listens on in one line (Ray itself retries it for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise PocketError(f"cannot reach a Ray cluster at {address} ({e}); start one with `ray start --head` "
                          "or pass --ray auto") from None
