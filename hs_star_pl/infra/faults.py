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

``HS_STAR_SIGNAL=<point>[@<k>]:<SIGNAL>[:group]``
    send ``SIGNAL`` (``SIGTERM``, ``SIGUSR1``...) to this process, or with ``:group`` to its
    whole process group (as SLURM, Kubernetes and ``docker stop`` do), the ``k``-th time it
    reaches ``point``, and carry on: what happens next is the signal handlers' business. Start
    the run in its own process group (``setsid``) before using ``:group``. Besides ``POINTS``
    it takes the points of ``WORKER_POINTS``, reached in worker processes (each counts its own
    occurrences; they are not traced).

Phases: ``begin(phase, **labels)`` marks where a phase of the run starts (``PHASES``:
sampling, answer checks, the reference pass, training, export, evaluation, checkpoint, the
M_0 child; named apart from the points). Traced as ``"event": "begin"`` (the judges of saved and redone work ignore them),
and ``HS_STAR_SIGNAL=<phase>[@k]:<SIGNAL>[:group]`` sends a signal when a phase begins, so
``scripts/soak.py`` can time a stop in each phase. ``HS_STAR_FAULT`` takes points only.

The points are listed in ``POINTS``, ``WORKER_POINTS`` and ``PHASES``. This is a testing hook:
production runs never set the variables. Stdlib only (the pure round modules use it).
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

WORKER_POINTS: dict[str, str] = {
    "worker_task": "a KillablePool worker (an answer check) has taken a task and not answered it yet",
}

PHASES: dict[str, str] = {
    "sampling": "a round's engine call (pre-samples or re-samples) begins",
    "checking": "a round's answer checks and PRM scores of one phase begin",
    "reference_pass": "the pairs' reference log-probs begin",
    "training": "a training epoch's first batch is about to run",
    "exporting": "an HF export begins",
    "evaluating": "a chunk of an evaluation begins (generation and grading of a few problems)",
    "checkpointing": "a checkpoint save begins",
    "m0_child": "the step-wise initialisation child (M_0's training) is started",
}

SIGNAL_ENV = "HS_STAR_SIGNAL"

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


def parse_signal(spec: str) -> tuple[str, int, int, bool]:
    """``"point@k:SIGTERM[:group]"`` -> ``(point, k, signal number, to the group)``; raises naming the variable."""
    where, _, rest = spec.strip().partition(":")
    name, _, group = rest.partition(":")
    if group not in ("", "group"):
        raise ValueError(f"{SIGNAL_ENV}={spec!r}: after the signal only ':group' may follow, got {group!r}")
    signum = getattr(signal, name, None) if name.startswith("SIG") else None
    if not isinstance(signum, signal.Signals):
        raise ValueError(f"{SIGNAL_ENV}={spec!r}: expected <point>[@k]:<SIGNAL>[:group] with a signal name such as SIGTERM")
    point, _, occurrence = where.partition("@")
    if point not in POINTS and point not in WORKER_POINTS and point not in PHASES:
        raise ValueError(f"{SIGNAL_ENV}={spec!r}: unknown point {point!r}; valid: {sorted({**POINTS, **WORKER_POINTS, **PHASES})}")
    if not occurrence.isdigit() and occurrence != "":
        raise ValueError(f"{SIGNAL_ENV}={spec!r}: the occurrence after '@' must be an integer >= 0")
    return point, int(occurrence or 0), int(signum), group == "group"


def _append(path: str, event: dict[str, Any]) -> None:
    line = (json.dumps({**event, "t": round(time.time(), 3)}, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of a short line: lines of several processes never interleave
    finally:
        os.close(fd)


def reach(point: str, **labels: Any) -> None:
    """Mark that this process reached ``point``: trace it, and SIGKILL if ``HS_STAR_FAULT`` asks
    (or send the signal ``HS_STAR_SIGNAL`` asks for)."""
    if point not in POINTS and point not in WORKER_POINTS:
        raise ValueError(f"unknown fault point {point!r}; valid: {sorted({**POINTS, **WORKER_POINTS})}")
    _reached(point, "reach", labels)


def begin(name: str, /, **labels: Any) -> None:
    """Mark that phase ``name`` of the run begins (``PHASES``): trace it, send the signal
    ``HS_STAR_SIGNAL`` asks for."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; valid: {sorted(PHASES)}")
    _reached(name, "begin", labels)


def _reached(point: str, event: str, labels: dict[str, Any]) -> None:
    fault = os.environ.get(FAULT_ENV) if event == "reach" else None
    trace = os.environ.get(TRACE_ENV) if point in POINTS or point in PHASES else None
    send = os.environ.get(SIGNAL_ENV)
    if not fault and not trace and not send:
        return
    k = _counts.get(point, 0)
    _counts[point] = k + 1
    if trace:
        _append(trace, {"event": event, "point": point, "k": k, "pid": os.getpid(), **_scope, **labels})
    if send:
        at, occurrence, signum, group = parse_signal(send)
        if (at, occurrence) == (point, k):
            if group:
                os.killpg(os.getpgrp(), signum)
            else:
                os.kill(os.getpid(), signum)
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
