"""User-facing errors: one line that says what is wrong and how to fix it."""


class PocketError(Exception):
    """An error caused by the user's input. The CLI prints it as one line, without a trace."""
