"""Who may write an output folder, and how a run takes it over without ever losing the user's files.

A training run holds `OutDir` for its whole life:
- an exclusive lock (`fcntl.flock` on `.chargpt.lock`, which names the holder's pid): a second run on the
  same `--out` stops with a one-line error naming the first. The kernel drops the lock when its process
  dies, however it dies, so a lock file left by `kill -9` is stale by construction and simply taken over.
- ownership: chargpt replaces only files it can prove it wrote. `.chargpt-run` (written when a fresh run
  claims the folder) proves the five run files are chargpt's; a folder from before that marker existed
  counts as chargpt's when its `config.json` says `"format": "chargpt-model"`. Anything else under those
  names is the user's: chargpt refuses the folder and names the files, even with --overwrite.
- overwrite without a window of loss: the old run's files are moved aside into `.chargpt-previous/` (a
  rename each; the folder is named so only once all are in), and stay there until the new run has saved
  something of its own (`saved()`): then they are dropped. If the new run fails before that, they are put
  back. After `kill -9` at any instant the next `chargpt train` on the folder finishes that roll-back (or the
  drop) first, so the folder holds one run, old or new, never a mix. Readers (`sample`, `eval`, `info`,
  `serve`) change nothing: they read the old run where it waits (checkpoint.run_file).
- links: the lock, the marker and the roll-back folders are never opened or moved through a symbolic link; a
  link in their place stops the run with a one-line error, so nothing outside the folder is ever touched.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from chargpt.errors import ChargptError
from chargpt.fileio import DiskFullError, atomic_write_bytes, is_regular_file, read_regular, remove_stale_temps
from chargpt.storage.checkpoint import FORMAT_NAME
from chargpt.storage.layout import BACKUP, CONFIG, DISCARD, LOCK, MARKER, MOVING, RUN_FILES, TRAIN_STATE, WEIGHTS
from chargpt.storage.trainstate import model_without_state

log = logging.getLogger("chargpt.training.outdir")
MARKER_TEXT = json.dumps({"format": "chargpt-run", "files": list(RUN_FILES)}) + "\n"


class OutDir:
    """The output folder of one training run: locked, checked, and (with overwrite) taken over safely.

    Only rank 0 writes the folder; on other ranks every method is a no-op."""

    def __init__(self, out: str | Path, *, resume: bool, overwrite: bool, main: bool = True) -> None:
        self.out = Path(out)
        self.resume, self.overwrite, self.main = resume, overwrite, main
        self.fd: int | None = None
        self.created: Path | None = None  # the outermost folder this run made: a failed run removes it
        self.pending = False  # an old run waits in BACKUP until this run saves something
        self.has_saved = False
        self.wrote_marker = False
        self.fresh = False  # a new run owns the folder's run files (none were there, or they were moved aside)

    def __enter__(self) -> OutDir:
        if not self.main:
            return self
        self._create()
        try:
            check_no_links(self.out)
            self._lock()
            recover(self.out)
            self._take_over()
        except BaseException:
            self._release(failed=True)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if not self.main:
            return
        restored = self.pending and exc is not None
        self._release(failed=exc is not None)
        if not isinstance(exc, ChargptError):
            return
        message = str(exc)
        if isinstance(exc, DiskFullError):
            resumable = (self.out / TRAIN_STATE).is_file() and not restored
            advice = f"then resume with --resume {self.out}" if resumable else "then start the run again"
            message = message.replace("and run again", f"and {advice}", 1)
        if restored:
            message += f"; the previous run in {self.out} is back in place"
        if message != str(exc):
            raise type(exc)(message) from None

    def saved(self) -> None:
        """This run wrote its first model or train state: from now on the folder is this run's."""
        self.has_saved = True
        if self.main and self.pending:
            _drop_backup(self.out)
            self.pending = False

    # --- steps -------------------------------------------------------------------------------

    def _create(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise ChargptError(f"--out {out} is a file, not a folder; choose another --out")
        missing = [p for p in (out, *out.parents) if not p.exists()]
        self.created = missing[-1] if missing else None
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ChargptError(f"cannot write to {out} ({e.strerror}); choose another --out") from None

    def _lock(self) -> None:
        path = self.out / LOCK
        try:
            fd = lock_file(path)
        except Busy as busy:
            who = f"process {busy.holder}" if busy.holder else "another process"
            raise ChargptError(
                f"{self.out} is in use by another chargpt run ({who}); wait for it to finish, stop it, "
                f"or choose another --out"
            ) from None
        except OSError as e:
            raise ChargptError(f"cannot write to {self.out} ({e.strerror}); choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def _take_over(self) -> None:
        out = self.out
        if self.resume:
            return  # a valid train_state.pt (checked when read) proves the folder is a chargpt run
        present = check_new_run(out, self.overwrite)
        if present and not {WEIGHTS, CONFIG, TRAIN_STATE} & set(present):
            # a run stopped before its first save left only its metrics and plot: nothing to keep or resume
            log.info("%s holds only the metrics of a run stopped before its first save; starting afresh", out)
            for name in present:
                (out / name).unlink()
            present = []
        if not (out / MARKER).is_file():
            atomic_write_bytes(out / MARKER, MARKER_TEXT.encode())
            self.wrote_marker = True
        if present:
            _move_aside(out, present)
            self.pending = True
        self.fresh = True  # every run file from now on is this run's

    def _release(self, failed: bool) -> None:
        if self.fd is None:
            self._remove_if_created()
            return
        out = self.out
        try:
            if failed and self.pending:
                _restore_backup(out)
                self.pending = False
            elif failed and self.fresh and not self.has_saved:
                for name in RUN_FILES:  # a fresh run that saved nothing leaves nothing (its metrics, plot)
                    (out / name).unlink(missing_ok=True)
            if failed and not self.has_saved and self.wrote_marker:
                (out / MARKER).unlink(missing_ok=True)
        finally:
            (out / LOCK).unlink(missing_ok=True)
            os.close(self.fd)  # closing drops the flock
            self.fd = None
            if failed:
                self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self.created is None:
            return
        for folder in (self.out, *self.out.parents):  # only empty ones: they hold nothing of anyone's
            try:
                folder.rmdir()
            except OSError:
                return
            if folder == self.created:
                return


def check_new_run(out: Path, overwrite: bool) -> list[str]:
    """The run files a new run in `out` would replace, refused unless they are chargpt's and --overwrite says so
    (called again before any slow set-up, such as sizing, so that a mistake is said at once)."""
    present = [n for n in RUN_FILES if os.path.lexists(out / n)]
    if present and not owned(out):
        raise ChargptError(
            f"{out} holds {', '.join(present)} that chargpt did not write; it never replaces such files, "
            f"even with --overwrite: move them away or choose another --out"
        )
    if {WEIGHTS, CONFIG, TRAIN_STATE} & set(present) and not overwrite:
        kept = model_without_state(out)
        if kept:
            raise ChargptError(f"{kept}; --overwrite would replace it, or choose another --out")
        raise ChargptError(
            f"{out} already holds a model; pass --resume {out} to continue it, --overwrite to replace it, "
            f"or choose another --out"
        )
    return present


class Busy(OSError):
    """Another process holds the lock; holder: its pid, as it wrote it into the lock file (None if unknown)."""

    def __init__(self, holder: int | None):
        super().__init__(errno.EWOULDBLOCK, "locked by another process")
        self.holder = holder


def lock_file(path: Path) -> int:
    """A descriptor holding an exclusive flock on the file at `path` (created if missing), or Busy.

    A holder that finishes removes the lock file while still holding it; a process that opened it just before
    would then lock a file no longer at the path, beside the next process that creates a new one. So the lock
    counts only if the file locked is still the one at the path; otherwise lock the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device in its place: never written to
            os.close(fd)
            raise OSError(errno.EINVAL, "the lock file is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise Busy(holder) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def owned(out: Path) -> bool:
    """Whether the run files in `out` are provably chargpt's: its marker, or a chargpt config.json."""
    if is_regular_file(out / MARKER):
        return True
    path = out / CONFIG
    try:
        if not is_regular_file(path) or path.lstat().st_size > 256 << 20:
            return False
        config = json.loads(read_regular(path, "config", follow=False))
    except (OSError, ValueError, RecursionError, ChargptError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT_NAME


def check_no_links(out: Path) -> None:
    """The lock, marker and roll-back folders must be what chargpt makes, never links it would follow."""
    for name in (LOCK, MARKER, BACKUP, MOVING, DISCARD):
        if (out / name).is_symlink():
            raise ChargptError(
                f"{out / name} is a symbolic link; chargpt never follows links in a model folder: remove it "
                f"(it is not the run's), then run again"
            )


def recover(out: Path) -> None:
    """Finish what a killed overwriting run left half done (call with the lock held; links were refused)."""
    for name in (BACKUP, MOVING, DISCARD):
        if os.path.lexists(out / name) and not (out / name).is_dir():
            raise ChargptError(f"{out / name} is not a folder chargpt made; move it away, then run again")
    if (out / DISCARD).exists():
        shutil.rmtree(out / DISCARD, ignore_errors=True)
    if (out / BACKUP).is_dir():
        _restore_backup(out)
    if (out / MOVING).is_dir():
        _move_back(out)


def _move_aside(out: Path, names: list[str]) -> None:
    moving = out / MOVING
    moving.mkdir(exist_ok=True)
    for name in names:
        os.replace(out / name, moving / name)
    _fsync_dir(moving)
    os.replace(moving, out / BACKUP)  # now complete: the top level is the new run's
    _fsync_dir(out)


def _drop_backup(out: Path) -> None:
    os.replace(out / BACKUP, out / DISCARD)
    _fsync_dir(out)
    shutil.rmtree(out / DISCARD, ignore_errors=True)


def _restore_backup(out: Path) -> None:
    """The new run's files go, then the old run's come back (each step safe to repeat after a kill)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_FILES:  # the new run's half-written files (chargpt's own temp names only)
        remove_stale_temps(out / name)
    os.replace(out / BACKUP, out / MOVING)
    _fsync_dir(out)
    _move_back(out)


def _move_back(out: Path) -> None:
    moving = out / MOVING
    for path in moving.iterdir():
        os.replace(path, out / path.name)
    _fsync_dir(out)
    moving.rmdir()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None
