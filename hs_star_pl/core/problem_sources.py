"""Rows of problem sources that the ``datasets`` library reads: parquet, ``save_to_disk``, the Hub.

``problems.load_problems`` reads JSONL itself and hands every other source here:

* a ``.parquet`` file, streamed (rows are read as they are used, nothing is converted into
  the ``datasets`` cache);
* a folder written by ``Dataset.save_to_disk`` (``state.json``) or ``DatasetDict.save_to_disk``
  (``dataset_dict.json``, one subfolder per split), memory-mapped by ``load_from_disk``;
* ``hub:<owner>/<name>``: ``load_dataset(name, dataset_config, split=..., data_files=...)``,
  downloaded into the ``datasets`` cache the first time (later runs can be offline with
  ``HF_DATASETS_OFFLINE=1``). The name must be a Hub id (``hub:../x`` is refused as a path,
  not looked up). With ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` or ``TRANSFORMERS_OFFLINE``
  set, only the cache is read and a miss says so; otherwise the Hub's endpoint (or the proxy
  in front of it) is tried once, with a 5 s timeout, before ``load_dataset``, whose client
  would retry a dead network for about 25 s before saying anything.

Rows come back as ``(index, row)`` with the 0-based index ``dataset[index]`` would use, and
values made plain JSON (a date or other non-JSON value becomes its text) so a problem's
metadata can be written into round artifacts. ``datasets`` is imported here, on first use
only; it does not pull torch.
"""

from __future__ import annotations

import datetime
import decimal
import os
import re
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hs_star_pl.infra.errors import InputFileError
from hs_star_pl.infra.jsonl import why_not_a_file

HUB_PREFIX = "hub:"
"""``problems_file: hub:<owner>/<name>`` names a data set on the Hugging Face Hub."""
SAVED_MARKERS = ("state.json", "dataset_dict.json")
BATCH_ROWS = 1024
NOT_A_SAVED_FOLDER = ("is a directory, not a problem file (a JSONL or parquet file, or a folder written by "
                      "Dataset.save_to_disk, with state.json or dataset_dict.json, is expected)")


class ProblemFileError(InputFileError):
    """A problem source (or one of its rows) cannot be used; the message names it and the row.

    ``line`` is the 1-based line of a JSONL file; ``row`` the 0-based row index of a parquet
    file, arrow folder or hub data set (as ``dataset[row]`` reads it).
    """

    def __init__(self, path: str | Path, line: int | None, message: str, *, row: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}, row {row}" if row is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
        self.row = row
        self.message = message

    def naming(self, group: str) -> ProblemFileError:
        """The same error with its field keys under the config ``group`` (``question_key`` ->
        ``self_training.problem_fields.question_key``): the key a user changes."""
        message = re.sub(r"\bwith (question_key|answer_key|id_key|solution_key)\b", rf"with {group}.\1", self.message)
        return ProblemFileError(self.path, self.line, message, row=self.row)


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready data: containers kept, other non-JSON values as text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    return str(value)


def _one_split(data: Any, split: str | None) -> Any:
    """The split ``split`` of a ``DatasetDict`` (or the only one when unset); a ``Dataset`` as is."""
    if not isinstance(data, Mapping):  # a Dataset / IterableDataset
        if split is not None:
            raise _SourceError(f"holds one data set, not splits; unset split (got {split!r})")
        return data
    names = list(data)
    if split is None:
        if len(names) == 1:
            return data[names[0]]
        raise _SourceError(f"holds the splits {names}; set split to one of them")
    if split not in data:
        raise _SourceError(f"has no split {split!r}; its splits are {names}")
    return data[split]


class _SourceError(ValueError):
    pass


_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
CONNECT_TIMEOUT_S = 5.0


def _check_hub_id(name: str) -> None:
    """Refuse what is not a Hub data set id (``<owner>/<name>`` or ``<name>``), e.g. a path."""
    if not name:
        raise _SourceError(f"names no data set; write {HUB_PREFIX}<owner>/<name>")
    if not _HUB_ID.match(name) or ".." in name or "--" in name or len(name) > 96 * 2 + 1:
        raise _SourceError(
            f"{name!r} is not a Hugging Face Hub data set id (<owner>/<name> or <name>: letters, digits, '-', '_' "
            f"and '.'); for a file or folder on this machine, drop the '{HUB_PREFIX}' prefix"
        )


def _offline_variable() -> str | None:
    """The variable that keeps the Hub's clients offline (``1``, ``true``, ``yes``, ``on``), if one is set."""
    return next((v for v in OFFLINE_VARIABLES if os.environ.get(v, "").strip().upper() in ("1", "TRUE", "YES", "ON")),
                None)


def _unreachable(endpoint: str) -> str | None:
    """Why a TCP connection to ``endpoint`` (or the proxy for it) does not open in time; ``None`` when it does."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme) if not urllib.request.proxy_bypass(host) else None
    if proxy:
        proxied = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or "", proxied.port or 80
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        return f"{type(err).__name__}: {err}" + (f", through the proxy {proxy}" if proxy else "")
    return None


_SAVE_IT = ("download it where there is a network and save it with Dataset.save_to_disk (or as parquet), then point "
            "the problems_file key at that folder or file")


def dataset_rows(
    source: str,
    *,
    split: str | None = None,
    dataset_config: str | None = None,
    data_files: Any = None,
) -> Iterator[tuple[int, Any]]:
    """``(index, row)`` of each row of a parquet file, a ``save_to_disk`` folder or ``hub:<name>``.

    Raises:
        ProblemFileError: the source is missing, is not one of the three, cannot be read by
            ``datasets`` (a corrupt file, an unreachable hub), or names a split it lacks.
    """

    try:
        data = _open(source, split, dataset_config, data_files)
    except _SourceError as err:
        raise ProblemFileError(source, None, str(err)) from None
    iterator = _rows_of(data)
    index = 0
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as err:  # a corrupt file can fail at any batch, not only the first
            raise ProblemFileError(source, None, f"datasets cannot read it from here on: {type(err).__name__}: {err}",
                                   row=index) from None
        yield index, _plain(row) if isinstance(row, Mapping) else row
        index += 1


def _rows_of(data: Any) -> Iterator[Any]:
    """The rows of a ``Dataset``/``IterableDataset`` as dicts, read in batches (iterating a data set
    row by row formats each row on its own: about 20x slower on a 200,000-row pool)."""
    for batch in data.iter(batch_size=BATCH_ROWS):
        columns = list(batch)
        for i in range(len(batch[columns[0]]) if columns else 0):
            yield {c: batch[c][i] for c in columns}


def _open(source: str, split: str | None, dataset_config: str | None, data_files: Any) -> Any:
    import datasets

    if source.startswith(HUB_PREFIX):
        name = source[len(HUB_PREFIX):]
        _check_hub_id(name)
        offline = _offline_variable()
        if offline is None:
            endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
            why = _unreachable(endpoint)
            if why is not None:
                raise _SourceError(
                    f"cannot reach the Hugging Face Hub at {endpoint} ({why}); to read a copy already in the datasets "
                    f"cache, set HF_DATASETS_OFFLINE=1, or {_SAVE_IT}"
                )
        try:
            data = datasets.load_dataset(name, dataset_config, split=split, data_files=data_files)
        except (ConnectionError, OSError) as err:
            if offline is not None:
                raise _SourceError(
                    f"{offline}=1 is set, so nothing is downloaded, and {name!r} is not in the datasets cache "
                    f"({type(err).__name__}: {err}); unset {offline} where there is a network, or {_SAVE_IT}"
                ) from None
            raise _SourceError(
                f"cannot load {name!r} from the Hugging Face Hub ({type(err).__name__}: {err}); the machine may be "
                f"offline: {_SAVE_IT}"
            ) from None
        except Exception as err:  # datasets raises many types for a bad name, config, split or data_files
            raise _SourceError(
                f"datasets.load_dataset({name!r}, dataset_config={dataset_config!r}, split={split!r}, "
                f"data_files={data_files!r}) failed: {type(err).__name__}: {err}"
            ) from None
        return _one_split(data, None)  # with split set, load_dataset gave that split
    if dataset_config is not None or data_files is not None:
        raise _SourceError(f"dataset_config and data_files apply to a {HUB_PREFIX}<name> data set; unset them")
    path = Path(source)
    if path.is_dir():
        if not any((path / m).is_file() for m in SAVED_MARKERS):
            raise _SourceError(NOT_A_SAVED_FOLDER)
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as err:
            raise _SourceError(f"datasets.load_from_disk cannot read it: {type(err).__name__}: {err}") from None
        return _one_split(data, split)
    if not path.is_file():
        raise _SourceError(why_not_a_file(path, "parquet file"))
    if split is not None:
        raise _SourceError(f"is one parquet file, not a data set with splits; unset split (got {split!r})")
    try:
        return datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    except Exception as err:
        raise _SourceError(f"datasets cannot read it as parquet: {type(err).__name__}: {err}") from None
