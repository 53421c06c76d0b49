"""Progress primitives every layer may use: a duration as text, and the bar for work between steps.

``phase_bar`` takes the trainer only to ask whether to show itself; it imports no Lightning.
``training/progress.py`` (``ProgressLog``) prints the whole progress lines built on these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning as L


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
    """
    from tqdm.auto import tqdm

    shown = trainer is not None and trainer.is_global_zero and trainer.progress_bar_callback is not None
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not shown)
