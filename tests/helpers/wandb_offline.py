"""Read back what an offline W&B run left on disk (``WandbLogger(offline=True)``).

An offline run is a folder ``<save_dir>/wandb/offline-run-<time>-<id>/`` holding:

* ``run-<id>.wandb``: every record the run sent (history rows, summary, files, ...), as
  protocol-buffer ``Record`` messages in a record log: a 7-byte header (``:W&B``, a 2-byte
  magic, a version byte), then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32,
  little-endian 2-byte length, 1-byte type: 1 whole record, 2/3/4 its first/middle/last part);
  a block's tail too short for a header is zero padding. wandb 0.31 reads it only in its Go
  core, so this reads it with its Python protobuf classes;
* ``files/media/images/<key>_<n>_<hash>.png`` and ``files/media/table/<key>_<n>_<hash>.table.json``
  (``{"columns": [...], "data": [[...], ...]}``), named in the history rows.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32 * 1024
_HEADER = 7


def run_dirs(save_dir: Path) -> list[Path]:
    return sorted((Path(save_dir) / "wandb").glob("offline-run-*"))


def records(path: Path) -> Iterator[Any]:
    """Every ``wandb_internal_pb2.Record`` of a ``run-<id>.wandb`` file, in order (CRC-checked)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (starts {data[:7]!r})")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # padding at a block's end
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0:  # zero padding / end of the written part
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += _HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The run's history rows (what ``wandb.log`` got), values decoded from JSON."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def media(run_dir: Path, relative: str) -> Path:
    """A media file named in a history row (``media/images/...``), under the run's ``files/``."""
    return Path(run_dir) / "files" / relative
