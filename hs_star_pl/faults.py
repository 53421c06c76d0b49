"""Named fault points: a testing hook that SIGKILLs the process at a chosen place, and a trace.

A self-training run lasts days; the tests and ``scripts/soak.py`` check that a kill anywhere
loses nothing that was finished. Code about to persist a unit of work wraps the write in
``persisting(point, **labels)``; places with nothing to persist (a training step) call
``reach(point, **labels)``. Both do nothing unless one of these environment variables is set:

``HS_STAR_FAULT=<point>[@<k>]``
    SIGKILL this process (no cleanup, no ``finally`` blocks: like a preempted machine) the
    ``k``-th time (0-based, default 0) it reaches ``point``. At a point that persists, the
    kill lands after the work was done and before its result is in place.
``HS_STAR_TRACE=<file>``
    append one JSON line per point reached (``"event": "reach"``) and per write finished
    (``"event": "saved"``): the point, its labels (``iteration``, ``phase``, ``epoch``...),
    the occurrence index ``k``, the process id and the wall-clock time ``t``. A unit of work traced ``saved`` and then
    ``reach``\\ ed again was redone.

The points are listed in ``POINTS``. This is a testing hook: production runs never set the
variables. Stdlib only (the pure round modules use it).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

FAULT_ENV = "HS_STAR_FAULT"
TRACE_ENV = "HS_STAR_TRACE"

POINTS: dict[str, str] = {
    "presample": "a round's pre-samples are generated, their phase file is not written yet",
    "prm": "a phase's rollouts are verified and PRM-scored, the scores are not written yet",
    "resample": "a round's re-samples are generated, their phase file is not written yet",
    "reference_logps": "the pairs' reference log-probs are computed, not written yet",
    "round_write": "a round's artifacts are written, its summary.json and DONE marker are not",
    "training_step": "an optimizer step (one training batch) has finished",
    "checkpoint": "a checkpoint is written to its temporary file, not renamed into place yet",
    "export": "an HF export is written to its temporary folder, not renamed into place yet",
}

_counts: dict[str, int] = {}
_scope: dict[str, Any] = {}


def parse_fault(spec: str) -> tuple[str, int]:
    """``"point@k"`` (or ``"point"``, k=0) -> ``(point, k)``; raises naming the variable."""
    name, _, occurrence = spec.strip().partition("@")
    if name not in POINTS:
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown fault point {name!r}; valid: {sorted(POINTS)}")
    try:
        k = int(occurrence) if occurrence else 0
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={spec!r}: the occurrence after '@' must be an integer") from None
    if k < 0:
        raise ValueError(f"{FAULT_ENV}={spec!r}: the occurrence after '@' must be >= 0")
    return name, k


def _append(path: str, event: dict[str, Any]) -> None:
    line = (json.dumps({**event, "t": round(time.time(), 3)}, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of a short line: lines of several processes never interleave
    finally:
        os.close(fd)


def reach(point: str, **labels: Any) -> None:
    """Mark that this process reached ``point``: trace it, and SIGKILL if ``HS_STAR_FAULT`` asks."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; valid: {sorted(POINTS)}")
    fault = os.environ.get(FAULT_ENV)
    trace = os.environ.get(TRACE_ENV)
    if not fault and not trace:
        return
    k = _counts.get(point, 0)
    _counts[point] = k + 1
    if trace:
        _append(trace, {"event": "reach", "point": point, "k": k, "pid": os.getpid(), **_scope, **labels})
    if fault and parse_fault(fault) == (point, k):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


@contextmanager
def persisting(point: str, **labels: Any) -> Iterator[None]:
    """Wrap the write that persists a unit of work: ``reach`` before it, trace ``saved`` after."""
    reach(point, **labels)
    yield
    trace = os.environ.get(TRACE_ENV)
    if trace:
        _append(trace, {"event": "saved", "point": point, "pid": os.getpid(), **_scope, **labels})


@contextmanager
def scope(**labels: Any) -> Iterator[None]:
    """Add ``labels`` (e.g. ``iteration=3``) to every point reached inside the block."""
    saved = dict(_scope)
    _scope.update(labels)
    try:
        yield
    finally:
        _scope.clear()
        _scope.update(saved)


def read_trace(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The events of a trace file, in the order they were written."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
