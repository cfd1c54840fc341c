"""Every output pocketlm writes: checked and claimed before the work (``check_output``: an
exclusive lock, so two runs cannot both write one path), written into a hidden sibling and
renamed into place when complete (``atomic_dir``, ``atomic_file``), never over an output that
appeared meanwhile unless ``overwrite``; on any error or signal the partial output is removed."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import PocketError


def check_output(out: str | os.PathLike, overwrite: bool = False, kind: str = "dir", inputs=()) -> Path:
    """Refuse, before any work, an output path that cannot or must not be written: an existing
    one without ``overwrite``, a directory where a file goes (or the reverse), the current
    directory or one of its parents, an input (or a folder holding one), or a place whose
    nearest existing parent is not a writable directory. Returns the path."""
    out = Path(out)
    full = out.expanduser().resolve()
    if full == Path.cwd().resolve() or full in Path.cwd().resolve().parents:
        raise PocketError(f"--out {out} is the current directory or above it; give a new folder or file")
    for src in inputs:
        s = Path(src).expanduser().resolve()
        if full == s or full in s.parents or (s.is_dir() and s in full.parents):
            raise PocketError(f"--out {out} would replace or write into the input {src}; "
                              "inputs are never modified, choose another --out")
    if out.exists():
        if not overwrite:
            raise PocketError(f"{out} already exists; choose another --out or pass --overwrite")
        if kind == "file" and out.is_dir():
            raise PocketError(f"{out} is a directory; give a file name for this output")
        if kind == "dir" and not out.is_dir():
            raise PocketError(f"{out} is a file; give a folder name for this output")
    parent = full.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PocketError(f"cannot write {out}: {parent} is not a writable directory")
    claim(full)
    return out


_CLAIMS: dict[str, int] = {}  # resolved output path -> the open lock file this process holds


def claim(path: str | os.PathLike) -> None:
    """Hold an exclusive lock on an output path until this process ends, or refuse in one line
    when another process holds it. The lock is an ``flock`` on a file in the temporary folder
    (named by a hash of the path), so nothing is written next to the output, and the kernel
    releases it when a run dies, however it dies."""
    key = str(Path(path).expanduser().resolve())
    if key in _CLAIMS:
        return
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the rename-time checks still refuse to replace
        return
    folder = Path(tempfile.gettempdir()) / f"pocketlm-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(folder / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PocketError(f"another pocketlm run is writing {path}; "
                          "wait for it to finish or choose another --out") from None
    _CLAIMS[key] = fd


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory next to ``out``; on success it becomes ``out``.
    On any error or interrupt the temporary directory is removed and ``out`` is untouched."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise PocketError(f"{out} already exists; choose another --out or pass --overwrite")
    made = _make_parents(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        if out.exists() and not overwrite:
            raise PocketError(f"{out} appeared while this run worked (another run?); nothing was replaced, "
                              "choose another --out or pass --overwrite")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise


def _make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; return them, outermost first."""
    missing = [p for p in reversed(path.parents) if not p.exists()]
    for p in missing:
        p.mkdir(exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Undo ``_make_parents`` after a failure: remove the folders it made, if still empty."""
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            break


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_permissions(folder: Path) -> None:
    """Temporary folders and files are private (0700/0600); the output gets the permissions a
    plain mkdir/open would give under the user's umask."""
    mask = _umask()
    for p in [folder, *folder.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise PocketError(f"{path} already exists; choose another --out or pass --overwrite")
    made = _make_parents(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:  # link fails if the path appeared meanwhile: never replace another run's output
            try:
                os.link(tmp, path)
                os.unlink(tmp)
            except FileExistsError:
                raise PocketError(f"{path} appeared while this run worked (another run?); nothing was replaced, "
                                  "choose another --out or pass --overwrite") from None
            except OSError:  # a filesystem without hard links
                if path.exists():
                    raise PocketError(f"{path} appeared while this run worked; nothing was replaced") from None
                os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        _remove_empty(made)
        raise
