"""Progress primitives every layer may use: a duration as text, and the bar for work between steps.

``phase_bar`` takes the trainer only to ask whether to show itself; it imports no Lightning.
``training/progress.py`` (``ProgressLog``) prints the whole progress lines built on these.

Work that shows no bar (``enable_progress_bar: false``, an engine's ``progress: false``, a log
file) still reports itself when a run asked for time-based lines (``set_progress_lines``, which
``ProgressLog`` calls for its run): :func:`progress` then gives an object with tqdm's
``update``/``close`` that prints one whole line at most every ``every_n_seconds`` (none for work
shorter than that), so every phase of a round and of an evaluation shows it is alive.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning as L

_lines: dict = {"every": None, "emit": print}


def set_progress_lines(every_n_seconds: float | None, emit: Callable[[str], None] | None = None) -> None:
    """Print time-based lines for work without a bar, at most one every ``every_n_seconds``
    (``None``: none), through ``emit`` (default ``print``)."""
    _lines["every"] = every_n_seconds
    _lines["emit"] = emit or print


class TimedLines:
    """tqdm's ``update``/``close``/``with`` interface, printing ``progress: <desc>: 120/300 <unit>s,
    <elapsed>, about <left> left`` at most every ``every`` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float, emit: Callable[[str], None]) -> None:
        self.total, self.desc, self.unit, self.every, self.emit = total, desc, unit, every, emit
        self.n = 0
        self.started = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        elapsed = now - self.started
        line = f"progress: {self.desc}: {self.n}/{self.total if self.total is not None else '?'} {self.unit}s, {format_seconds(elapsed)}"
        if self.total and 0 < self.n < self.total:
            line += f", about {format_seconds(elapsed / self.n * (self.total - self.n))} left"
        self.emit(line)
        self.last = now

    def close(self) -> None:
        pass

    def __enter__(self) -> TimedLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str, shown: bool):
    """A tqdm bar when ``shown``; otherwise time-based lines when the run asked for them
    (``set_progress_lines``); otherwise a silent one. Each has ``update(n)`` and ``close()``."""
    from tqdm.auto import tqdm

    if not shown and _lines["every"]:
        return TimedLines(total, desc, unit, _lines["every"], _lines["emit"])
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not shown)


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m05s``; ``9.4`` -> ``9s``."""
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def phase_bar(trainer: L.Trainer | None, total: int, desc: str, unit: str):
    """A tqdm bar for work the trainer does between training steps (reference log-probs, evaluation).

    Shown like Lightning's own bar: on rank 0, when ``trainer.enable_progress_bar`` is on
    (no trainer: off). It is cleared when done (``leave=False``), as the engines' and PRMs' are.
    Without the bar, rank 0 prints time-based lines when the run asked for them (``progress``).
    """
    if trainer is None or not trainer.is_global_zero:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=True)
    return progress(total, desc, unit, shown=trainer.progress_bar_callback is not None)
