"""``cpu_trainer``: the Lightning trainer the in-process training tests build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


def cpu_trainer(root: Path | None, **settings: Any) -> L.Trainer:
    """One CPU process writing under ``root``, with no logger, checkpoints, progress bar or
    model summary; ``settings`` add to these or override them (``max_epochs``, ``callbacks``...)."""
    quiet = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False, default_root_dir=root)
    return L.Trainer(**{**quiet, **settings})
