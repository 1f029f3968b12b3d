"""The one exception type users see: a message that says what was wrong and how to fix it."""


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
