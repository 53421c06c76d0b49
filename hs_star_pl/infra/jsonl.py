"""Parsing one line of a JSONL input file, with every failure as one sentence.

Shared by the problem loader (``problems``), the training-example loader (``data``) and the
round-artifact reader (``artifacts``), which wrap the sentence in their own error naming
``file:line``. What a line can get wrong, beyond invalid JSON:

* a UTF-8 byte-order mark at the start of the file (editors on Windows write one): skipped;
* bytes that are not UTF-8, including a multi-byte character cut by a truncation;
* an integer literal of more than 4,300 digits: Python's ``json`` raises a plain
  ``ValueError`` (``sys.set_int_max_str_digits``), not ``JSONDecodeError``;
* a lone UTF-16 surrogate written as an escape (``"\\ud800"``): ``json`` decodes it into a
  string that cannot be encoded as UTF-8, so it would load and then break a tokenizer or the
  first artifact write. Refused, naming the field;
* a line over a size limit (``read_lines``): refused while it is read, holding at most the
  limit in memory (a whole 300 MB line used to be read, about 620 MB, before the check).

Stdlib only.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

BOM = b"\xef\xbb\xbf"


class LineError(ValueError):
    """One line of a JSONL file cannot be used; ``str()`` is the reason, without ``file:line``."""


class LongLineError(LineError):
    """A line over ``read_lines``' limit; ``lineno`` says which (``str()``: its size and the limit)."""

    def __init__(self, lineno: int, size: int, limit: int) -> None:
        super().__init__(f"line is {size} bytes, over the {limit}-byte limit")
        self.lineno = lineno


_SKIP_CHUNK = 1 << 20


def read_lines(fh: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` of a file opened in binary, each line at most ``max_bytes``
    (its newline included).

    A longer line is refused as soon as ``max_bytes + 1`` of it are read; the rest of it is
    counted in 1 MiB pieces and dropped, so memory stays bounded by the limit, and the
    message still gives the line's whole size.

    Raises:
        LongLineError: a line over ``max_bytes``.
    """
    lineno = 0
    while raw := fh.readline(max_bytes + 1):
        lineno += 1
        if len(raw) > max_bytes:
            size = len(raw)
            while not raw.endswith(b"\n") and (raw := fh.readline(_SKIP_CHUNK)):
                size += len(raw)
            raise LongLineError(lineno, size, max_bytes)
        yield lineno, raw


def parse_json_line(raw: bytes, lineno: int) -> Any | None:
    """The JSON value of one line (``raw`` as read in binary), or ``None`` for a blank line.

    Raises:
        LineError: not UTF-8, invalid JSON, an over-long integer, or a lone surrogate.
    """
    if lineno == 1 and raw.startswith(BOM):
        raw = raw[len(BOM):]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LineError(f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise LineError(f"invalid JSON: {err.msg} (column {err.colno})") from None
    except ValueError as err:  # an integer over Python's int-to-str digit limit
        if "digits" in str(err):
            raise LineError("invalid JSON: a number has more than 4300 digits") from None
        raise LineError(f"invalid JSON: {err}") from None
    where = find_lone_surrogate(value)
    if where is not None:
        raise LineError(f"{where} holds a lone UTF-16 surrogate (an escape such as \\ud800 with no pair), "
                        "which is not text")
    return value


def find_lone_surrogate(value: Any, where: str = "") -> str | None:
    """Where in a JSON value a string holds a lone surrogate (``field 'question'``), or ``None``."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "the line"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            field = f"field {key!r}" if not where else f"{where}[{key!r}]"
            found = find_lone_surrogate(key, field + " (its name)") or find_lone_surrogate(item, field)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = find_lone_surrogate(item, f"{where or 'the line'}[{i}]")
            if found is not None:
                return found
    return None


def why_not_a_file(path: str | os.PathLike, what: str) -> str:
    """Why ``path`` cannot be opened as a file: a directory, a symlink loop, a broken link, missing.

    ``what`` names the expected file (``problem file``) in the sentence.
    """
    path = Path(path)
    if path.is_dir():
        return f"is a directory, not a {what} (a JSONL file is expected)"
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"is a symbolic link that loops back on itself, not a {what}"
        if path.is_symlink():
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if err.errno == errno.ENOENT:
            return f"no such {what}"
        return f"cannot be read as a {what} ({err.strerror})"
    return f"is not a regular file, not a {what}"
