"""Writing files and directories atomically.

Every file or directory the package writes goes through :func:`atomic_file` or
:func:`atomic_directory`: the content is written under a temporary sibling name and renamed into
place, so an interrupted run leaves either the old content or the new one, never half of it. Where an
output may go at all is ``outputs.py``'s rule.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "atomic_file", "write_atomic"]


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path`` (mode 0644),
    on error it is removed. The parent directory is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


@contextmanager
def atomic_directory(output: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory of ``output`` to fill; on success it becomes ``output``.

    ``replace``: an existing ``output`` is replaced. Without it an ``output`` that appeared meanwhile
    (another process filling the same cache entry) is kept and the new copy discarded. On error the
    temporary directory is removed.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700
    try:
        yield tmp
        if replace and output.exists():
            shutil.rmtree(output)
        try:
            os.replace(tmp, output)
        except OSError:
            if replace or not output.exists():
                raise
            shutil.rmtree(tmp)  # another process finished the same directory first: keep its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
