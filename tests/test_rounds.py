"""``run_round`` end to end against the small components in ``tests/helpers/round_fakes``."""

from __future__ import annotations

import random

import pytest

from hs_star_pl.core.budget import ExpectedPairsBudget, HierarchicalBudget, ProportionalBudget, UniformBudget
from hs_star_pl.core.difficulty import DifficultyConfig
from hs_star_pl.core.protocols import Completion, StepScoringRequest
from hs_star_pl.core.records import Phase, Problem
from hs_star_pl.core.rounds import MemoryStore, RoundConfig, derive_seed, run_round
from hs_star_pl.core.selection import SelectionConfig
from tests.helpers.round_fakes import P_RIGHT, BoxedNumberVerifier, KeywordPRM, ScriptedEngine, problems, run


def test_round_classifies_allocates_and_pairs():
    """5 gradeable problems, K=8, n_p=3: 15 pre-samples, (8-3)*5 = 25 re-samples.

    easy (always right, PRM 0.9 > 0.6) is an inlier; hard (always wrong, PRM 0.9 >= 0.3) stays
    on the boundary; hard2 (always wrong, PRM 0.1 < 0.3) is an outlier; mid1/mid2 are
    boundary unless their 3 pre-samples happen to agree. The 25 go to boundary problems only.
    """
    engine = ScriptedEngine()
    result = run(engine=engine)
    s = result.summary()
    assert result.dropped == ["bad"] and s["n_dropped_ungradeable"] == 1
    d = {pid: x.difficulty.value for pid, x in result.difficulties.items()}
    assert d["easy"] == "inlier" and d["hard2"] == "outlier" and d["hard"] == "boundary"
    boundary = [pid for pid, c in d.items() if c == "boundary"]
    assert (s["n_problems"], s["n_inlier"] + s["n_boundary"] + s["n_outlier"]) == (5, 5)
    assert (s["samples_presample"], s["samples_resample"], s["samples_total"], s["budget_total"]) == (15, 25, 40, 40)
    assert engine.calls[0] == [(pid, 3) for pid in P_RIGHT]
    assert sum(n for _, n in engine.calls[1]) == 25 and {k for k, _ in engine.calls[1]} == set(boundary)
    assert s["samples_per_class"]["boundary"] == 3 * len(boundary) + 25
    # sample indices are unique per problem and re-samples continue after pre-samples
    for pid in P_RIGHT:
        idx = sorted(r.rollout.sample_index for r in result.rollouts if r.problem_id == pid)
        assert idx == list(range(len(idx)))
        assert all(r.rollout.phase is Phase.RESAMPLE for r in result.resamples if r.problem_id == pid)
    # pairs only from boundary problems that had both right and wrong answers
    assert s["n_pairs"] == len(result.examples) > 0
    assert {p.problem_id for p in result.examples} <= {"mid1", "mid2"}
    assert all(p.prompt.startswith("Q: question") and "boxed{7}" in p.chosen and "boxed{8}" in p.rejected for p in result.examples)
    assert set(s["seconds"]) >= {"presample_generate", "presample_verify", "presample_prm", "resample_generate", "select"}


@pytest.mark.parametrize(
    "allocator",
    [
        HierarchicalBudget(samples_per_problem=8, n_presample=3),
        HierarchicalBudget(samples_per_problem=7, n_presample=2, no_boundary="uniform"),
        UniformBudget(samples_per_problem=5),
        ProportionalBudget(samples_per_problem=6, n_presample=2),
        ExpectedPairsBudget(samples_per_problem=6, n_presample=2),
    ],
    ids=["hierarchical", "hierarchical-7-2", "uniform", "proportional", "expected_pairs"],
)
def test_the_engine_is_asked_for_exactly_the_ledgers_counts(allocator):
    """Never over-generate: the pre-sample call asks n_p of every gradeable problem, the
    re-sample call asks each problem exactly its ledger count (none for a count of 0), and
    the round holds exactly the ledger's total, with per-problem indices 0..count-1."""
    engine = ScriptedEngine()
    result = run(engine=engine, allocator=allocator)
    ledger = result.ledger
    assert dict(engine.calls[0]) == {pid: allocator.n_presample for pid in P_RIGHT}
    wanted = {pid: n for pid, n in ledger.resample.items() if n > 0}
    assert (dict(engine.calls[1]) if len(engine.calls) > 1 else {}) == wanted
    assert len(engine.calls) == 1 + bool(wanted)
    assert len(result.presamples) == ledger.presample_total and len(result.resamples) == ledger.resample_total
    for pid in P_RIGHT:
        idx = sorted(r.rollout.sample_index for r in result.rollouts if r.problem_id == pid)
        assert idx == list(range(ledger.presample[pid] + ledger.resample[pid]))


def test_calibrated_thresholds_are_used_and_reported():
    """``difficulty.calibration=[0, 1]`` puts tau_low/tau_high at the smallest and largest
    phi_r of the round (0.1 for hard2, 0.9 for the rest): nothing is strictly below the
    minimum or above the maximum, so every problem is on the boundary, and summary.json
    reports the thresholds actually used, not the configured ones."""
    result = run(config=RoundConfig(difficulty=DifficultyConfig(tau_low=0.3, tau_high=0.6, calibration=(0.0, 1.0))))
    s = result.summary()
    assert (s["tau_low"], s["tau_high"]) == (pytest.approx(0.1), pytest.approx(0.9))
    assert (s["n_inlier"], s["n_boundary"], s["n_outlier"]) == (0, 5, 0)


def test_round_is_deterministic_per_seed():
    a, b = run(), run()
    assert [x.to_dict() for x in a.rollouts] == [x.to_dict() for x in b.rollouts]
    assert a.examples == b.examples and a.ledger == b.ledger
    assert derive_seed(123, 1, "presample") != derive_seed(123, 2, "presample")


def test_uniform_baseline_spends_everything_in_one_phase():
    result = run(allocator=UniformBudget(samples_per_problem=8), config=RoundConfig(selection=SelectionConfig(train_classes=("inlier", "boundary", "outlier"))))
    s = result.summary()
    assert (s["samples_presample"], s["samples_resample"], s["samples_total"]) == (40, 0, 40)
    assert result.resamples == []


def test_finished_phases_are_read_back_not_redone():
    store = MemoryStore()
    first = run(store=store)
    assert set(store.phases) == {"presample_generated", "presample_scored", "resample_generated", "resample_scored"}

    class Refusing:
        def generate(self, requests, params):
            raise AssertionError("a finished phase was generated again")

    again = run(store=store, engine=Refusing())
    assert again.examples == first.examples and again.ledger == first.ledger
    # a run killed after generating the re-samples but before scoring them: only scoring is redone
    del store.phases["resample_scored"]
    partial = run(store=store, engine=Refusing())
    assert [r.to_dict() for r in partial.rollouts] == [r.to_dict() for r in first.rollouts]


def test_engine_returning_the_wrong_count_is_an_error():
    class Short(ScriptedEngine):
        def generate(self, requests, params):
            out = super().generate(requests, params)
            out["easy"] = out["easy"][:-1]
            return out

    with pytest.raises(RuntimeError, match="Short returned 2 completions for problem 'easy', expected 3"):
        run(engine=Short())


def _threaded_ranks(world, run_rank):
    """Run ``run_rank(rank, gather, broadcast)`` in ``world`` threads with barrier collectives."""
    import threading

    barrier = threading.Barrier(world)
    slots: dict[tuple[int, int], object] = {}
    calls = [0] * world

    def collective(rank, value):
        n = calls[rank]
        calls[rank] += 1
        slots[(n, rank)] = value
        barrier.wait()
        return [slots[(n, r)] for r in range(world)]

    results: dict[int, object] = {}

    def worker(rank):
        results[rank] = run_rank(
            rank, lambda mine: collective(rank, mine), lambda value: collective(rank, value)[0]
        )

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == list(range(world))
    return results


def test_sharded_round_takes_the_same_decisions_as_one_process():
    """Three ranks in threads, each sampling its third, with a barrier-based all-gather:
    every rank reaches exactly the one-process rollouts, ledger and pairs."""
    results = _threaded_ranks(3, lambda rank, gather, _: run(shard=(rank, 3), gather=gather))
    whole = run()
    for rank, result in results.items():
        assert result.ledger == whole.ledger, rank
        assert [x.to_dict() for x in result.rollouts] == [x.to_dict() for x in whole.rollouts], rank
        assert result.examples == whole.examples, rank


def test_rank_zeros_decisions_are_broadcast():
    """Rank 1's verifier cannot parse one gold (think: a timeout there only). With
    ``broadcast`` every rank uses rank 0's decisions, so shards stay aligned and the round
    equals the one-process round on every rank."""

    class FlakyOnRank1(BoxedNumberVerifier):
        def __init__(self, rank):
            self.rank = rank

        def check_golds(self, golds):
            ok = super().check_golds(golds)
            return [good and not (self.rank == 1 and i == 1) for i, good in enumerate(ok)]

    def run_rank(rank, gather, broadcast):
        return run_round(
            problems(), engine=ScriptedEngine(), verifier=FlakyOnRank1(rank), prm=KeywordPRM(),
            allocator=HierarchicalBudget(samples_per_problem=8, n_presample=3),
            config=RoundConfig(difficulty=DifficultyConfig(tau_low=0.3, tau_high=0.6)),
            render_prompt=lambda p: f"Q: {p.question}\nA:", iteration=1, seed=123,
            shard=(rank, 3), gather=gather, broadcast=broadcast,
        )

    results = _threaded_ranks(3, run_rank)
    whole = run()
    for rank, result in results.items():
        assert result.dropped == whole.dropped == ["bad"], rank
        assert result.ledger == whole.ledger, rank
        assert [x.to_dict() for x in result.rollouts] == [x.to_dict() for x in whole.rollouts], rank
        assert result.examples == whole.examples, rank


def test_shard_arguments_are_checked():
    with pytest.raises(ValueError, match="needs a gather function"):
        run(shard=(0, 2))
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        run(shard=(2, 2), gather=lambda mine: [mine])


class PlannedEngine:
    """Answers each problem by plan: ``pre[pid]`` verdicts for the pre-sample call, then
    ``re[pid]`` (cycled) for the re-sample call; ``guess`` problems hedge every step, so the
    KeywordPRM scores them 0.1."""

    def __init__(self, pre, re, guess=()):
        self.pre, self.re, self.guess, self.calls = pre, re, set(guess), []

    def generate(self, requests, params):
        plan = self.pre if not self.calls else self.re
        self.calls.append({r.key: r.n for r in requests})
        out = {}
        for req in requests:
            hedge = "guess" if req.key in self.guess else "so"
            verdicts = plan[req.key]
            out[req.key] = [
                Completion(f"Step 1: {req.key} call {len(self.calls)} try {i}\n\n{hedge} \\boxed{{{7 if verdicts[i % len(verdicts)] else 8}}}", "stop", 9)
                for i in range(req.n)
            ]
        return out


def planned_round(engine, split, **kw):
    """Three problems, K=8, n_p=3: ``easy`` right 3/3 (inlier), ``mid`` 1/3 (boundary), ``hard``
    wrong 3/3 with hedged steps (outlier); the 15 remaining samples go to ``split``."""
    probs = [Problem(pid, f"question {pid}", "7") for pid in ("easy", "mid", "hard")]
    return run_round(
        probs,
        engine=engine,
        verifier=BoxedNumberVerifier(),
        prm=KeywordPRM(),
        allocator=HierarchicalBudget(samples_per_problem=8, n_presample=3),
        config=RoundConfig(difficulty=DifficultyConfig(tau_low=0.3, tau_high=0.6), selection=SelectionConfig(train_classes=tuple(split))),
        seed=7,
        **kw,
    )


PLAN_PRE = {"easy": [True], "mid": [True, False, False], "hard": [False]}


@pytest.mark.parametrize(
    "split, resampled",
    [(["outlier"], {"hard"}), (["inlier"], {"easy"}), (["boundary"], {"mid"}), (["inlier", "outlier"], {"easy", "hard"})],
    ids=["outlier", "inlier", "boundary", "inlier+outlier"],
)
def test_the_split_is_what_is_resampled_and_trained_on(split, resampled):
    """The pilot study's unit: the split receives all (8 - 3) * 3 = 15 re-samples. An outlier
    re-sampled until one answer is right gives pairs (the right re-sample chosen, a wrong
    pre-sample rejected); an inlier re-sampled until one is wrong likewise. The round spends
    exactly K * N = 24 on any split, and trains on the split only."""
    engine = PlannedEngine(PLAN_PRE, {"easy": [False, True], "mid": [False], "hard": [True, False]}, guess={"hard"})
    result = planned_round(engine, split)
    assert {pid: d.difficulty.value for pid, d in result.difficulties.items()} == {"easy": "inlier", "mid": "boundary", "hard": "outlier"}
    assert set(engine.calls[1]) == resampled and sum(engine.calls[1].values()) == 15
    assert result.ledger.total == result.ledger.budget_total == 24
    trained = {p.problem_id for p in result.examples}
    assert trained == resampled
    for pair in result.examples:
        assert "boxed{7}" in pair.chosen and "boxed{8}" in pair.rejected
    if "hard" in resampled:  # only a re-sample of the outlier is right: it is the chosen side
        assert all("call 2" in p.chosen for p in result.examples if p.problem_id == "hard")


def test_pairs_pool_pre_and_resamples():
    """``mid``'s one right answer is a pre-sample and all 15 re-samples are wrong: the pair
    exists only if pre-samples are in the pool (k = min(1 right, 17 wrong) = 1)."""
    engine = PlannedEngine(PLAN_PRE, {"easy": [True], "mid": [False], "hard": [False]}, guess={"hard"})
    result = planned_round(engine, ["boundary"])
    assert len(result.examples) == 1
    (pair,) = result.examples
    assert "call 1 try 0" in pair.chosen and "boxed{8}" in pair.rejected


class _FewTexts:
    """Every sample is one of two texts per problem, so most of a round's responses repeat."""

    def generate(self, requests, params):
        out = {}
        for req in requests:
            rng = random.Random(f"{params.seed}:{req.key}")
            out[req.key] = [Completion(f"Step 1: {req.key}\n\nso \\boxed{{{rng.choice((7, 8))}}}", "stop", 9)
                            for _ in range(req.n)]
        return out


class _CountingVerifier(BoxedNumberVerifier):
    def __init__(self):
        self.seen = []

    def verify(self, responses, golds):
        self.seen.extend(responses)
        return super().verify(responses, golds)


class _CountingPRM(KeywordPRM):
    def __init__(self):
        self.seen = []

    def score(self, requests):
        self.seen.extend((r.question, r.response) for r in requests)
        return super().score(requests)


def test_a_repeated_response_is_verified_and_scored_once_per_problem():
    """Within a round (pre-samples and re-samples together) a problem's identical texts share
    one verifier call and one PRM score; every rollout still gets the verdict and the step
    scores it would get alone."""
    verifier, prm = _CountingVerifier(), _CountingPRM()
    result = run_round(problems(), engine=_FewTexts(), verifier=verifier, prm=prm,
                       allocator=HierarchicalBudget(samples_per_problem=8, n_presample=3),
                       config=RoundConfig(difficulty=DifficultyConfig(tau_low=0.3, tau_high=0.6)), seed=1)
    distinct = {(r.problem_id, r.text) for r in result.rollouts}
    assert len(result.rollouts) > 2 * len(distinct)  # the workload does repeat itself
    assert len(prm.seen) == len(set(prm.seen)) == len(verifier.seen) == len(distinct)
    assert result.summary()["distinct_responses"] == len(distinct)
    assert any(r.problem_id == r2.problem_id and r.text == r2.text
               for r in result.presamples for r2 in result.resamples)  # re-samples reuse pre-sample scores
    by_id = {p.id: p for p in problems()}
    for r in result.rollouts:
        alone = BoxedNumberVerifier().verify([r.text], [by_id[r.problem_id].answer])[0]
        assert r.correct == alone
        request = StepScoringRequest(by_id[r.problem_id].question, tuple(r.text.split("\n\n")), alone, r.text)
        assert list(r.score.step_scores) == KeywordPRM().score([request])[0]


def test_max_examples_keeps_a_seeded_subsample_and_records_the_uncut_count(tmp_path):
    """``selection.max_examples`` cuts the round's pairs to the first n of the same seeded
    shuffle (the same sampling, the same pairs otherwise), and ``summary.json`` keeps how many
    the selection made, also through a write and read back."""
    from hs_star_pl.core.artifacts import read_round, write_round

    classes = ("inlier", "boundary", "outlier")
    full = run(allocator=UniformBudget(samples_per_problem=8), config=RoundConfig(selection=SelectionConfig(train_classes=classes)))
    n = len(full.examples)
    assert n >= 3
    cut = run(allocator=UniformBudget(samples_per_problem=8),
              config=RoundConfig(selection=SelectionConfig(train_classes=classes, max_examples=n - 2)))
    assert cut.examples == full.examples[: n - 2]
    assert [r.to_dict() for r in cut.rollouts] == [r.to_dict() for r in full.rollouts]
    assert (cut.summary()["n_pairs"], cut.summary()["n_examples_selected"]) == (n - 2, n)
    assert (full.summary()["n_pairs"], full.summary()["n_examples_selected"]) == (n, n)
    write_round(tmp_path / "round_001", cut)
    assert read_round(tmp_path / "round_001").summary()["n_examples_selected"] == n
    above = run(allocator=UniformBudget(samples_per_problem=8),
                config=RoundConfig(selection=SelectionConfig(train_classes=classes, max_examples=n + 5)))
    assert above.examples == full.examples


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_max_examples_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="selection.max_examples"):
        SelectionConfig(max_examples=bad)


def test_oracle_samples_classify_but_are_neither_counted_nor_trained_on():
    """``difficulty.oracle_samples=24``: after the 3 pre-samples each problem gets 24 more that
    only classify it. mid1 and mid2 (right half the time) are boundary on 24 samples whatever
    their 3 pre-samples said; the ledger still spends exactly K * N = 40 (the 25 re-samples on
    the oracle's boundary), and the 120 oracle samples are in no rollout and no pair."""
    engine = ScriptedEngine()
    store = MemoryStore()
    config = RoundConfig(difficulty=DifficultyConfig(tau_low=0.3, tau_high=0.6, oracle_samples=24))
    result = run(engine=engine, config=config, store=store)
    s = result.summary()
    d = {pid: x.difficulty.value for pid, x in result.difficulties.items()}
    assert d == {"easy": "inlier", "mid1": "boundary", "mid2": "boundary", "hard": "boundary", "hard2": "outlier"}
    assert all(x.n_samples == 24 for x in result.difficulties.values())
    assert engine.calls[0] == [(pid, 3) for pid in P_RIGHT] and engine.calls[1] == [(pid, 24) for pid in P_RIGHT]
    spent = {pid: n for pid, n in result.ledger.resample.items() if n > 0}
    assert dict(engine.calls[2]) == spent and set(spent) == {"mid1", "mid2", "hard"} and sum(spent.values()) == 25
    assert (s["samples_total"], s["budget_total"], s["samples_oracle"]) == (40, 40, 120)
    assert {r.rollout.phase for r in result.rollouts} <= {Phase.PRESAMPLE, Phase.RESAMPLE}
    keys = {r.rollout.key for r in result.rollouts}
    assert all(p.chosen_key in keys and p.rejected_key in keys for p in result.examples)
    assert {"oracle_generated", "oracle_scored"} <= set(store.phases)
    # the same round without the oracle classifies from the 3 pre-samples instead
    plain = run(config=RoundConfig(difficulty=DifficultyConfig(tau_low=0.3, tau_high=0.6)))
    assert all(x.n_samples == 3 for x in plain.difficulties.values()) and plain.summary()["samples_oracle"] == 0
    with pytest.raises(ValueError, match="difficulty.oracle_samples"):
        DifficultyConfig(oracle_samples=0)


def test_sequential_budget_samples_in_waves_until_each_problem_has_a_pair():
    """K=8, n_p=2 over the 5 gradeable problems (40 samples). easy (always right) and hard /
    hard2 (always wrong) never get a pair, so they keep receiving one sample per wave up to the
    cap of 2K = 16; mid1 and mid2 stop once they have a right and a wrong answer. Every
    sample is in the ledger, each wave its own engine call and store phase, and the round is
    the same when read back from the store."""
    from hs_star_pl.core.budget import SequentialBudget, has_pair

    allocator = SequentialBudget(samples_per_problem=8, n_presample=2)
    classes = ("inlier", "boundary", "outlier")
    config = RoundConfig(difficulty=DifficultyConfig(tau_low=0.3, tau_high=0.6), selection=SelectionConfig(train_classes=classes))
    engine, store = ScriptedEngine(), MemoryStore()
    result = run(engine=engine, allocator=allocator, config=config, store=store)
    ledger = result.ledger
    assert ledger.total == 40 and sum(ledger.presample.values()) == 10
    assert all(n == 1 for call in engine.calls[1:] for _, n in call)  # one sample per open problem per wave
    n_waves = len(engine.calls) - 1
    assert {f"resample_w{w:03d}_scored" for w in range(n_waves)} <= set(store.phases)
    verdicts = {pid: [r.correct for r in result.rollouts if r.problem_id == pid] for pid in P_RIGHT}
    for pid in ("mid1", "mid2"):
        # it stopped on the sample that gave it its pair: the verdicts before the last had none
        assert has_pair(verdicts[pid]) and (len(verdicts[pid]) == 2 or not has_pair(verdicts[pid][:-1]))
    for pid in ("easy", "hard", "hard2"):
        assert not has_pair(verdicts[pid])
    spent_on_stuck = sum(len(verdicts[pid]) for pid in ("easy", "hard", "hard2"))
    assert spent_on_stuck == 40 - len(verdicts["mid1"]) - len(verdicts["mid2"])
    for pid in P_RIGHT:  # indices run on across waves
        assert sorted(r.rollout.sample_index for r in result.rollouts if r.problem_id == pid) == list(range(len(verdicts[pid])))
    assert {p.problem_id for p in result.examples} <= {"mid1", "mid2"} and result.examples

    class Refusing:
        def generate(self, requests, params):
            raise AssertionError("a finished wave was generated again")

    again = run(engine=Refusing(), allocator=allocator, config=config, store=store)
    assert [r.to_dict() for r in again.rollouts] == [r.to_dict() for r in result.rollouts] and again.ledger == ledger
