"""The one way nps replaces a file: write a temporary file beside it, fsync it, rename it over the target, fsync
the folder. A reader (or a crash, or a full disk) sees the old file or the whole new one, never half of either,
and after the rename returns the new file survives a power loss (the rename is in the folder, so the folder is
synced too).

:func:`atomic_path` gives the temporary path to writers that want a path (``torch.save``, ONNX, pyarrow, HDF5);
:func:`write_atomic` writes bytes through it. Both name the file meant, not the temporary one, in an error.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def fsync_path(path: str | os.PathLike, *, directory: bool = False) -> None:
    """fsync a file (or a folder: its entries) by path; a filesystem that cannot sync a folder is let be."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some filesystems (and Windows) refuse a directory fsync: the file's own sync stands
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mkdir: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on a clean exit it is synced and renamed to ``path`` (and the
    folder synced), on an error removed, leaving ``path`` as it was."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent, directory=True)
    except OSError as exc:  # name the file meant, not the temporary one (a full disk's message says where)
        if exc.filename == str(tmp) or exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` to ``path`` through :func:`atomic_path`: never a half-written file at ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)
