"""Budget allocators: the paper's arithmetic by hand, fallbacks, and invariants by property."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hs_star_pl.core.budget import (
    BudgetLedger,
    ExpectedPairsBudget,
    HierarchicalBudget,
    ProportionalBudget,
    SequentialBudget,
    UniformBudget,
    expected_pairs,
    fit_beta_prior,
    split_evenly,
    split_proportionally,
)
from hs_star_pl.core.records import Difficulty, ProblemDifficulty

ALL = ["inlier", "boundary", "outlier"]


def difficulties(classes: list[Difficulty], phi_a: list[float | None] | None = None) -> dict[str, ProblemDifficulty]:
    phi_a = phi_a or [None] * len(classes)
    return {
        f"p{i:05d}": ProblemDifficulty(f"p{i:05d}", a, None, c, 3, 3)
        for i, (c, a) in enumerate(zip(classes, phi_a))
    }


def test_paper_scale_example_by_hand():
    """N=7500, K=8, n_p=3, 3000 boundary problems.

    Pre-samples: 3 * 7500 = 22500. Remaining: (8 - 3) * 7500 = 37500 for 3000 boundary
    problems: 37500 // 3000 = 12 each (36000), residue 37500 - 36000 = 1500 problems get 13.
    Total: 22500 + 37500 = 60000 = 8 * 7500.
    """
    classes = [Difficulty.BOUNDARY] * 3000 + [Difficulty.INLIER] * 2500 + [Difficulty.OUTLIER] * 2000
    ledger = HierarchicalBudget(samples_per_problem=8, n_presample=3).allocate(difficulties(classes), seed=0)
    boundary_counts = Counter(ledger.resample[pid] for pid, c in ledger.classes.items() if c == "boundary")
    assert boundary_counts == {12: 1500, 13: 1500}
    assert all(ledger.resample[pid] == 0 for pid, c in ledger.classes.items() if c != "boundary")
    assert (ledger.presample_total, ledger.resample_total, ledger.total, ledger.budget_total) == (22500, 37500, 60000, 60000)
    per_class = ledger.per_class()
    assert per_class["boundary"] == {"problems": 3000, "presample": 9000, "resample": 37500, "total": 46500}
    assert per_class["inlier"]["total"] == 7500 and per_class["outlier"]["total"] == 6000


def test_small_example_and_seeded_residue():
    """N=4, K=8, n_p=3: remaining 20 over 3 boundary problems -> 6 each, 2 get a 7th."""
    d = difficulties([Difficulty.BOUNDARY, Difficulty.INLIER, Difficulty.BOUNDARY, Difficulty.BOUNDARY])
    alloc = HierarchicalBudget()
    ledger = alloc.allocate(d, seed=5)
    assert sorted(ledger.resample.values()) == [0, 6, 7, 7]
    assert ledger.resample == alloc.allocate(d, seed=5).resample
    winners = {tuple(sorted(p for p, n in alloc.allocate(d, seed=s).resample.items() if n == 7)) for s in range(20)}
    assert len(winners) > 1  # the +1s really are drawn at random, not always the same problems


def test_no_boundary_fallbacks():
    d = difficulties([Difficulty.INLIER, Difficulty.OUTLIER])
    skip = HierarchicalBudget().allocate(d, seed=0)
    assert skip.resample_total == 0 and skip.total == 6 and "10 re-samples not spent" in skip.note
    assert "no problem in the split ['boundary']" in skip.note
    spread = HierarchicalBudget(no_boundary="uniform").allocate(d, seed=0)
    assert spread.resample == {"p00000": 5, "p00001": 5} and spread.total == spread.budget_total


def test_uniform_budget_is_one_phase():
    ledger = UniformBudget(samples_per_problem=4).allocate(difficulties([Difficulty.BOUNDARY] * 3), seed=0)
    assert UniformBudget(samples_per_problem=4).n_presample == 4
    assert (ledger.presample_total, ledger.resample_total, ledger.budget_total) == (12, 0, 12)


def test_proportional_budget_by_hand():
    """K=8, n_p=3, N=4 -> 20 re-samples; failure rates 0, 1/3, 2/3, 1 (sum 2):
    quotas 0, 20/6=3.33, 6.67, 10 -> floors 0, 3, 6, 10 (19); the largest remainder
    (0.67, problem 2) takes the last one -> 0, 3, 7, 10.
    """
    d = difficulties([Difficulty.INLIER, Difficulty.BOUNDARY, Difficulty.BOUNDARY, Difficulty.OUTLIER], [1.0, 2 / 3, 1 / 3, 0.0])
    ledger = ProportionalBudget().allocate(d, seed=0, classes=ALL)
    assert [ledger.resample[f"p{i:05d}"] for i in range(4)] == [0, 3, 7, 10]
    all_solved = ProportionalBudget().allocate(difficulties([Difficulty.INLIER] * 2, [1.0, 1.0]), seed=0, classes=ALL)
    assert all_solved.resample_total == 0 and "not spent" in all_solved.note


def test_proportional_budget_weights_only_the_split():
    """The same four problems with the boundary split: failure rates 1/3 and 2/3 of the two
    boundary problems share all 20 re-samples, quotas 6.67 and 13.33 -> 7 and 13."""
    d = difficulties([Difficulty.INLIER, Difficulty.BOUNDARY, Difficulty.BOUNDARY, Difficulty.OUTLIER], [1.0, 2 / 3, 1 / 3, 0.0])
    ledger = ProportionalBudget().allocate(d, seed=0, classes=["boundary"])
    assert [ledger.resample[f"p{i:05d}"] for i in range(4)] == [0, 7, 13, 0]
    assert ledger.total == ledger.budget_total == 32


SPLITS = [["inlier"], ["boundary"], ["outlier"], ["inlier", "boundary"], ["boundary", "outlier"], ["inlier", "outlier"]]


@pytest.mark.parametrize("split", SPLITS, ids="+".join)
def test_each_split_spends_exactly_k_times_n_on_its_own_problems(split):
    """The pilot study: N=10 (3 inlier, 4 boundary, 3 outlier), K=8, n_p=3. Whatever the split,
    the 5 * 10 = 50 remaining samples go to the split's problems only, evenly (floor, +1
    residue), and the round spends exactly 80."""
    classes = [Difficulty.INLIER] * 3 + [Difficulty.BOUNDARY] * 4 + [Difficulty.OUTLIER] * 3
    ledger = HierarchicalBudget().allocate(difficulties(classes), seed=1, classes=split)
    chosen = [pid for pid, c in ledger.classes.items() if c in split]
    base, residue = divmod(50, len(chosen))
    assert Counter(ledger.resample[p] for p in chosen) == Counter({base: len(chosen) - residue, base + 1: residue}) - Counter()
    assert all(n == 0 for pid, n in ledger.resample.items() if pid not in chosen)
    assert ledger.total == ledger.budget_total == 80 and ledger.note is None
    assert sum(ledger.per_class()[c]["resample"] for c in split) == 50


def test_ledger_round_trips_through_dict():
    ledger = HierarchicalBudget().allocate(difficulties([Difficulty.BOUNDARY, Difficulty.OUTLIER]), seed=3)
    again = BudgetLedger.from_dict(ledger.to_dict())
    assert again == ledger and again.to_dict() == ledger.to_dict()


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: HierarchicalBudget(samples_per_problem=3, n_presample=5), r"budget.n_presample \(5\) must be <= budget.samples_per_problem \(3\)"),
        (lambda: HierarchicalBudget(samples_per_problem=-8), "budget.samples_per_problem must be a positive integer"),
        (lambda: HierarchicalBudget(n_presample=0), "budget.n_presample must be a positive integer"),
        (lambda: HierarchicalBudget(no_boundary="panic"), "budget.no_boundary must be 'skip' or 'uniform'"),
        (lambda: UniformBudget(samples_per_problem=0), "budget.samples_per_problem must be a positive integer"),
        (lambda: ProportionalBudget(samples_per_problem=2, n_presample=3), r"budget.n_presample \(3\)"),
    ],
)
def test_bad_budgets_name_the_key(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


classes_st = st.lists(st.sampled_from(list(Difficulty)), min_size=1, max_size=60)
phi_st = st.one_of(st.none(), st.sampled_from([0.0, 0.25, 1 / 3, 0.5, 2 / 3, 1.0]))


@st.composite
def allocators(draw):
    """Any of the four allocators, with any K and any n_p <= K."""
    k = draw(st.integers(1, 16))
    n_presample = draw(st.integers(1, k))
    no_boundary = draw(st.sampled_from(["skip", "uniform"]))
    kind = draw(st.sampled_from(["hierarchical", "uniform", "proportional", "expected_pairs"]))
    if kind == "expected_pairs":
        return ExpectedPairsBudget(k, n_presample, no_boundary, pair_cap=draw(st.none() | st.integers(1, 8)))
    if kind == "hierarchical":
        return HierarchicalBudget(k, n_presample, no_boundary)
    if kind == "proportional":
        return ProportionalBudget(k, n_presample, no_boundary)
    return UniformBudget(k)


@settings(max_examples=300, deadline=None)
@given(allocator=allocators(), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_allocator_invariants(allocator, data, seed):
    classes = data.draw(classes_st)
    phis = data.draw(st.lists(phi_st, min_size=len(classes), max_size=len(classes)))
    split = data.draw(st.lists(st.sampled_from(ALL), min_size=1, max_size=3, unique=True))
    d = difficulties(classes, phis)
    ledger = allocator.allocate(d, seed, split)
    k, n, n_p = allocator.samples_per_problem, len(d), allocator.n_presample
    remaining = (k - n_p) * n
    assert set(ledger.presample) == set(ledger.resample) == set(ledger.classes) == set(d)
    assert all(v >= 0 for v in ledger.resample.values())
    assert all(v == n_p for v in ledger.presample.values())
    assert ledger.classes == {pid: x.difficulty.value for pid, x in d.items()}
    assert ledger.budget_total == k * n and ledger.presample_total == n_p * n
    assert ledger.total == ledger.presample_total + ledger.resample_total <= ledger.budget_total  # never over-spend
    if ledger.note is None:
        assert ledger.total == ledger.budget_total  # exact unless a documented fallback says otherwise
    per_class = ledger.per_class()
    assert sum(row["problems"] for row in per_class.values()) == n
    assert sum(row["total"] for row in per_class.values()) == ledger.total
    assert ledger == allocator.allocate(d, seed, split)  # deterministic per seed
    assert ledger == allocator.allocate(dict(reversed(list(d.items()))), seed, split)  # not by dict order
    assert BudgetLedger.from_dict(ledger.to_dict()) == ledger
    chosen = [p for p, c in ledger.classes.items() if c in split]
    if isinstance(allocator, UniformBudget):
        assert ledger.resample_total == 0 and ledger.total == ledger.budget_total
    elif isinstance(allocator, HierarchicalBudget) and chosen:
        base, residue = divmod(remaining, len(chosen))
        got = Counter(ledger.resample[p] for p in chosen)
        assert got == Counter({base: len(chosen) - residue, base + 1: residue}) - Counter()  # floor, +1 residue
        assert all(ledger.resample[p] == 0 for p, c in ledger.classes.items() if c not in split)
        assert ledger.note is None
    elif isinstance(allocator, HierarchicalBudget):  # no problem in the split: the documented fallback
        assert ledger.note.startswith("no problem in the split")
        assert ledger.resample_total == (remaining if allocator.no_boundary == "uniform" else 0)
    elif isinstance(allocator, ProportionalBudget):
        fail = {p: 0.0 if p not in chosen else 1.0 if x.phi_a is None else 1.0 - x.phi_a for p, x in d.items()}
        if sum(fail.values()) > 0:
            assert ledger.resample_total == remaining and ledger.note is None
            assert all(ledger.resample[p] == 0 for p, w in fail.items() if w == 0)
            for p, w in fail.items():  # within one of the exact share
                assert abs(ledger.resample[p] - remaining * w / sum(fail.values())) < 1 + 1e-9
        else:
            assert ledger.note.startswith("every problem in the split always solved" if chosen else "no problem in the split")


@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, 500), n=st.integers(1, 40), seed=st.integers(0, 1000))
def test_split_evenly_invariants(total, n, seed):
    ids = [f"q{i}" for i in range(n)]
    split = split_evenly(total, ids, random.Random(seed))
    assert sum(split.values()) == total and set(split) == set(ids)
    assert max(split.values()) - min(split.values()) <= 1


@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, 500), weights=st.lists(st.floats(0, 1), min_size=1, max_size=40), seed=st.integers(0, 1000))
def test_split_proportionally_invariants(total, weights, seed):
    w = {f"q{i}": x for i, x in enumerate(weights)}
    split = split_proportionally(total, w, random.Random(seed))
    if sum(weights) > 0:
        assert sum(split.values()) == total
        s = sum(weights)
        for pid, x in w.items():
            assert abs(split[pid] - total * x / s) < 1 + 1e-9  # within one of its exact quota
            if x == 0:
                assert split[pid] == 0
    else:
        assert sum(split.values()) == 0


def test_expected_pairs_by_hand():
    # no more samples: the pairs already there
    assert expected_pairs(1, 1, 0, 1.0, 1.0) == pytest.approx(1.0)
    assert expected_pairs(3, 0, 0, 1.0, 1.0) == 0.0
    # 3 of 3 correct, one more sample, uniform prior: the posterior Beta(4, 1) predicts a wrong one with 1/5
    assert expected_pairs(3, 0, 1, 1.0, 1.0) == pytest.approx(0.2)
    # 1 of 2 correct, one more, Beta(2, 2) posterior: min stays 1 whichever way it falls
    assert expected_pairs(1, 1, 1, 1.0, 1.0) == pytest.approx(1.0)
    # 0 of 0, two more, uniform: X in {0, 1, 2} equally likely (beta-binomial(2, 1, 1)); min(X, 2 - X) = 0, 1, 0
    assert expected_pairs(0, 0, 2, 1.0, 1.0) == pytest.approx(1 / 3)


def test_fit_beta_prior_recovers_the_prior_of_simulated_counts():
    rng = random.Random(0)
    counts = []
    for _ in range(20000):
        p = rng.betavariate(0.6, 0.4)
        counts.append((sum(rng.random() < p for _ in range(3)), 3))
    alpha, beta = fit_beta_prior(counts)
    assert alpha == pytest.approx(0.6, rel=0.15) and beta == pytest.approx(0.4, rel=0.15)
    # no spread to fit, or too few problems: the uniform prior
    assert fit_beta_prior([(3, 3)] * 10) == (1.0, 1.0)
    assert fit_beta_prior([(1, 3)]) == (1.0, 1.0)


def _counted(correct: list[int], n: int = 3) -> dict[str, ProblemDifficulty]:
    cls = {0: Difficulty.OUTLIER, n: Difficulty.INLIER}
    return {
        f"p{i:03d}": ProblemDifficulty(f"p{i:03d}", c / n, None, cls.get(c, Difficulty.BOUNDARY), n, n)
        for i, c in enumerate(correct)
    }


def test_expected_pairs_budget_spends_exactly_the_rest_where_pairs_are_likeliest():
    # a pool where every class is common: 3/3 problems are often not always solved
    d = _counted([0] * 30 + [1] * 20 + [2] * 20 + [3] * 30)
    budget = ExpectedPairsBudget(samples_per_problem=8, n_presample=3)
    ledger = budget.allocate(d, seed=0, classes=ALL)
    assert ledger.resample_total == 5 * 100 and ledger.total == 8 * 100
    per = {c: [ledger.resample[pid] for pid, x in d.items() if round(x.phi_a * 3) == c] for c in range(4)}
    mean = {c: sum(v) / len(v) for c, v in per.items()}
    # mixed verdicts are where pairs come from; all-correct and all-wrong ones still get some under this prior
    assert mean[1] > mean[0] and mean[2] > mean[3] and min(mean[1], mean[2]) > 5
    assert mean[0] > 0 and mean[3] > 0
    assert "prior Beta(" in ledger.note and "at most 4 pairs" in ledger.note
    # the split limits who may be re-sampled; the same seed, the same plan
    boundary_only = budget.allocate(d, seed=0, classes=["boundary"])
    assert all(n == 0 for pid, n in boundary_only.resample.items() if d[pid].difficulty != Difficulty.BOUNDARY)
    assert boundary_only.resample_total == 500
    assert budget.allocate(d, seed=0, classes=ALL).resample == ledger.resample


def test_expected_pairs_budget_follows_the_pool_prior():
    """In a pool whose 3/3 problems are nearly always solved, they get nothing; where 3/3 often
    hides failures, they get re-samples."""
    sure = ExpectedPairsBudget().allocate(_counted([3] * 90 + [1] * 10), seed=0, classes=ALL)
    unsure = ExpectedPairsBudget().allocate(_counted([3] * 40 + [2] * 30 + [1] * 30), seed=0, classes=ALL)
    inliers = lambda ledger: sum(n for pid, n in ledger.resample.items() if ledger.classes[pid] == "inlier")
    assert inliers(unsure) / 40 > inliers(sure) / 90


def test_expected_pairs_budget_caps_the_pairs_one_problem_is_worth():
    """Without a cap, a problem with mixed verdicts would take nearly everything; with one, the
    budget spreads; a bad cap is refused naming the key."""
    d = _counted([0] * 30 + [1] * 20 + [2] * 20 + [3] * 30)
    uncapped = ExpectedPairsBudget(pair_cap=10**6).allocate(d, seed=0, classes=ALL)
    capped = ExpectedPairsBudget().allocate(d, seed=0, classes=ALL)
    assert max(uncapped.resample.values()) > 100
    assert max(capped.resample.values()) <= 8 and uncapped.resample_total == capped.resample_total == 500
    with pytest.raises(ValueError, match="budget.pair_cap must be a positive integer"):
        ExpectedPairsBudget(pair_cap=0)


# --- SequentialBudget: waves until each problem has a correct and a wrong answer ---------------


def _waves(budget, outcomes, seed=0):
    """Drive ``next_wave`` as ``run_round`` does, drawing each problem's verdicts in order from
    ``outcomes[pid]`` (its pre-samples first); returns the verdicts and the plans, wave by wave."""
    verdicts = {pid: list(seq[: budget.n_presample]) for pid, seq in outcomes.items()}
    plans = []
    for wave in range(100):
        plan = budget.next_wave(verdicts, seed, wave)
        if not plan:
            return verdicts, plans
        plans.append(plan)
        for pid, n in plan.items():
            start = len(verdicts[pid])
            verdicts[pid] += outcomes[pid][start:start + n]
    raise AssertionError("no end")


def test_sequential_stops_on_a_problem_once_it_has_a_pair_by_hand():
    """K=4, N=3, n_p=2: 12 samples, 6 pre-sampled. a (T,F) has a pair and gets nothing; b (T,T)
    and c (F,F) get one each in wave 0; b's F gives it a pair; c stays wrong, gets one per
    wave and takes the 5 samples left (cap 2K = 8 not reached: c ends at 7)."""
    outcomes = {"a": [True, False] + [True] * 10, "b": [True, True, False] + [True] * 10, "c": [False] * 12}
    verdicts, plans = _waves(SequentialBudget(samples_per_problem=4, n_presample=2), outcomes)
    assert plans == [{"b": 1, "c": 1}, {"c": 1}, {"c": 1}, {"c": 1}, {"c": 1}]
    assert {pid: len(v) for pid, v in verdicts.items()} == {"a": 2, "b": 3, "c": 7}
    assert sum(len(v) for v in verdicts.values()) == 12


def test_sequential_cap_then_leftover_goes_to_the_problems_with_a_pair():
    """K=4, N=3, n_p=2, max_per_problem=4: c (never right) stops at 4 samples; b gets its pair in
    wave 0. Nothing is open with 12 - 9 = 3 samples left: ``resolved`` splits them over a and b
    (room 2 and 1), ``skip`` leaves them."""
    outcomes = {"a": [True, False] + [True] * 10, "b": [True, True, False] + [True] * 10, "c": [False] * 12}
    verdicts, plans = _waves(SequentialBudget(4, 2, max_per_problem=4), outcomes)
    assert plans[:2] == [{"b": 1, "c": 1}, {"c": 1}]
    assert plans[2] == {"a": 2, "b": 1}  # the leftover wave: a has room for 2, b for 1
    assert {pid: len(v) for pid, v in verdicts.items()} == {"a": 4, "b": 4, "c": 4}
    verdicts, plans = _waves(SequentialBudget(4, 2, max_per_problem=4, leftover="skip"), outcomes)
    assert plans == [{"b": 1, "c": 1}, {"c": 1}]
    assert sum(len(v) for v in verdicts.values()) == 9


def test_sequential_gives_the_last_samples_to_the_problems_with_fewest_and_ignores_ungradeable():
    """2 samples left for 3 open problems: the two with fewest samples get them (x has 3). An
    ungradeable verdict (None) is neither right nor wrong, so [True, None] is still open."""
    budget = SequentialBudget(samples_per_problem=3, n_presample=2)
    verdicts = {"x": [True, True, True], "y": [False, False], "z": [True, None], "w": [True, False]}
    # 4 problems * 3 = 12; 9 drawn; 3 left: y and z (2 samples each) first, then x
    assert budget.next_wave(verdicts, 0, 0) == {"x": 1, "y": 1, "z": 1}
    verdicts["w"] = [True, False, True]  # 10 drawn, 2 left: y and z, not x
    assert budget.next_wave(verdicts, 0, 0) == {"y": 1, "z": 1}
    verdicts = {pid: v + [True] for pid, v in verdicts.items()}  # 14 drawn > 12: spent
    assert budget.next_wave(verdicts, 0, 0) == {}


def test_sequential_ties_are_seeded():
    budget = SequentialBudget(samples_per_problem=3, n_presample=2)
    verdicts = {pid: [False, False] for pid in "abcdef"} | {"g": [True, False, True, False, True]}  # 21 - 17 = 4 left
    picks = {tuple(budget.next_wave(verdicts, seed, 0)) for seed in range(20)}
    assert all(len(p) == 4 for p in picks) and len(picks) > 1
    assert budget.next_wave(verdicts, 3, 0) == budget.next_wave(verdicts, 3, 0)


@pytest.mark.parametrize("kwargs, key", [
    ({"max_per_problem": 1}, "max_per_problem"), ({"wave_size": 0}, "wave_size"), ({"leftover": "all"}, "leftover"),
    ({"n_presample": 9}, "n_presample"),
])
def test_sequential_settings_are_checked(kwargs, key):
    with pytest.raises(ValueError, match=f"budget.{key}"):
        SequentialBudget(**kwargs)
