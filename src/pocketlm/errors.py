"""User-facing errors: one line that says what is wrong and how to fix it."""


class PocketError(Exception):
    """An error caused by the user's input. The CLI prints it as one line, without a trace
    (control characters a user's input brought into the message are shown escaped)."""

    def __init__(self, message: str = ""):
        super().__init__(printable(str(message)))


def printable(text: str) -> str:
    """One line whatever the user typed: control characters (newlines, carriage returns, escape
    sequences) are shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def warn(message: str) -> None:
    """A one-line warning on stderr: the input is valid but probably not what the user wants."""
    import sys

    print(f"warning: {message}", file=sys.stderr)
