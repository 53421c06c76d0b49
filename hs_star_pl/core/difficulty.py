"""Difficulty estimation from pre-samples (HS-STaR step 3).

For each problem, from its ``n_presample`` scored responses:

* ``phi_a`` = mean correctness over the responses that could be graded;
* ``phi_r`` = mean over responses of the response's process reward (minimum step score).

Classes (``mode="reward_guided"``, the paper): *inlier* (too easy) if ``phi_a == 1`` and
``phi_r > tau_high``; *outlier* (too hard) if ``phi_a == 0`` and ``phi_r < tau_low``; else
*boundary*. Both inequalities are strict. The paper's ablations, which the reference code
cannot run: ``accuracy_only`` (inlier iff ``phi_a == 1``, outlier iff ``phi_a == 0``) and
``reward_only`` (inlier iff ``phi_r > tau_high``, outlier iff ``phi_r < tau_low``).

Ungradeable responses (verdict ``None``: the check timed out or found no answer it could
parse) are left out of ``phi_a``'s numerator *and* denominator: they are neither right nor
wrong. Responses with no steps are likewise left out of ``phi_r``. When a signal is missing
altogether (``None``), any condition that needs it is false, so the problem lands in the
boundary: "we could not tell" never counts as "too easy" or "too hard".

Thresholds come from config (per PRM: a PRM's scores live on its own scale) or are
calibrated per round from quantiles of the observed ``phi_r`` (``calibration``), where the
reference code hard-codes a table per (policy, PRM) pair and raises for anything else.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from hs_star_pl.infra.errors import check_positive_int
from hs_star_pl.core.records import Difficulty, ProblemDifficulty, ScoredRollout, mean_or_none

DifficultyMode = Literal["reward_guided", "accuracy_only", "reward_only"]
MODES: tuple[str, ...] = ("reward_guided", "accuracy_only", "reward_only")


@dataclass(frozen=True)
class DifficultyThresholds:
    """PRM thresholds ``tau_low`` <= ``tau_high`` on the ``phi_r`` scale, both in [0, 1]."""

    tau_low: float = 0.25
    tau_high: float = 0.5

    def __post_init__(self) -> None:
        for name in ("tau_low", "tau_high"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"difficulty.{name} must be a number in [0, 1], got {value!r}")
        if self.tau_low > self.tau_high:
            raise ValueError(
                f"difficulty.tau_low ({self.tau_low}) must be <= difficulty.tau_high ({self.tau_high})"
            )


@dataclass(frozen=True)
class DifficultyConfig:
    """How problems are classified.

    Args:
        mode: ``reward_guided`` (the paper), ``accuracy_only`` or ``reward_only`` (ablations).
        tau_low: outlier threshold on ``phi_r`` (strict ``<``). Set it per PRM.
        tau_high: inlier threshold on ``phi_r`` (strict ``>``). Set it per PRM.
        calibration: optional ``[q_low, q_high]`` quantiles; when set, each round replaces
            ``tau_low``/``tau_high`` by those quantiles of that round's observed ``phi_r``.
        oracle_samples: an experiment, not a method. When set, each round draws this many
            extra samples of every problem after the pre-samples and classifies the problems
            from them alone (same mode and thresholds); they are not counted against the
            budget and never trained on, so the allocator spends the same ``K * N`` on the
            classes that many samples give (close to the true ones), not the ones ``n_p``
            pre-samples give. It measures what mislabelling from ``n_p`` samples costs.
    """

    mode: DifficultyMode = "reward_guided"
    tau_low: float = 0.25
    tau_high: float = 0.5
    calibration: tuple[float, float] | None = None
    oracle_samples: int | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.oracle_samples, "difficulty.oracle_samples", or_null=True)
        if self.mode not in MODES:
            raise ValueError(f"difficulty.mode must be one of {list(MODES)}, got {self.mode!r}")
        DifficultyThresholds(self.tau_low, self.tau_high)
        if self.calibration is not None:
            if len(self.calibration) != 2:
                raise ValueError(f"difficulty.calibration must be [q_low, q_high], got {self.calibration!r}")
            q_low, q_high = self.calibration
            if not 0.0 <= q_low <= q_high <= 1.0:
                raise ValueError(
                    f"difficulty.calibration quantiles must satisfy 0 <= q_low <= q_high <= 1, "
                    f"got {list(self.calibration)}"
                )

    @property
    def thresholds(self) -> DifficultyThresholds:
        return DifficultyThresholds(self.tau_low, self.tau_high)


def classify(
    phi_a: float | None,
    phi_r: float | None,
    thresholds: DifficultyThresholds,
    mode: DifficultyMode = "reward_guided",
) -> Difficulty:
    """The class of one problem from its two signals (see the module docstring).

    >>> t = DifficultyThresholds(tau_low=0.25, tau_high=0.5)
    >>> classify(1.0, 0.9, t).value, classify(1.0, 0.5, t).value, classify(0.0, 0.1, t).value
    ('inlier', 'boundary', 'outlier')
    """
    has_a, has_r = phi_a is not None, phi_r is not None
    all_right = has_a and phi_a == 1.0
    all_wrong = has_a and phi_a == 0.0
    confident = has_r and phi_r > thresholds.tau_high
    doubtful = has_r and phi_r < thresholds.tau_low
    if mode == "reward_guided":
        easy, hard = all_right and confident, all_wrong and doubtful
    elif mode == "accuracy_only":
        easy, hard = all_right, all_wrong
    elif mode == "reward_only":
        easy, hard = confident, doubtful
    else:
        raise ValueError(f"difficulty.mode must be one of {list(MODES)}, got {mode!r}")
    if easy:
        return Difficulty.INLIER
    if hard:
        return Difficulty.OUTLIER
    return Difficulty.BOUNDARY


def problem_signals(rollouts: Iterable[ScoredRollout]) -> dict[str, tuple[float | None, float | None, int, int]]:
    """Per problem: ``(phi_a, phi_r, n_samples, n_gradeable)`` over the given rollouts."""
    verdicts: dict[str, list[float]] = defaultdict(list)
    rewards: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for r in rollouts:
        counts[r.problem_id] += 1
        if r.correct is not None:
            verdicts[r.problem_id].append(1.0 if r.correct else 0.0)
        if r.prm_min is not None:
            rewards[r.problem_id].append(r.prm_min)
    return {
        pid: (mean_or_none(verdicts[pid]), mean_or_none(rewards[pid]), n, len(verdicts[pid]))
        for pid, n in counts.items()
    }


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (NumPy's default, "type 7") of a non-empty sequence."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def calibrate_thresholds(phi_r_values: Sequence[float], q_low: float, q_high: float) -> DifficultyThresholds:
    """Thresholds at the ``q_low``/``q_high`` quantiles of the observed ``phi_r`` values."""
    return DifficultyThresholds(tau_low=quantile(phi_r_values, q_low), tau_high=quantile(phi_r_values, q_high))


def estimate_difficulty(
    rollouts: Iterable[ScoredRollout],
    config: DifficultyConfig = DifficultyConfig(),
    problem_ids: Sequence[str] | None = None,
) -> tuple[dict[str, ProblemDifficulty], DifficultyThresholds]:
    """Classify every problem from its pre-samples.

    Args:
        rollouts: the scored pre-samples (any order, any number per problem).
        config: mode, thresholds and optional calibration.
        problem_ids: the problems to classify; one without rollouts gets ``n_samples=0``
            and (having no signal) the boundary class. Defaults to the problems seen.

    Returns:
        ``({problem_id: ProblemDifficulty}, thresholds_used)``; the thresholds differ from
        the config's only under calibration.
    """
    signals = problem_signals(rollouts)
    ids = list(problem_ids) if problem_ids is not None else sorted(signals)
    thresholds = config.thresholds
    if config.calibration is not None:
        observed = [s[1] for pid in ids if (s := signals.get(pid)) and s[1] is not None]
        if observed:
            thresholds = calibrate_thresholds(observed, *config.calibration)
    result = {}
    for pid in ids:
        phi_a, phi_r, n, n_gradeable = signals.get(pid, (None, None, 0, 0))
        result[pid] = ProblemDifficulty(
            problem_id=pid,
            phi_a=phi_a,
            phi_r=phi_r,
            difficulty=classify(phi_a, phi_r, thresholds, config.mode),
            n_samples=n,
            n_gradeable=n_gradeable,
        )
    return result, thresholds


def count_by_class(difficulties: Mapping[str, ProblemDifficulty]) -> dict[str, int]:
    """``{"inlier": n, "boundary": n, "outlier": n}`` (every class present, zeros included)."""
    counts = {d.value: 0 for d in Difficulty}
    for d in difficulties.values():
        counts[d.difficulty.value] += 1
    return counts
