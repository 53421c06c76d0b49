"""The run's plots: ``difficulty.png`` per round, ``rounds/accuracy.png`` and ``results.png``.

``results.png`` (held-out accuracy of M_0..M_T per benchmark, and the pairs each iteration
trained on) is drawn by ``EvaluationCallback`` beside ``results.md``; the round plots by
``SelfTrainingCallback``, on rank 0 when ``self_training.plots`` is on. matplotlib is
optional (extra ``[plots]``): without it nothing is drawn and the run goes on. Each image is
written to a temporary name and renamed, so a killed run never leaves half a PNG.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
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
    ax_acc.set(xlabel="round t (policy M_t)", ylabel="pre-sample accuracy",
               title="M_t's pre-sample accuracy on round t's training problems\n(not held out: see results.png)", ylim=(0, 1))
    for cls, color in CLASS_COLORS.items():
        ax_cls.plot(its, [h[f"n_{cls}"] for h in rows], marker="o", color=color, label=cls)
    ax_cls.set(xlabel="round t", ylabel="problems", title="round t's problems by difficulty class")
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
        # problems with the same (phi_a, phi_r) are one point whose area grows with their count
        # (n_p pre-samples allow few values: 168 outliers at (0, 0) were one dot)
        counts = Counter((d.phi_a, d.phi_r) for d in pts if d.phi_a is not None and d.phi_r is not None)
        xs, ys = [x for x, _ in counts], [y for _, y in counts]
        sizes = [point_area(n) for n in counts.values()]
        ax_scatter.scatter(xs, ys, s=sizes, alpha=0.5, color=color, edgecolors="none", label=f"{cls} ({len(pts)})")
        ax_hist.hist([d.phi_r for d in pts if d.phi_r is not None], bins=20, range=(0, 1), alpha=0.6, color=color, label=cls)
    for tau in (result.thresholds.tau_low, result.thresholds.tau_high):
        ax_scatter.axhline(tau, color="grey", lw=0.8, ls="--")
        ax_hist.axvline(tau, color="grey", lw=0.8, ls="--")
    ax_scatter.set(xlabel="phi_a (pre-sample accuracy)", ylabel="phi_r (mean min-step PRM score)",
                   title=f"round {result.iteration}: each problem's difficulty (area: problems)")
    ax_hist.set(xlabel="phi_r", ylabel="problems", title=f"round {result.iteration}: phi_r by class")
    legend = ax_scatter.legend(fontsize=8)
    for handle in getattr(legend, "legend_handles", None) or getattr(legend, "legendHandles", []):
        handle.set_sizes([20])  # one marker size in the legend, whatever the first point's count
    fig.tight_layout()
    _save(fig, directory / "difficulty.png")
    plt.close(fig)


def point_area(n: int) -> float:
    """Marker area of a point standing for ``n`` problems: 12 for one, growing with ``n``
    (area ~ n up to 10, then ~ sqrt(n), so one crowded point does not cover the plot)."""
    return 12.0 * (n if n <= 10 else 10 * math.sqrt(n / 10))


def plot_results(path: Path, entries: Sequence[Mapping[str, Any]]) -> bool:
    """``path`` (``results.png``): the held-out accuracy of M_0..M_T on each benchmark (the
    numbers of ``results.md``) and the pairs each iteration trained on. ``entries`` are
    ``eval/results.json`` entries; only those of the run's own policies (``kind: iteration``)
    are drawn. Returns whether a file was written (no matplotlib, or no such entry: none)."""
    rows = sorted((e for e in entries if e.get("kind") == "iteration"), key=lambda e: e["policy"])
    plt = _pyplot() if rows else None
    if plt is None:
        return False
    policies = [e["policy"] for e in rows]
    names: list[str] = []
    for e in rows:
        names += [n for n in e["benchmarks"] if n not in names]
    fig, (ax_acc, ax_pairs) = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        got = [(e["policy"], e["benchmarks"][name]) for e in rows if name in e["benchmarks"]]
        metric = got[0][1].get("metric", "acc")
        ax_acc.plot([t for t, _ in got], [100 * s["accuracy"] for t, s in got], marker="o", label=f"{name} ({metric})")
    if len(names) > 1 and all(e.get("average") is not None for e in rows):
        ax_acc.plot(policies, [100 * e["average"] for e in rows], marker="s", color="black", ls="--", label="average")
    ax_acc.set(xlabel="policy M_t", ylabel="held-out accuracy (%)", title="held-out accuracy of M_t per benchmark",
               ylim=(0, 100))
    ax_acc.set_xticks(policies, [f"M_{t}" for t in policies])
    ax_acc.legend(fontsize=8)
    trained = [(e["policy"], e["n_pairs"]) for e in rows if e.get("n_pairs") is not None]
    ax_pairs.bar([f"M_{t - 1}->M_{t}" for t, _ in trained], [n for _, n in trained], color="tab:blue")
    ax_pairs.set(xlabel="iteration (M_t -> M_t+1)", ylabel="DPO pairs", title="pairs each iteration trained on")
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)
    return True
