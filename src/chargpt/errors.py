"""The one exception type users see: a message that says what was wrong and how to fix it."""


class ChargptError(Exception):
    """A user-facing error. The CLI prints it as one line and exits with code 2."""
