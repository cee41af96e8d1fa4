"""Atomic writes of files and directories: build under a temporary name beside the target, then ``os.replace``.

A crash leaves either the old target or the new one, never a half-written one (plus, at worst, a hidden
temporary that the next run removes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """Permissions a plain ``open``/``mkdir`` would give (temporary files/dirs are created 0600/0700)."""
    return (0o777 if directory else 0o666) & ~_umask()


@contextmanager
def atomic_directory(target: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes ``target``.

    ``replace``: an existing ``target`` is swapped out (and deleted) once the new one is complete; otherwise an
    existing ``target`` wins (another process produced the same content first) and the new copy is dropped.
    On any error the temporary directory is removed and the old ``target`` is untouched.
    """
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    os.chmod(tmp, default_mode(directory=True))
    try:
        yield tmp
        if out.exists() and not replace:
            shutil.rmtree(tmp)
            return
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``target`` through a temporary file beside it and ``os.replace`` (never half-written)."""
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out
