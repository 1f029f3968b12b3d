"""The one exception type users see: a message that says what was wrong and how to fix it."""


class ChargptError(Exception):
    """A user-facing error. The CLI prints it as one line and exits with code 2."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """A third-party exception's message cut to one line, for quoting inside a one-line ChargptError."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]
