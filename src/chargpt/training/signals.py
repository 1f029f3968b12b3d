"""SIGINT and SIGTERM during training: turned into a flag the loop checks after each step (a second Ctrl-C stops
at once)."""

from __future__ import annotations

import signal
from typing import Any


class Signals:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.caught: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.caught == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now; the last checkpoint_interval state remains
        self.caught = signal.Signals(signum).name

    def __enter__(self) -> Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        if getattr(self._old.get(signal.SIGINT), "caught", False):  # a start-up Ctrl-C that something swallowed
            self.caught = "SIGINT"
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
