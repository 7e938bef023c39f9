"""What the command line tells a user who asked for something it cannot do."""
from __future__ import annotations


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."
