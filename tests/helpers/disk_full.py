"""``python -m tests.helpers.disk_full <hs-star args>``: hs-star with the disk filled at a fault point.

``HS_STAR_FILL_AT=<point>@<k>`` names a fault point of ``hs_star_pl.infra.faults`` (the same
spelling as ``HS_STAR_FAULT``); when the process reaches it for the ``k``-th time, the file
``HS_STAR_FILL_FILE`` is written until the file system holding it is full. The writes that
follow fail as they would on a full disk (``ENOSPC`` from the kernel, through Python, torch
and safetensors alike), which is what the full-disk tests need: a small tmpfs holds the run
(``tests/helpers/small_disk.py``). Test-only: the package never reads these variables.
"""

from __future__ import annotations

import errno
import os
import sys

from hs_star_pl.infra import faults

FILL_AT = "HS_STAR_FILL_AT"
FILL_FILE = "HS_STAR_FILL_FILE"


def fill(path: str) -> int:
    """Append zeros to ``path`` until the file system is full; returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            while True:
                try:
                    written += os.write(fd, block)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


def install(spec: str, path: str) -> None:
    point, k = faults.parse_fault(spec)
    reach = faults.reach
    seen = {"n": 0}

    def reach_then_fill(name: str, /, **labels) -> None:  # labels may include "name"
        reach(name, **labels)
        if name == point:
            if seen["n"] == k:
                fill(path)
            seen["n"] += 1

    faults.reach = reach_then_fill  # persisting() and every caller look it up at call time


if __name__ == "__main__":
    install(os.environ[FILL_AT], os.environ[FILL_FILE])
    from hs_star_pl.cli import main

    main(sys.argv[1:])
