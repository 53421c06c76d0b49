"""Sampling-budget allocation (HS-STaR step 4) and its ledger.

Every allocator spends a budget of ``samples_per_problem`` (K) times N problems in two phases:
``n_presample`` per problem first (to estimate difficulty), then a re-sample phase whose
counts it decides from the difficulty estimates. Selected in YAML by ``class_path``:

Which problems may receive re-samples is the round's *split*: the difficulty classes it
re-samples and trains on (``selection.train_classes``, passed to ``allocate`` as
``classes``; default ``boundary``). The paper's pilot study runs one split at a time
(inlier, boundary, outlier, or a union of two) at the same budget, as the reference code's
``run.sh`` split argument does.

* ``HierarchicalBudget`` (the paper): the remaining ``(K - n_p) * N`` samples go to the
  split's problems only (boundary by default), ``floor(R / B)`` each, and the residue
  ``R mod B`` as +1 to randomly chosen (seeded) ones: exactly ``K * N`` in total. We
  generate exactly what is allocated; the reference scripts generate the ceiling for every
  split problem and discard the surplus. With *no* problem in the split, ``no_boundary``
  decides: ``"skip"`` (default: spend nothing more; with the boundary split, every problem
  is either solved with confidence or hopeless, so re-samples would yield no pairs) or
  ``"uniform"`` (spread the rest over all problems).
* ``UniformBudget``: K samples per problem in one phase, the standard iterative-DPO / STaR
  baseline at equal budget. There is no re-sample phase to steer, so the split only filters
  training (as the reference does with 8 pre-samples); difficulty is estimated from all K.
* ``ProportionalBudget`` (DART-Math "prop2diff" style): the remaining budget goes to the
  split's problems in proportion to their failure rate ``1 - phi_a`` (largest-remainder
  rounding, seeded tie-breaks). A problem with no gradeable pre-sample counts as failure
  rate 1. Its configs train on all three classes, so it spreads over every problem.
* ``ExpectedPairsBudget`` (beyond the paper): the remaining budget goes where it is expected
  to add the most DPO pairs, counting at most ``pair_cap`` per problem (default ``K // 2``,
  what K samples can give one problem: more pairs from one problem are worth less than
  pairs from more problems). Each problem's pass rate gets a Beta posterior from its
  pre-samples, under a Beta prior fitted to the whole round's pre-sample counts (empirical
  Bayes: a problem solved 3 of 3 times is not taken for always solved when the pool says
  such problems often fail); with ``m`` more samples its pairs are ``min(correct,
  incorrect, pair_cap)`` of all its samples, whose expectation under the posterior
  predictive (beta-binomial) is computed exactly; samples are handed out one at a time to
  the problem whose expectation rises most (greedy, seeded tie-breaks). It reads
  correctness only, not the process reward, and ignores pair filters (``selection``'s PRM
  thresholds).
* ``SequentialBudget`` (beyond the paper): re-samples in waves instead of one plan. After
  the pre-samples, every *open* problem (one whose verdicts so far lack a correct or a wrong
  answer, i.e. that has no DPO pair yet) gets ``wave_size`` more samples per wave, the
  problems with the fewest samples first when the budget left cannot cover them all; a
  problem stops receiving samples once it has both a correct and a wrong answer, or
  ``max_per_problem`` samples. What is left when no problem is open goes evenly to the
  problems that have a pair (``leftover: resolved``) or is not spent (``skip``). It reads
  correctness only. ``run_round`` asks it for one wave at a time (``next_wave``).

The returned ``BudgetLedger`` is the single record of what was planned and spent.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from hs_star_pl.core.records import Difficulty, ProblemDifficulty
from hs_star_pl.infra.errors import check_positive_int

NoBoundaryPolicy = Literal["skip", "uniform"]
DEFAULT_SPLIT: tuple[str, ...] = (Difficulty.BOUNDARY.value,)
# A sanity bound, far above any sampling budget in use (the paper's K is 8): a round keeps
# every response in memory, and a typo such as 1e9 would otherwise fail only after pre-sampling.
MAX_SAMPLES_PER_PROBLEM = 4096


@dataclass(frozen=True)
class BudgetLedger:
    """Per-problem sample counts per phase, and the budget they were cut from.

    Attributes:
        samples_per_problem: K.
        presample: ``{problem_id: n}`` pre-samples.
        resample: ``{problem_id: n}`` re-samples (0 for problems that get none).
        classes: ``{problem_id: "inlier" | "boundary" | "outlier"}``.
        note: what a reader of the plan should know: why it deviates from the method's default (a
            fallback), or the prior it fitted (``ExpectedPairsBudget``).
    """

    samples_per_problem: int
    presample: Mapping[str, int]
    resample: Mapping[str, int]
    classes: Mapping[str, str]
    note: str | None = None

    @property
    def n_problems(self) -> int:
        return len(self.presample)

    @property
    def budget_total(self) -> int:
        """K * N: what the method is allowed to spend."""
        return self.samples_per_problem * self.n_problems

    @property
    def presample_total(self) -> int:
        return sum(self.presample.values())

    @property
    def resample_total(self) -> int:
        return sum(self.resample.values())

    @property
    def total(self) -> int:
        return self.presample_total + self.resample_total

    def per_class(self) -> dict[str, dict[str, int]]:
        """``{class: {"problems", "presample", "resample", "total"}}`` for every class."""
        out = {d.value: {"problems": 0, "presample": 0, "resample": 0, "total": 0} for d in Difficulty}
        for pid, cls in self.classes.items():
            row = out[cls]
            row["problems"] += 1
            row["presample"] += self.presample.get(pid, 0)
            row["resample"] += self.resample.get(pid, 0)
            row["total"] = row["presample"] + row["resample"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples_per_problem": self.samples_per_problem,
            "n_problems": self.n_problems,
            "budget_total": self.budget_total,
            "presample_total": self.presample_total,
            "resample_total": self.resample_total,
            "total": self.total,
            "per_class": self.per_class(),
            "note": self.note,
            "problems": {
                pid: {"class": self.classes[pid], "presample": self.presample[pid], "resample": self.resample[pid]}
                for pid in sorted(self.presample)
            },
        }

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> BudgetLedger:
        problems = row["problems"]
        return cls(
            samples_per_problem=int(row["samples_per_problem"]),
            presample={pid: int(p["presample"]) for pid, p in problems.items()},
            resample={pid: int(p["resample"]) for pid, p in problems.items()},
            classes={pid: p["class"] for pid, p in problems.items()},
            note=row.get("note"),
        )


@runtime_checkable
class BudgetAllocator(Protocol):
    """Decides how many samples each problem gets in each phase."""

    samples_per_problem: int
    n_presample: int

    def allocate(
        self, difficulties: Mapping[str, ProblemDifficulty], seed: int, classes: Collection[str] = DEFAULT_SPLIT
    ) -> BudgetLedger:
        """The re-sample plan for problems classified from ``n_presample`` pre-samples each.

        ``classes`` is the split: only problems of those difficulty classes may be re-sampled.
        """
        ...


def in_split(difficulties: Mapping[str, ProblemDifficulty], classes: Collection[str]) -> list[str]:
    """The ids of the problems whose class is one of ``classes``."""
    wanted = set(classes)
    return [pid for pid, d in difficulties.items() if d.difficulty.value in wanted]


def split_evenly(total: int, ids: Sequence[str], rng: random.Random) -> dict[str, int]:
    """``floor(total / len(ids))`` each, and the residue as +1 to ``rng``-chosen ids.

    >>> split_evenly(7, ["a", "b", "c"], random.Random(0))
    {'a': 2, 'b': 3, 'c': 2}
    """
    if not ids:
        return {}
    base, residue = divmod(total, len(ids))
    ordered = sorted(ids)
    lucky = set(rng.sample(ordered, residue))
    return {pid: base + (pid in lucky) for pid in ordered}


def split_proportionally(total: int, weights: Mapping[str, float], rng: random.Random) -> dict[str, int]:
    """Largest-remainder (Hamilton) split of ``total`` by ``weights``; ties broken by ``rng``.

    Zero-weight ids get 0; if every weight is 0 the result is all zeros (the caller decides
    what to do with an unspendable budget).
    """
    ids = sorted(weights)
    weight_sum = math.fsum(weights.values())
    if weight_sum <= 0:
        return {pid: 0 for pid in ids}
    quotas = {pid: total * weights[pid] / weight_sum for pid in ids}
    counts = {pid: math.floor(q) for pid, q in quotas.items()}
    residue = total - sum(counts.values())
    shuffled = rng.sample(ids, len(ids))
    order = sorted((pid for pid in shuffled if weights[pid] > 0), key=lambda p: quotas[p] - counts[p], reverse=True)
    for pid in order[:residue]:
        counts[pid] += 1
    return counts


def _check_counts(samples_per_problem: int, n_presample: int, *, prefix: str = "budget") -> None:
    check_positive_int(samples_per_problem, f"{prefix}.samples_per_problem")
    check_positive_int(n_presample, f"{prefix}.n_presample")
    if n_presample > samples_per_problem:
        raise ValueError(
            f"{prefix}.n_presample ({n_presample}) must be <= {prefix}.samples_per_problem ({samples_per_problem})"
        )
    if samples_per_problem > MAX_SAMPLES_PER_PROBLEM:
        raise ValueError(
            f"{prefix}.samples_per_problem ({samples_per_problem}) is over the limit of {MAX_SAMPLES_PER_PROBLEM}: a "
            f"round holds every response (K x problems) in memory, so a K this large would run out of memory after "
            f"pre-sampling (the paper uses K=8)"
        )


def _check_no_boundary(policy: str) -> None:
    if policy not in ("skip", "uniform"):
        raise ValueError(f"budget.no_boundary must be 'skip' or 'uniform', got {policy!r}")


def _fallback(
    remaining: int, difficulties: Mapping[str, ProblemDifficulty], policy: str, rng: random.Random, why: str
) -> tuple[dict[str, int], str]:
    """What to do with a budget the method has nowhere to spend (see ``no_boundary``)."""
    if policy == "uniform":
        return split_evenly(remaining, list(difficulties), rng), f"{why}: remaining budget spread over all problems (no_boundary=uniform)"
    return {}, f"{why}: {remaining} re-samples not spent (no_boundary=skip)"


def _nothing_in(classes: Collection[str]) -> str:
    return f"no problem in the split {sorted(classes)}"


def _ledger(k: int, n_presample: int, difficulties: Mapping[str, ProblemDifficulty], resample: Mapping[str, int], note: str | None = None) -> BudgetLedger:
    ids = sorted(difficulties)
    return BudgetLedger(
        samples_per_problem=k,
        presample={pid: n_presample for pid in ids},
        resample={pid: resample.get(pid, 0) for pid in ids},
        classes={pid: difficulties[pid].difficulty.value for pid in ids},
        note=note,
    )


@dataclass(frozen=True)
class _TwoPhaseBudget:
    """The settings of an allocator that pre-samples, then re-samples what it decides."""

    samples_per_problem: int = 8
    n_presample: int = 3
    no_boundary: NoBoundaryPolicy = "skip"

    def __post_init__(self) -> None:
        _check_counts(self.samples_per_problem, self.n_presample)
        _check_no_boundary(self.no_boundary)


@dataclass(frozen=True)
class HierarchicalBudget(_TwoPhaseBudget):
    """The paper's allocation: the rest of the budget to the split's problems only.

    The split (``allocate``'s ``classes``, from ``selection.train_classes``) is the boundary
    for HS-STaR, and any class or union of classes for the pilot study.

    Args:
        samples_per_problem: K, the per-problem budget (paper: 8).
        n_presample: pre-samples per problem used to estimate difficulty (paper: 3).
        no_boundary: what to do when no problem is in the split (with the default split:
            none on the boundary): ``"skip"`` spends nothing more (total < K*N, logged in
            the ledger's note), ``"uniform"`` spreads the rest over all problems.
    """

    def allocate(
        self, difficulties: Mapping[str, ProblemDifficulty], seed: int, classes: Collection[str] = DEFAULT_SPLIT
    ) -> BudgetLedger:
        rng = random.Random(f"{seed}:hierarchical")
        remaining = (self.samples_per_problem - self.n_presample) * len(difficulties)
        split = in_split(difficulties, classes)
        note = None
        if split:
            resample = split_evenly(remaining, split, rng)
        else:
            resample, note = _fallback(remaining, difficulties, self.no_boundary, rng, _nothing_in(classes))
        return _ledger(self.samples_per_problem, self.n_presample, difficulties, resample, note)


@dataclass(frozen=True)
class UniformBudget:
    """The equal-budget baseline: K samples for every problem, all in one phase.

    Args:
        samples_per_problem: K (paper: 8).
    """

    samples_per_problem: int = 8
    n_presample: int = field(init=False)

    def __post_init__(self) -> None:
        _check_counts(self.samples_per_problem, self.samples_per_problem)
        object.__setattr__(self, "n_presample", self.samples_per_problem)

    def allocate(
        self, difficulties: Mapping[str, ProblemDifficulty], seed: int, classes: Collection[str] = DEFAULT_SPLIT
    ) -> BudgetLedger:
        return _ledger(self.samples_per_problem, self.n_presample, difficulties, {})


@dataclass(frozen=True)
class ProportionalBudget(_TwoPhaseBudget):
    """DART-Math-style "prop2diff": the rest of the budget in proportion to failure rate.

    Only the split's problems (``allocate``'s ``classes``) are weighted; the shipped
    proportional configs set ``selection.train_classes`` to all three classes.

    Args:
        samples_per_problem: K.
        n_presample: pre-samples per problem.
        no_boundary: what to do when every problem of the split was always solved, or the
            split is empty (all weights zero): ``"skip"`` or ``"uniform"``, as in
            ``HierarchicalBudget``.
    """

    def allocate(
        self, difficulties: Mapping[str, ProblemDifficulty], seed: int, classes: Collection[str] = DEFAULT_SPLIT
    ) -> BudgetLedger:
        rng = random.Random(f"{seed}:proportional")
        remaining = (self.samples_per_problem - self.n_presample) * len(difficulties)
        split = set(in_split(difficulties, classes))
        weights = {
            pid: 0.0 if pid not in split else 1.0 if d.phi_a is None else 1.0 - d.phi_a
            for pid, d in difficulties.items()
        }
        note = None
        if any(w > 0 for w in weights.values()):
            resample = split_proportionally(remaining, weights, rng)
        elif split:
            resample, note = _fallback(remaining, difficulties, self.no_boundary, rng, "every problem in the split always solved")
        else:
            resample, note = _fallback(remaining, difficulties, self.no_boundary, rng, _nothing_in(classes))
        return _ledger(self.samples_per_problem, self.n_presample, difficulties, resample, note)


def fit_beta_prior(counts: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """A Beta(alpha, beta) prior on pass rates from ``(correct, trials)`` counts (method of moments).

    Pools the problems with the most common number of trials (the pre-sample count) and
    matches the beta-binomial's first two moments. Falls back to the uniform Beta(1, 1) when
    the moments admit no beta prior (too few problems, no spread, or more spread than a
    beta-binomial allows).
    """
    trials = [n for _, n in counts if n > 0]
    if len(trials) < 2:
        return 1.0, 1.0
    n = max(set(trials), key=trials.count)
    xs = [c for c, t in counts if t == n]
    m1 = math.fsum(xs) / len(xs)
    m2 = math.fsum(x * x for x in xs) / len(xs)
    if m1 <= 0 or m1 >= n:
        return 1.0, 1.0
    denominator = n * (m2 / m1 - m1 - 1) + m1
    if denominator <= 0:
        return 1.0, 1.0
    alpha = (n * m1 - m2) / denominator
    beta = (n - m1) * (n - m2 / m1) / denominator
    if not (alpha > 0 and beta > 0 and math.isfinite(alpha) and math.isfinite(beta)):
        return 1.0, 1.0
    return alpha, beta


def expected_pairs(correct: int, wrong: int, more: int, alpha: float, beta: float, cap: int | None = None) -> float:
    """E[min(correct + X, wrong + more - X, cap)] for X ~ BetaBinomial(more, alpha + correct, beta + wrong).

    The expected number of disjoint (correct, incorrect) pairs a problem yields after ``more``
    further samples (at most ``cap``), given ``correct`` and ``wrong`` so far and a
    Beta(alpha, beta) prior on its pass rate.
    """
    cap = math.inf if cap is None else cap
    a, b = alpha + correct, beta + wrong
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    total = 0.0
    for x in range(more + 1):
        log_p = (math.lgamma(more + 1) - math.lgamma(x + 1) - math.lgamma(more - x + 1)
                 + math.lgamma(a + x) + math.lgamma(b + more - x) - math.lgamma(a + b + more) + log_norm)
        total += math.exp(log_p) * min(correct + x, wrong + more - x, cap)
    return total


@dataclass(frozen=True)
class ExpectedPairsBudget(_TwoPhaseBudget):
    """The rest of the budget where it adds the most expected DPO pairs (Beta posterior, greedy).

    Only the split's problems (``allocate``'s ``classes``) may be re-sampled; the shipped
    config trains on all three classes. See the module docstring for the model.

    Args:
        samples_per_problem: K.
        n_presample: pre-samples per problem.
        no_boundary: what to do when the split is empty: ``"skip"`` or ``"uniform"``, as in
            ``HierarchicalBudget``.
        pair_cap: pairs counted per problem at most; ``None``: ``samples_per_problem // 2``.
            Without a cap, the expectation of a problem with mixed verdicts grows by about
            ``min(p, 1 - p)`` per sample forever, and the greedy gives it nearly the whole budget.
    """

    pair_cap: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.pair_cap, "budget.pair_cap", or_null=True)

    def allocate(
        self, difficulties: Mapping[str, ProblemDifficulty], seed: int, classes: Collection[str] = DEFAULT_SPLIT
    ) -> BudgetLedger:
        rng = random.Random(f"{seed}:expected_pairs")
        remaining = (self.samples_per_problem - self.n_presample) * len(difficulties)
        split = sorted(in_split(difficulties, classes))
        if not split:
            resample, note = _fallback(remaining, difficulties, self.no_boundary, rng, _nothing_in(classes))
            return _ledger(self.samples_per_problem, self.n_presample, difficulties, resample, note)
        counts = {pid: _correct_and_trials(difficulties[pid]) for pid in difficulties}
        alpha, beta = fit_beta_prior(list(counts.values()))
        cap = self.pair_cap if self.pair_cap is not None else max(self.samples_per_problem // 2, 1)
        value: dict[tuple[int, int, int], float] = {}

        def gain(pid: str, m: int) -> float:
            c, n = counts[pid]
            for more in (m, m + 1):
                if (c, n, more) not in value:
                    value[(c, n, more)] = expected_pairs(c, n - c, more, alpha, beta, cap)
            return value[(c, n, m + 1)] - value[(c, n, m)]

        order = {pid: i for i, pid in enumerate(rng.sample(split, len(split)))}  # seeded tie-breaks
        heap = [(-gain(pid, 0), order[pid], pid) for pid in split]
        heapq.heapify(heap)
        resample = dict.fromkeys(split, 0)
        for _ in range(remaining):
            _, tie, pid = heapq.heappop(heap)
            resample[pid] += 1
            heapq.heappush(heap, (-gain(pid, resample[pid]), tie, pid))
        note = f"prior Beta({alpha:.3g}, {beta:.3g}) fitted to the pre-samples; at most {cap} pairs counted per problem"
        return _ledger(self.samples_per_problem, self.n_presample, difficulties, resample, note)


def _correct_and_trials(d: ProblemDifficulty) -> tuple[int, int]:
    """The pre-samples' verdicts as counts: ``(correct, gradeable)``; ``(0, 0)`` with none gradeable."""
    if d.phi_a is None or not d.n_gradeable:
        return 0, 0
    return round(d.phi_a * d.n_gradeable), d.n_gradeable


LeftoverPolicy = Literal["resolved", "skip"]


def has_pair(verdicts: Sequence[bool | None]) -> bool:
    """Whether a problem's verdicts so far hold a correct and a wrong answer (ungradeable: neither)."""
    return True in verdicts and False in verdicts


@dataclass(frozen=True)
class SequentialBudget:
    """Sample in waves and stop spending on a problem once it can give a DPO pair.

    The budget is ``K * N`` as for every allocator. ``n_presample`` samples of every problem
    come first (the round's pre-sample phase); then ``run_round`` calls ``next_wave`` with
    every problem's verdicts so far until it returns nothing (module docstring).

    Args:
        samples_per_problem: K, the per-problem budget on average (paper: 8).
        n_presample: samples of every problem before the first wave.
        max_per_problem: at most this many samples of one problem in all; ``None``:
            ``2 * samples_per_problem``. Without a cap, a problem that is never solved would
            take every sample left.
        wave_size: samples per open problem per wave.
        leftover: what to do with the budget left once no problem is open: ``"resolved"``
            spreads it evenly over the problems with a pair (capped by ``max_per_problem``),
            ``"skip"`` leaves it unspent.
    """

    samples_per_problem: int = 8
    n_presample: int = 2
    max_per_problem: int | None = None
    wave_size: int = 1
    leftover: LeftoverPolicy = "resolved"

    def __post_init__(self) -> None:
        _check_counts(self.samples_per_problem, self.n_presample)
        check_positive_int(self.max_per_problem, "budget.max_per_problem", or_null=True)
        check_positive_int(self.wave_size, "budget.wave_size")
        if self.cap < self.n_presample:
            raise ValueError(f"budget.max_per_problem ({self.max_per_problem}) must be >= budget.n_presample ({self.n_presample})")
        if self.leftover not in ("resolved", "skip"):
            raise ValueError(f"budget.leftover must be 'resolved' or 'skip', got {self.leftover!r}")

    @property
    def cap(self) -> int:
        return self.max_per_problem if self.max_per_problem is not None else 2 * self.samples_per_problem

    def allocate(
        self, difficulties: Mapping[str, ProblemDifficulty], seed: int, classes: Collection[str] = DEFAULT_SPLIT
    ) -> BudgetLedger:
        """The plan before any wave: the pre-samples only (the waves add the re-samples)."""
        return _ledger(self.samples_per_problem, self.n_presample, difficulties, {},
                       f"sequential: re-samples in waves of {self.wave_size} per open problem, at most {self.cap} "
                       f"samples per problem, leftover={self.leftover}")

    def next_wave(self, verdicts: Mapping[str, Sequence[bool | None]], seed: int, wave: int) -> dict[str, int]:
        """The next wave's sample counts (only positive ones), from every problem's verdicts so far.

        ``verdicts`` holds one entry per problem of the round and one verdict per sample drawn
        (pre-samples and earlier waves); the budget left is ``K * N`` minus those samples.
        Empty when the budget is spent, or nothing is open and nothing is to be spread.

        >>> SequentialBudget(4, 2).next_wave({"a": [True, False], "b": [True, True], "c": [False, False]}, 0, 0)
        {'b': 1, 'c': 1}
        """
        left = self.samples_per_problem * len(verdicts) - sum(len(v) for v in verdicts.values())
        if left <= 0:
            return {}
        rng = random.Random(f"{seed}:sequential:{wave}")
        ids = sorted(verdicts)
        room = {pid: self.cap - len(verdicts[pid]) for pid in ids}
        open_ids = [pid for pid in ids if not has_pair(verdicts[pid]) and room[pid] > 0]
        if open_ids:
            order = rng.sample(open_ids, len(open_ids))  # seeded tie-breaks among equal counts
            order.sort(key=lambda pid: len(verdicts[pid]))
            plan: dict[str, int] = {}
            for pid in order:
                n = min(self.wave_size, room[pid], left)
                if n <= 0:
                    break
                plan[pid] = n
                left -= n
            return dict(sorted(plan.items()))
        if self.leftover == "skip":
            return {}
        resolved = [pid for pid in ids if has_pair(verdicts[pid]) and room[pid] > 0]
        plan = {}
        while left > 0 and resolved:
            share = split_evenly(left, resolved, rng)
            for pid, n in share.items():
                n = min(n, room[pid] - plan.get(pid, 0))
                if n > 0:
                    plan[pid] = plan.get(pid, 0) + n
                    left -= n
            resolved = [pid for pid in resolved if room[pid] - plan.get(pid, 0) > 0]
        return dict(sorted(plan.items()))
