"""The one error type users see: a single line that says what is wrong and what to do."""

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class RealignError(Exception):
    """A problem with the user's input or environment, reported as one line (no traceback)."""


def decode_utf8(data: bytes, path: str | os.PathLike, what: str = "") -> str:
    """A user's file's bytes as UTF-8; bytes that are not UTF-8 are a one-line error naming the
    file, the line and the byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RealignError(f"{what + ' ' if what else ''}{path}:{line}: byte {e.start} is not UTF-8; save the file "
                           "as UTF-8") from None


def read_text(path: str | os.PathLike, what: str = "") -> str:
    """A user's text file, decoded as UTF-8 (``decode_utf8``)."""
    return decode_utf8(Path(path).read_bytes(), path, what)


def json_lines(text: str, source: str) -> Iterator[tuple[str, Any]]:
    """(where, value) for each non-empty line of JSONL ``text``, ``where`` being ``SOURCE:LINE`` for
    the caller's own messages; a line that is not JSON is a one-line error naming it."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{source}:{n}", json.loads(line)
        except ValueError as e:
            raise RealignError(f"{source}:{n}: not valid JSON ({e.args[0].split(':')[0]})") from None
