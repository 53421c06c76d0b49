"""The self-training loop's plots: ``difficulty.png`` per round and ``rounds/accuracy.png``.

Written by ``SelfTrainingCallback`` on rank 0 when ``self_training.plots`` is on. matplotlib is
optional (extra ``[plots]``): without it nothing is drawn and the run goes on. Each image is
written to a temporary name and renamed, so a killed run never leaves half a PNG.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hs_star_pl.core.rounds import RoundResult

log = logging.getLogger(__name__)
CLASS_COLORS = {"inlier": "tab:green", "boundary": "tab:orange", "outlier": "tab:red"}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plots (pip install hs-star-pl[plots])")
        return None
    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)


def plot_history(directory: Path, summaries: Sequence[dict[str, Any]]) -> None:
    """``directory/accuracy.png``: pre-sample accuracy and class counts by iteration (from rounds' ``summary.json``)."""
    plt = _pyplot()
    if plt is None or not summaries:
        return
    rows = sorted(summaries, key=lambda h: h["iteration"])
    its = [h["iteration"] for h in rows]
    fig, (ax_acc, ax_cls) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(its, [h["presample_accuracy"] for h in rows], marker="o")
    ax_acc.set(xlabel="iteration", ylabel="pre-sample accuracy", title="policy M_t on its round's problems", ylim=(0, 1))
    for cls, color in CLASS_COLORS.items():
        ax_cls.plot(its, [h[f"n_{cls}"] for h in rows], marker="o", color=color, label=cls)
    ax_cls.set(xlabel="iteration", ylabel="problems", title="difficulty classes")
    ax_cls.legend(fontsize=8)
    for ax in (ax_acc, ax_cls):
        ax.set_xticks(its)
    fig.tight_layout()
    _save(fig, directory / "accuracy.png")
    plt.close(fig)


def plot_round(directory: Path, result: RoundResult) -> None:
    """``directory/difficulty.png``: phi_a and phi_r of every problem, coloured by class."""
    plt = _pyplot()
    if plt is None:
        return
    fig, (ax_scatter, ax_hist) = plt.subplots(1, 2, figsize=(10, 4))
    for cls, color in CLASS_COLORS.items():
        pts = [d for d in result.difficulties.values() if d.difficulty.value == cls]
        xs = [d.phi_a for d in pts if d.phi_a is not None and d.phi_r is not None]
        ys = [d.phi_r for d in pts if d.phi_a is not None and d.phi_r is not None]
        ax_scatter.scatter(xs, ys, s=12, alpha=0.6, color=color, label=f"{cls} ({len(pts)})")
        ax_hist.hist([d.phi_r for d in pts if d.phi_r is not None], bins=20, range=(0, 1), alpha=0.6, color=color, label=cls)
    for tau in (result.thresholds.tau_low, result.thresholds.tau_high):
        ax_scatter.axhline(tau, color="grey", lw=0.8, ls="--")
        ax_hist.axvline(tau, color="grey", lw=0.8, ls="--")
    ax_scatter.set(xlabel="phi_a (pre-sample accuracy)", ylabel="phi_r (mean min-step PRM score)", title=f"round {result.iteration}")
    ax_hist.set(xlabel="phi_r", ylabel="problems", title="phi_r by class")
    ax_scatter.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, directory / "difficulty.png")
    plt.close(fig)
