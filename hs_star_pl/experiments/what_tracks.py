"""What the final accuracy tracks across kept runs: problems with a pair, pairs trained, or both.

Reads the kept run summaries (``<study>/<method>/seed_<s>/run.json``, written by
``compare --keep``) of studies that share one task, pool and test set, counts each run once
(a run kept in several studies, e.g. uniform's, is the same run), and fits the final accuracy
by least squares on the problems with a pair and the pairs trained (both summed over the
rounds, in hundreds), with 95% t intervals; then each predictor alone. One row per run: the
seeds' runs of one method are separate points. A slope is a description of these runs, not a
causal effect: methods differ in more than the two counts.

    python -m hs_star_pl.experiments.what_tracks results/tiny/step_matched results/tiny/mislabelling results/tiny/beyond
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hs_star_pl.experiments.compare import KEPT_FILE, load_kept


@dataclass(frozen=True)
class Run:
    """One kept run: its name in the study, seed, final accuracy, problems with a pair and pairs trained (summed)."""

    method: str
    seed: int
    accuracy: float
    problems_with_pairs: int
    pairs: int


def load_runs(studies: Sequence[Path]) -> list[Run]:
    """Every run kept under ``studies``, each once: runs equal in seed, accuracies, pairs and the
    pairs of every problem are one run kept twice (the first name found is kept)."""
    runs, seen = [], set()
    for study in studies:
        files = sorted(Path(study).glob(f"*/seed_*/{KEPT_FILE}"))
        if not files:
            raise SystemExit(f"what_tracks: {study} holds no <method>/seed_<s>/{KEPT_FILE} (a folder written by compare --keep)")
        for path in files:
            r = load_kept(path)
            key = json.dumps([r.seed, r.accuracy, r.pairs, r.problems_with_pairs, r.paired], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            runs.append(Run(path.parent.parent.name, r.seed, float(r.accuracy[-1]),
                            int(sum(r.problems_with_pairs)), int(sum(r.pairs))))
    return runs


@dataclass(frozen=True)
class Fit:
    """A least-squares fit: ``names`` with their coefficients and 95% intervals, R², runs."""

    names: tuple[str, ...]
    coef: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    r2: float
    n: int


def fit(y: Sequence[float], columns: dict[str, Sequence[float]]) -> Fit:
    """Ordinary least squares of ``y`` on an intercept and ``columns``, with t intervals (n - p degrees of freedom).

    >>> f = fit([1.0, 3.0, 5.0, 7.0], {"x": [0.0, 1.0, 2.0, 3.0]})
    >>> [round(c, 6) for c in f.coef], round(f.r2, 6)
    ([1.0, 2.0], 1.0)
    """
    try:
        from scipy.stats import t as student_t
    except ImportError as err:  # pragma: no cover - scipy is in the dev and experiments extras
        raise ImportError("what_tracks' intervals need scipy: pip install 'hs-star-pl[experiments]'") from err
    X = np.column_stack([np.ones(len(y)), *[np.asarray(c, dtype=float) for c in columns.values()]])
    y = np.asarray(y, dtype=float)
    n, p = X.shape
    if n <= p:
        raise SystemExit(f"what_tracks: {n} runs cannot fit {p} coefficients")
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    residual = y - X @ coef
    sigma2 = float(residual @ residual) / (n - p)
    se = np.sqrt(np.diag(sigma2 * np.linalg.pinv(X.T @ X)))
    half = float(student_t.ppf(0.975, n - p)) * se
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(residual @ residual) / total if total > 0 else math.nan
    floats = lambda values: tuple(float(v) for v in values)  # noqa: E731 - plain floats, not numpy scalars
    return Fit(("intercept", *columns), floats(coef), floats(coef - half), floats(coef + half), r2, n)


def report(runs: Sequence[Run]) -> str:
    """The per-method means and the three fits, as Markdown."""
    methods: dict[str, list[Run]] = {}
    for r in runs:
        methods.setdefault(r.method, []).append(r)
    lines = ["| method | runs | final accuracy | problems with a pair | pairs trained |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, rs in sorted(methods.items(), key=lambda kv: np.mean([r.accuracy for r in kv[1]])):
        lines.append(f"| {name} | {len(rs)} | {np.mean([r.accuracy for r in rs]):.3f} | "
                     f"{np.mean([r.problems_with_pairs for r in rs]):.1f} | {np.mean([r.pairs for r in rs]):.1f} |")
    y = [r.accuracy for r in runs]
    problems = [r.problems_with_pairs / 100 for r in runs]
    pairs = [r.pairs / 100 for r in runs]
    lines += ["", "Final accuracy (points) per 100 more, least squares over the runs [95% t CI]:", "",
              "| predictors | per 100 problems with a pair | per 100 pairs trained | R² | runs |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, columns in (("both", {"problems": problems, "pairs": pairs}), ("problems with a pair", {"problems": problems}),
                           ("pairs trained", {"pairs": pairs})):
        f = fit(y, columns)
        cells = []
        for name in ("problems", "pairs"):
            if name in f.names:
                i = f.names.index(name)
                cells.append(f"{100 * f.coef[i]:+.2f} [{100 * f.low[i]:+.2f}, {100 * f.high[i]:+.2f}]")
            else:
                cells.append("")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {f.r2:.2f} | {f.n} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", type=Path, help="kept study folders of one task, pool and test set")
    args = parser.parse_args(argv)
    print(report(load_runs(args.studies)), end="")


if __name__ == "__main__":
    main()
