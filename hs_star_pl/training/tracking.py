"""What the run's experiment trackers (``trainer.logger``) get besides ``LightningModule.log``.

The callbacks and the data module have numbers, figures and examples that are not a training
step's metric: a round's counts and timings (``round/*``), the data module's example counts
(``data/*``), the evaluation's accuracies (``eval/*``), the round's difficulty plot and the
run's accuracy plot, and a few of a round's DPO pairs. Each goes to every configured logger
through one function here, on rank 0 only, at the step given (the trainer's global step by
default):

* ``log_to_loggers``: scalars, through each logger's ``log_metrics`` (every logger takes them);
* ``log_image_file``: a PNG the run already wrote to its folder; TensorBoard gets it with
  ``add_image``, W&B with ``log_image``; other loggers (CSV) have no place for images and skip it;
* ``log_pairs_table``: rows of ``pair_rows`` (a round's pairs) or ``eval_sample_rows`` (a few
  evaluation responses per benchmark and policy); W&B gets a table (``log_table``), TensorBoard
  a markdown table (``add_text``); other loggers skip it.

Nothing here imports TensorBoard or W&B: a logger is recognised by its Lightning class, and
only a configured logger's own methods are called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

PAIR_COLUMNS = ("problem_id", "question", "chosen", "chosen_score", "rejected", "rejected_score")
"""The columns of a round's pairs table."""
PAIRS_PER_ROUND = 8
"""How many of a round's pairs the table shows (spread evenly over the round's list)."""
EVAL_COLUMNS = ("problem_id", "question", "gold", "response", "answer", "correct", "accuracy")
"""The columns of an evaluation's samples table (one per benchmark and evaluated policy)."""
EVAL_SAMPLES = 8
"""How many of a benchmark's problems that table shows (spread evenly over the benchmark)."""


def _step(trainer: L.Trainer, step: int | None) -> int:
    return trainer.global_step if step is None else int(step)


def log_to_loggers(trainer: L.Trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log ``metrics`` to every logger of ``trainer`` at ``step`` (default: the global step); rank 0 only.

    A ``None`` value (a number that could not be computed) is left out.
    """
    values = {k: float(v) for k, v in metrics.items() if v is not None}
    if not trainer.is_global_zero or not values:
        return
    for logger in trainer.loggers:
        logger.log_metrics(values, step=_step(trainer, step))


def log_image_file(trainer: L.Trainer, key: str, path: Path, step: int | None = None) -> None:
    """Log the PNG at ``path`` as the image ``key``: TensorBoard and W&B; other loggers skip it.

    Nothing is logged when the file is not there (``self_training.plots: false``, or no
    matplotlib). Rank 0 only.
    """
    path = Path(path)
    if not trainer.is_global_zero or not path.is_file():
        return
    step = _step(trainer, step)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, _read_png(path), global_step=step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step)


def _read_png(path: Path):
    """``(H, W, 3)`` uint8 pixels of a PNG (Pillow comes with matplotlib, which wrote it)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def excerpt(text: str, limit: int) -> str:
    """``text`` on one line, at most about ``limit`` characters: its head and tail around `` … ``.

    A response's tail holds its final answer, so a long one keeps both ends.
    """
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    half = max(1, (limit - 3) // 2)
    return f"{flat[:half]} … {flat[-half:]}"


def pair_rows(pairs: Sequence[Any], questions: Mapping[str, str], n: int = PAIRS_PER_ROUND) -> list[dict[str, Any]]:
    """Up to ``n`` of ``pairs`` (``PreferencePair``), spread evenly over the list, as table rows.

    Each row: the problem id, an excerpt of its question (from ``questions``, by problem id;
    the rendered prompt when missing), excerpts of the chosen and rejected responses and their
    PRM scores (``None`` when unscored). Deterministic: the same round gives the same rows.
    """
    if not pairs or n < 1:
        return []
    picked = [pairs[i * len(pairs) // min(n, len(pairs))] for i in range(min(n, len(pairs)))]
    return [{
        "problem_id": p.problem_id,
        "question": excerpt(questions.get(p.problem_id, p.prompt), 100),
        "chosen": excerpt(p.chosen, 160),
        "chosen_score": None if p.chosen_score is None else round(float(p.chosen_score), 4),
        "rejected": excerpt(p.rejected, 160),
        "rejected_score": None if p.rejected_score is None else round(float(p.rejected_score), 4),
    } for p in picked]


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = PAIR_COLUMNS) -> str:
    """``rows`` as a markdown table (``|`` in a cell escaped, ``None`` shown as ``-``)."""
    def cell(value: Any) -> str:
        return "-" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def eval_sample_rows(rows: Sequence[Mapping[str, Any]], n: int = EVAL_SAMPLES) -> list[dict[str, Any]]:
    """Up to ``n`` problems of an evaluation's rows (``evaluation.protocol.grade``), spread evenly
    over the benchmark, as table rows: the question, the gold, the first response (an excerpt),
    its extracted answer and verdict, and the problem's accuracy over its samples."""
    if not rows or n < 1:
        return []
    picked = [rows[i * len(rows) // min(n, len(rows))] for i in range(min(n, len(rows)))]
    return [{
        "problem_id": r["problem_id"],
        "question": excerpt(str(r["question"]), 100),
        "gold": str(r["gold"]),
        "response": excerpt(r["responses"][0], 200) if r["responses"] else "",
        "answer": None if not r["answers"] or r["answers"][0] is None else str(r["answers"][0]),
        "correct": None if not r["correct"] else r["correct"][0],
        "accuracy": round(float(r["accuracy"]), 4),
    } for r in picked]


def log_pairs_table(trainer: L.Trainer, key: str, rows: Sequence[Mapping[str, Any]], step: int | None = None,
                    columns: Sequence[str] = PAIR_COLUMNS) -> None:
    """Log ``rows`` (``pair_rows``, or ``eval_sample_rows`` with ``EVAL_COLUMNS``) as the table
    ``key``: W&B ``log_table``, TensorBoard ``add_text`` (markdown); other loggers skip it.
    Nothing is logged for no rows. Rank 0 only."""
    if not trainer.is_global_zero or not rows:
        return
    step = _step(trainer, step)
    columns = list(columns)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, markdown_table(rows, columns), global_step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=columns, data=[[row.get(c) for c in columns] for row in rows], step=step)
