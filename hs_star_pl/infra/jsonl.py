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
  first artifact write. Refused, naming the field.

Stdlib only.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

BOM = b"\xef\xbb\xbf"


class LineError(ValueError):
    """One line of a JSONL file cannot be used; ``str()`` is the reason, without ``file:line``."""


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
