"""The process around a command: Ctrl-C held while torch is imported, a stderr that outlives its reader, a stdout
that cannot fail at exit."""

from __future__ import annotations

import errno
import importlib
import io
import os
import sys
from typing import Any

from chargpt.errors import ctrl_c_held

# torch, and the command's own modules, which import parts of torch (serve's also pydantic's native core)
HEAVY_MODULES = {
    "train": ("torch", "chargpt.training.loop"),
    "sample": ("torch", "chargpt.inference.generate", "chargpt.storage.checkpoint"),
    "eval": ("torch", "chargpt.inference.evaluate", "chargpt.storage.checkpoint"),
    "info": ("torch", "chargpt.storage.checkpoint", "chargpt.storage.runs"),
    "serve": ("torch", "chargpt.serve"),
    "export": ("torch", "chargpt.storage.checkpoint"),
}


def import_holding_ctrl_c(command: str) -> None:
    """Import the command's heavy modules with Ctrl-C held until they are loaded, then act on it.

    torch's import runs C++ that calls back into Python; a KeyboardInterrupt raised inside such a callback
    cannot unwind through the C++: the process aborted ("terminate called after throwing an instance of
    'pybind11::error_already_set'", exit -6) or killed itself with SIGINT at exit (-2) instead of printing
    "interrupted" and exiting 130 (tests/test_cli_failures.py sends Ctrl-C at points through the import). Held
    for torch's imports only (train's optimizer holds it again for torch._dynamo, which torch.optim imports);
    later imports (matplotlib) are Python that a KeyboardInterrupt unwinds cleanly, and Ctrl-C stays prompt there.
    A Ctrl-C that came during one module's import acts when that one is loaded, before the next. A module that
    cannot be imported is left to the command, which says what to install."""
    with ctrl_c_held() as caught:
        try:
            for name in HEAVY_MODULES.get(command, ()):
                importlib.import_module(name)
                if caught:  # the module being imported when Ctrl-C came is loaded: stop now, not after the rest
                    break
        except Exception:  # the command imports it again, and reports it its own way
            pass


class Tolerant(io.TextIOBase):
    """stderr that stops writing, silently, once its reader has gone (a closed pipe, a closed descriptor): the
    messages and the progress bar are for a person watching; the run's results are in its files."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        if self.stream is not None:
            try:
                self.stream.write(text)
            except (OSError, ValueError):
                self.stream = None
        return len(text)

    def flush(self) -> None:
        if self.stream is not None:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.stream = None

    def isatty(self) -> bool:
        try:
            return self.stream is not None and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        if self.stream is None:
            raise OSError(errno.EBADF, "stderr is closed")
        return self.stream.fileno()

    @property
    def buffer(self) -> Any:  # the --nproc launcher relays torchrun's bytes here (and handles a failed write)
        return getattr(self.stream, "buffer", None)

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", None) or "utf-8"


def quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of a broken stdout cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
