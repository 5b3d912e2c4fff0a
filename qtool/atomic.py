"""Atomic file writes: a temporary name beside the target, fsync, rename.

A crash or an error never leaves half a file at the destination, and a destination that cannot
be written is a one-line ``QtoolError``. Torch-free, so the edge install (``qtool bench``) can
use it too; ``qtool.checkpoint`` re-exports both functions.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from qtool.errors import QtoolError


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place.

    A destination that is a directory, or a folder that cannot be written, is a one-line
    ``QtoolError`` raised before anything is written."""
    path = Path(path)
    if path.is_dir():
        raise QtoolError(f"cannot write {path}: it is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise QtoolError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode a plain open() would
        os.replace(tmp, path)
    except OSError as exc:  # e.g. the disk filled up: the old file, if any, is untouched
        Path(tmp).unlink(missing_ok=True)
        raise QtoolError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync_directory(folder: Path) -> None:
    """Make the rename itself durable: without this, a power cut can roll the folder back."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a folder; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
