"""Atomic file writes (a crash at any moment leaves the old file or the new one, never a mix), and safe reads
of paths users give (regular files only: a FIFO would block forever, /dev/zero would fill the memory)."""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from chargpt.errors import ChargptError

GIB = 1 << 30
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(ChargptError):
    """A write failed for lack of space (or a file-size limit); the target file was left untouched. Whoever
    knows whether there is something to resume words the advice."""


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
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path) + f"{os.getpid()}-", suffix=".tmp", dir=path.parent)
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
        if isinstance(e, IsADirectoryError):
            raise ChargptError(f"{path} is a folder where chargpt writes a file; move it away and run again") from None
        if isinstance(e, OSError) and e.errno == errno.EFBIG:
            raise DiskFullError(
                f"{path} would be larger than this process may write (a file-size limit: ulimit -f); raise the "
                f"limit and run again (the old file is intact)"
            ) from None
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            raise DiskFullError(
                f"disk full while writing {path} ({e.strerror}); free some space and run again (the old file is intact)"
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


def _temp_prefix(path: Path) -> str:
    """Where chargpt writes `path` first: `.NAME.chargpt-PID-RANDOM.tmp`, a name that says whose it is."""
    return f".{path.name}.chargpt-"


def remove_stale_temps(path: Path) -> None:
    """Temp files of `path` that chargpt left when killed mid-write: only names of the form `_temp_prefix` gives,
    regular files, whose writing process is gone. Any other file (the user's `.NAME.x.tmp`) is left alone."""
    pattern = re.compile(re.escape(_temp_prefix(path)) + r"(\d+)-[A-Za-z0-9_]+\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return  # mkstemp below reports the real problem
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            if stat.S_ISREG(os.lstat(path.parent / name).st_mode):
                os.unlink(path.parent / name)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's process, or not a pid at all: leave its file alone
    return True


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device")):
        if test(mode):
            return name
    return "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "a special file"


def is_regular_file(path: str | Path) -> bool:
    """Whether `path` is itself a regular file (a link to one is not)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def check_regular(path: str | Path, what: str, limit: int | None = None, follow: bool = True) -> int:
    """The size of `path` if it is a regular file (after symlinks; with follow=False a link is refused) of at
    most `limit` bytes, else a one-line error. Checked before opening: opening a FIFO blocks, and reading
    /dev/zero never ends."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        raise ChargptError(f"{what} {path} does not exist; check the path") from None
    except OSError as e:
        raise ChargptError(f"cannot read {what} {path} ({e.strerror}); check the path and permissions") from None
    if stat.S_ISLNK(st.st_mode):
        raise ChargptError(
            f"{what} {path} is a symbolic link; chargpt never follows links inside a model folder: put the file "
            f"itself there"
        )
    if not stat.S_ISREG(st.st_mode):
        raise ChargptError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file; pass a regular file")
    if limit is not None and st.st_size > limit:
        raise ChargptError(
            f"{what} {path} is {st.st_size / GIB:.1f} GiB, more than the {limit / GIB:.1f} GiB such a file can be; "
            f"it is not what chargpt expects here"
        )
    return st.st_size


def read_regular(path: str | Path, what: str, limit: int | None = None, follow: bool = True) -> bytes:
    """Read a regular file (see check_regular) with one-line errors. O_NONBLOCK: if the path is swapped for a
    FIFO between the check and the open, the open does not hang, and fstat refuses it (O_NOFOLLOW likewise
    for a link, with follow=False)."""
    check_regular(path, what, limit, follow)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ChargptError(f"cannot read {what} {path} ({e.strerror}); check the path and permissions") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (limit is not None and st.st_size > limit):
            raise ChargptError(f"{what} {path} changed while being opened; try again")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except IsADirectoryError:
        raise ChargptError(f"{what} {path} is a directory, not a regular file; pass a regular file") from None
    except OSError as e:
        raise ChargptError(f"cannot read {what} {path} ({e.strerror}); check the path and permissions") from None
    finally:
        os.close(fd)


def cache_dir() -> Path:
    """chargpt's folder in the user's cache ($XDG_CACHE_HOME/chargpt, else ~/.cache/chargpt): the converted plays,
    token caches, the machine's measurements."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "chargpt"
