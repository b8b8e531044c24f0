"""The one error type users see: a single line that says what is wrong and what to do."""

import os
from pathlib import Path


class RealignError(Exception):
    """A problem with the user's input or environment, reported as one line (no traceback)."""


def read_text(path: str | os.PathLike, what: str = "") -> str:
    """A user's text file, decoded as UTF-8; bytes that are not UTF-8 are a one-line error naming
    the file, the line and the byte offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RealignError(f"{what + ' ' if what else ''}{path}:{line}: byte {e.start} is not UTF-8; save the file "
                           "as UTF-8") from None
