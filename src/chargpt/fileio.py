"""Atomic file writes: a crash at any moment leaves the old file or the new one, never a mix."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from chargpt.errors import ChargptError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(ChargptError):
    """A write failed for lack of space (or a file-size limit); the target file was left untouched."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never a mix."""
    with atomic_writer(path) as f:
        f.write(data)


@contextmanager
def atomic_writer(path: str | Path, reserve: int = 0) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` only when the block ends without an exception.

    For files written in pieces (a token cache of gigabytes). `reserve` bytes are allocated up front
    where the filesystem supports it, so a full disk is reported before the work, not after it.
    """
    path = Path(path)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # like a normally created file, not mkstemp's 0600
        if reserve > 0:
            _reserve(fd, reserve)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            raise DiskFullError(
                f"disk full while writing {path} ({e.strerror}); free some space and resume (the old file is intact)"
            ) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _reserve(fd: int, size: int) -> None:
    fallocate = getattr(os, "posix_fallocate", None)  # not on macOS
    if fallocate is None:
        return
    try:
        fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise
        # EOPNOTSUPP, EINVAL...: this filesystem cannot reserve; the writes will report a full disk


def _remove_stale_temps(path: Path) -> None:
    """Temp files of `path` left by a process killed mid-write; one writer per directory, so none is in use."""
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return  # mkstemp below reports the real problem
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            try:
                os.unlink(path.parent / name)
            except OSError:
                pass
