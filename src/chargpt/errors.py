"""The one exception type users see: a message that says what was wrong and how to fix it; and how a Ctrl-C
becomes an exit."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ChargptError(Exception):
    """A user-facing error. The CLI prints it as one line and exits with code 2."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """A third-party exception's message cut to one line, for quoting inside a one-line ChargptError."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def shorten(value: object, limit: int = 60) -> str:
    """A value for a one-line message: repr (so no raw newlines), cut to `limit` characters.

    Values come from users' files and flags, so they can be megabytes long (a 2M-element TOML array)."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long for str(): Python refuses past 4300 digits
        text = f"<a {type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RememberedInterrupt:
    """The CLI's SIGINT handler until training takes over: raise KeyboardInterrupt at once (a prompt stop), and
    remember it. Python drops a KeyboardInterrupt raised while a finalizer or a callback runs ("Exception ignored
    in ..."), which lost a Ctrl-C during start-up about once in a few hundred runs; training's own handler
    finds this one's memory (`caught`) and stops at its first step instead of running on."""

    def __init__(self) -> None:
        self.caught = False

    def __call__(self, signum: int, frame: object) -> None:
        self.caught = True
        raise KeyboardInterrupt


@contextmanager
def ctrl_c_held() -> Iterator[list[int]]:
    """Ctrl-C held while the block runs, then acted on: KeyboardInterrupt as the block ends (the list it yields
    says whether one came). For torch's imports: they run C++ that calls back into Python, and a KeyboardInterrupt
    raised inside such a callback cannot unwind through the C++ (the process aborted, -6, or ended by SIGINT, -2,
    instead of exiting 130: chargpt.cli.guard). Off the main thread, where signals never arrive, a plain block."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if isinstance(previous, RememberedInterrupt):
            previous.caught = True
        raise KeyboardInterrupt


EXIT_USAGE = 2  # the exit status of a usage error or any other one-line error
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}  # a run stopped by a signal (128 + its number)


def one_line(message: str, limit: int = 2000) -> str:
    """An error message as one line of sane length, whatever a file or flag put into it."""
    line = visible(" ".join(message.split()))
    return line if len(line) <= limit else line[: limit - 3] + "..."


# what a terminal would act on instead of showing: C0/C1 controls (ESC starts colour, title and screen-clearing
# sequences) and the bidirectional overrides that reorder what is shown
_HIDDEN = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c != 0x09}
_HIDDEN |= {c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


_HIDDEN_JSON = {c: f"\\u{c:04x}" for c in _HIDDEN if c >= 0x7F}  # json.dumps escapes the rest itself


def visible_json(text: str) -> str:
    """JSON text (json.dumps's) with the controls it leaves raw escaped too: the same JSON, safe to print."""
    return text.translate(_HIDDEN_JSON)


def visible(text: str) -> str:
    """Text from a file (a model folder's sample, names, vocabulary) made safe to print to a terminal: every
    control character shown as its escape (ESC as \\x1b), tabs kept."""
    return text.translate(_HIDDEN)
