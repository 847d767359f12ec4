"""Atomic file writes for the Python side of fastvae: a file appears under its name whole, or
not at all, and a file it replaces stays as it was until then. Used for pictures, metrics and
downloads; model files are not written here (the Rust core writes those, with its own
temporary file and rename)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from typing import BinaryIO, TypeVar

__all__ = ["atomic_write"]

T = TypeVar("T")


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], T]) -> T:
    """Write ``path`` through ``write(f)`` on a temporary file beside it, then rename it.

    Parameters
    ----------
    path : str or os.PathLike
        The file to create or replace.
    write : callable
        Called with a binary file open for writing, a new file in ``path``'s folder; its
        ``name`` is that file's path, so ``write`` can read back and check what it wrote
        (after a flush). An exception from ``write`` leaves ``path`` untouched.

    Returns
    -------
    Whatever ``write`` returned.

    Notes
    -----
    The temporary file is flushed and fsynced before the rename (``os.replace``), so a crash
    leaves the old file or the new one, never a torn one; on any failure, a KeyboardInterrupt
    included, it is removed. The file is created as ``open`` creates files, with permissions
    0o666 less the umask.
    """
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
    # Not inside the try: if the name were taken, that file is not ours to remove.
    f = open(tmp, "xb")
    try:
        with f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return result
