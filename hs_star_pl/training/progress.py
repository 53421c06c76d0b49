"""``ProgressLog``: plain progress lines for logs, files and terminals alike.

Lightning's progress bar and the engines' tqdm bars redraw one line with carriage returns:
fine on a terminal, but written to a file (``> run.log``, nohup, SLURM) they are either off or
a wall of ``\\r`` updates. This callback prints a few whole lines instead, through Lightning's
``rank_zero_info`` (the same stream as the rounds' and the evaluation's summaries; rank 0
only):

* at each epoch's start: how many batches it has;
* during training, at most one line every ``every_n_seconds``: batch, mean loss since the
  previous line, tokens/s, and the time left in the epoch at the current speed;
* at each epoch's end: its batches, time and mean loss;
* with self-training on, what runs between epochs (round 0 before the first epoch; after each
  epoch the evaluation of the new policy and the next round's sampling): while this callback
  is part of the run, work that shows no bar (the engine's sampling, a learned PRM's scoring,
  reference log-probs, the evaluation) prints a line at most every ``every_n_seconds``
  (``hs_star_pl.infra.progress.progress``), so a slow machine is not mistaken for a hung one.

It changes nothing in training (no metrics, no randomness).
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from hs_star_pl.infra.progress import format_seconds, set_progress_lines
from hs_star_pl.training.self_training import SelfTrainingCallback


def _loss_value(outputs: Any) -> float | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if loss is None or not hasattr(loss, "detach"):
        return None
    value = float(loss.detach())
    return value if math.isfinite(value) else None


class ProgressLog(L.Callback):
    """Print plain progress lines while training and between epochs.

    Args:
        every_n_seconds: seconds between two lines during an epoch (a line is also printed
            after the first batch of each epoch, to show the speed early).
        enabled: turn the lines off.
    """

    def __init__(self, every_n_seconds: float = 30.0, enabled: bool = True) -> None:
        if not every_n_seconds > 0:
            raise ValueError(f"progress.every_n_seconds must be > 0, got {every_n_seconds}")
        self.every_n_seconds = float(every_n_seconds)
        self.enabled = enabled
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self._epoch_started = time.perf_counter()
        self._last_line = self._epoch_started
        self._batch_started: float | None = None
        self._since_line: list[float] = []
        self._tokens_since_line = 0.0
        self._busy_since_line = 0.0
        self._epoch_losses: list[float] = []
        self._epoch_batches = 0

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _self_training(trainer: L.Trainer) -> bool:
        return any(isinstance(cb, SelfTrainingCallback) and cb.active for cb in trainer.callbacks)

    @staticmethod
    def _epoch_label(trainer: L.Trainer) -> str:
        total = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else "?"
        return f"epoch {trainer.current_epoch + 1}/{total}"

    @staticmethod
    def _n_batches(trainer: L.Trainer) -> int | None:
        n = trainer.num_training_batches
        return int(n) if isinstance(n, (int, float)) and math.isfinite(n) else None

    # -- hooks -----------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # work without a bar (a round's sampling and scoring, reference log-probs, evaluation)
        # prints a line at most every every_n_seconds too (hs_star_pl.infra.progress.progress)
        if self.enabled:
            set_progress_lines(self.every_n_seconds, rank_zero_info)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled:
            set_progress_lines(None)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self._self_training(trainer) and trainer.current_epoch == 0:
            rank_zero_info(
                "progress: self-training starts with round 0 (sampling M_0's responses, scoring, pairs) "
                f"and the evaluation of M_0; a line at least every {format_seconds(self.every_n_seconds)} "
                "while they run"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_epoch()
        if not self.enabled:
            return
        n = self._n_batches(trainer)
        batches = f"{n} batches" if n is not None else "batches"
        rank_zero_info(f"progress: {self._epoch_label(trainer)}: training on {batches}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        self._epoch_batches += 1
        if self._batch_started is not None:
            self._busy_since_line += now - self._batch_started
        if isinstance(batch, dict) and "attention_mask" in batch:
            self._tokens_since_line += float(batch["attention_mask"].sum())
        loss = _loss_value(outputs)
        if loss is not None:
            self._since_line.append(loss)
            self._epoch_losses.append(loss)
        if not self.enabled or (batch_idx > 0 and now - self._last_line < self.every_n_seconds):
            return
        n = self._n_batches(trainer)
        done = batch_idx + 1
        parts = [f"progress: {self._epoch_label(trainer)}, batch {done}/{n if n is not None else '?'}"]
        if self._since_line:
            parts.append(f"loss {sum(self._since_line) / len(self._since_line):.4f}")
        if self._busy_since_line > 0 and self._tokens_since_line:
            parts.append(f"{self._tokens_since_line / self._busy_since_line / 1000:.1f}k tokens/s")
        elapsed = now - self._epoch_started
        parts.append(f"{format_seconds(elapsed)} into the epoch")
        if n is not None and n > done:
            parts.append(f"about {format_seconds(elapsed / done * (n - done))} left in it")
        rank_zero_info(", ".join(parts))
        self._last_line = now
        self._since_line, self._tokens_since_line, self._busy_since_line = [], 0.0, 0.0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        loss = f", mean loss {sum(self._epoch_losses) / len(self._epoch_losses):.4f}" if self._epoch_losses else ""
        line = (f"progress: {self._epoch_label(trainer)} done: {self._epoch_batches} batches in "
                f"{format_seconds(time.perf_counter() - self._epoch_started)}{loss}")
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if self._self_training(trainer) and not last:
            line += "; next: the evaluation of the new policy and the next round's sampling"
        rank_zero_info(line)
