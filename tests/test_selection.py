"""Pair and SFT selection: the paper's rule worked by hand, plus its guarantees."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hs_star_pl.core.records import Difficulty, Phase, PreferencePair, Problem, ProblemDifficulty, Rollout, RolloutScore, ScoredRollout
from hs_star_pl.core.selection import SelectionConfig, build_pairs_for_problem, build_sft_for_problem, select_training_data


def r(pid, i, correct, score, text=None):
    steps = () if score is None else (score,)
    return ScoredRollout(Rollout(pid, i, Phase.PRESAMPLE if i < 3 else Phase.RESAMPLE, text or f"{pid}-{i}"), RolloutScore(correct, steps))


def test_top_k_of_each_side_by_process_reward():
    """4 correct (scores .9 .1 .5 .7), 2 wrong (.3 .8), 1 ungradeable: k = min(4, 2) = 2.
    Chosen are the two best correct (.9 and .7), rejected both wrong ones; the ungradeable
    response is on neither side.
    """
    rollouts = [r("p", 0, True, .9), r("p", 1, True, .1), r("p", 2, False, .3), r("p", 3, True, .5),
                r("p", 4, None, .99), r("p", 5, False, .8), r("p", 6, True, .7)]
    pairs = build_pairs_for_problem("PROMPT", rollouts, random.Random(0))
    assert len(pairs) == 2
    assert {p.chosen for p in pairs} == {"p-0", "p-6"}
    assert {p.rejected for p in pairs} == {"p-2", "p-5"}
    assert all(p.prompt == "PROMPT" and p.problem_id == "p" for p in pairs)
    used = [p.chosen_key for p in pairs] + [p.rejected_key for p in pairs]
    assert len(used) == len(set(used))  # each response used once
    assert {(p.chosen_key, p.chosen_score) for p in pairs} == {("p#0", .9), ("p#6", .7)}


def test_wrong_side_keeps_its_highest_scored_responses():
    """1 correct, 3 wrong (.2 .6 .4): k = 1, the rejected one is the .6 wrong response."""
    pairs = build_pairs_for_problem("P", [r("p", 0, True, .5), r("p", 1, False, .2), r("p", 2, False, .6), r("p", 3, False, .4)], random.Random(0))
    assert [(p.chosen, p.rejected) for p in pairs] == [("p-0", "p-2")]


def test_no_pairs_without_both_sides_and_no_identical_pairs():
    assert build_pairs_for_problem("P", [r("p", 0, True, .5), r("p", 1, True, .6)], random.Random(0)) == []
    assert build_pairs_for_problem("P", [r("p", 0, False, .5), r("p", 1, None, .6)], random.Random(0)) == []
    same = [r("p", 0, True, .5, text="x = 1 \n"), r("p", 1, False, .5, text="x = 1")]
    assert build_pairs_for_problem("P", same, random.Random(0)) == []


def test_responses_without_steps_rank_last():
    pairs = build_pairs_for_problem("P", [r("p", 0, True, None), r("p", 1, True, .1), r("p", 2, False, .5)], random.Random(0))
    assert [p.chosen for p in pairs] == ["p-1"]


def test_pairing_is_seeded():
    rollouts = [r("p", i, i % 2 == 0, i / 10) for i in range(10)]
    a = build_pairs_for_problem("P", rollouts, random.Random(1))
    assert a == build_pairs_for_problem("P", rollouts, random.Random(1))
    variants = {tuple((p.chosen, p.rejected) for p in build_pairs_for_problem("P", rollouts, random.Random(s))) for s in range(10)}
    assert len(variants) > 1


score_st = st.one_of(st.none(), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]))


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.tuples(st.sampled_from([True, False, None]), score_st, st.booleans()), max_size=16),
    seed=st.integers(0, 10**6),
)
def test_pair_rule_properties(rows, seed):
    """Any mix of verdicts and PRM scores: k = min(#correct, #incorrect); the chosen are the
    k best-scored correct responses and the rejected the k best-scored incorrect ones
    (no score ranks last); ungradeable responses are on neither side; each response is used
    at most once; no pair has the same text on both sides (some rows share one text)."""
    rollouts = [r("p", i, ok, score, text="same" if dup else None) for i, (ok, score, dup) in enumerate(rows)]
    pairs = build_pairs_for_problem("P", rollouts, random.Random(seed))
    correct = [x for x in rollouts if x.correct is True]
    wrong = [x for x in rollouts if x.correct is False]
    k = min(len(correct), len(wrong))

    def beats(a, b) -> bool:  # a scored response beats an unscored one, then the higher score, then the earlier sample
        if (a.prm_min is None) != (b.prm_min is None):
            return b.prm_min is None
        if a.prm_min != b.prm_min:
            return a.prm_min > b.prm_min
        return a.rollout.sample_index < b.rollout.sample_index

    def top(xs):  # a response is among the top k when fewer than k others beat it
        return {x.rollout.key for x in xs if sum(beats(y, x) for y in xs if y is not x) < k}

    top_correct, top_wrong = top(correct), top(wrong)
    identical = sum(p.chosen.strip() == p.rejected.strip() for p in pairs)
    assert identical == 0
    assert len(pairs) <= k
    assert {p.chosen_key for p in pairs} <= top_correct and {p.rejected_key for p in pairs} <= top_wrong
    keys = [p.chosen_key for p in pairs] + [p.rejected_key for p in pairs]
    assert len(keys) == len(set(keys))
    if not any(dup for _, _, dup in rows):  # all texts distinct: exactly k pairs, the top k of each side
        assert len(pairs) == k
        assert {p.chosen_key for p in pairs} == top_correct and {p.rejected_key for p in pairs} == top_wrong
    assert pairs == build_pairs_for_problem("P", rollouts, random.Random(seed))


def test_the_best_scored_of_each_side_are_paired_worked_by_hand():
    """Correct: #0 (0.9), #1 (no score), #2 (0.5), #3 (0.9); wrong: #4 (0.2), #5 (0.8).
    k = min(4, 2) = 2. The chosen are the two best correct: #0 and #3 tie at 0.9 and both beat
    #2 (0.5) and the unscored #1. The rejected are both wrong ones."""
    rollouts = [r("p", 0, True, .9), r("p", 1, True, None), r("p", 2, True, .5), r("p", 3, True, .9),
                r("p", 4, False, .2), r("p", 5, False, .8)]
    pairs = build_pairs_for_problem("P", rollouts, random.Random(0))
    assert sorted(p.chosen_key for p in pairs) == sorted([rollouts[0].rollout.key, rollouts[3].rollout.key])
    assert sorted(p.rejected_key for p in pairs) == sorted([rollouts[4].rollout.key, rollouts[5].rollout.key])


def test_sft_examples_are_distinct_best_first_and_capped():
    rollouts = [r("p", 0, True, .2, "a"), r("p", 1, True, .9, "b"), r("p", 2, True, .8, " b "), r("p", 3, False, 1.0, "c"), r("p", 4, True, .5, "d")]
    got = build_sft_for_problem("P", rollouts, max_per_problem=2)
    assert [(e.response, e.score) for e in got] == [("b", .9), ("d", .5)]


def classed(cls_by_pid):
    return {pid: ProblemDifficulty(pid, .5, .5, c, 3, 3) for pid, c in cls_by_pid.items()}


def test_train_classes_pick_the_split():
    problems = [Problem(pid, f"Q {pid}", "1") for pid in ("a", "b", "c")]
    rollouts = [r(pid, i, i % 2 == 0, .5) for pid in ("a", "b", "c") for i in range(4)]
    diffs = classed({"a": Difficulty.INLIER, "b": Difficulty.BOUNDARY, "c": Difficulty.OUTLIER})
    def pids(classes, objective="dpo"):
        cfg = SelectionConfig(train_classes=classes, objective=objective)
        return sorted({e.problem_id for e in select_training_data(problems, rollouts, diffs, cfg, lambda p: "T:" + p.question, seed=0)})
    assert pids(("boundary",)) == ["b"]
    assert pids(("inlier", "outlier")) == ["a", "c"]
    assert pids(("inlier", "boundary", "outlier")) == ["a", "b", "c"]
    sft = select_training_data(problems, rollouts, diffs, SelectionConfig(objective="sft"), lambda p: "T:" + p.question, 0)
    assert all(e.prompt == "T:Q b" and e.response.startswith("b-") for e in sft)
    dpo = select_training_data(problems, rollouts, diffs, SelectionConfig(), lambda p: "T:" + p.question, 0)
    assert all(isinstance(e, PreferencePair) and e.prompt == "T:Q b" for e in dpo) and len(dpo) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_classes": ()}, "selection.train_classes must name at least one"),
        ({"train_classes": ("middle",)}, r"unknown class \['middle'\]; valid: \['inlier', 'boundary', 'outlier'\]"),
        ({"objective": "ppo"}, "selection.objective must be 'dpo' or 'sft'"),
        ({"max_sft_per_problem": 0}, "selection.max_sft_per_problem must be >= 1"),
    ],
)
def test_bad_selection_config_names_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelectionConfig(**kwargs)


def test_min_chosen_prm_keeps_lucky_answers_out_of_chosen():
    """Correct .9 and .0 (a right answer through a failed step), wrong .4 and .3. The paper's
    rule pairs both correct ones (k = 2); with min_chosen_prm=0.5 only the .9 one is eligible,
    k = 1, and it meets the best wrong response."""
    rollouts = [r("p", 0, True, .9), r("p", 1, True, 0.0), r("p", 2, False, .4), r("p", 3, False, .3)]
    assert len(build_pairs_for_problem("P", rollouts, random.Random(0))) == 2
    pairs = build_pairs_for_problem("P", rollouts, random.Random(0), min_chosen_prm=0.5)
    assert [(p.chosen, p.rejected) for p in pairs] == [("p-0", "p-2")]
    sft = build_sft_for_problem("P", rollouts, max_per_problem=4, min_chosen_prm=0.5)
    assert [e.response for e in sft] == ["p-0"]
    with pytest.raises(ValueError, match=r"selection.min_chosen_prm must be in \[0, 1\]"):
        SelectionConfig(min_chosen_prm=1.5)


def stepped(pid, i, correct, step_scores, text):
    return ScoredRollout(Rollout(pid, i, Phase.PRESAMPLE, text), RolloutScore(correct, tuple(step_scores)))


def test_truncate_rejected_cuts_after_the_first_failing_step():
    """Rejected ``A / B(wrong) / C / D``: cut after B, the mistake, dropping C and D, which
    compute correctly from B's wrong value. A rejected response whose only failure is its
    last step, or with none, stays whole; so does everything without the option."""
    chosen = stepped("p", 0, True, (1, 1, 1, 1), "A\n\nB\n\nC\n\nD")
    wrong_mid = stepped("p", 1, False, (1, 0, 1, 1), "A\n\nB'\n\n\n\nC'\n\nD'")
    wrong_last = stepped("p", 2, False, (1, 1, 1, 0), "A\n\nB\n\nC\n\nD'")
    chosen2 = stepped("p", 3, True, (1, 1, 1, .9), "A\n\nB\n\nC\n\nD ")
    rollouts = [chosen, wrong_mid, wrong_last, chosen2]
    whole = build_pairs_for_problem("P", rollouts, random.Random(0))
    assert sorted(p.rejected for p in whole) == sorted([wrong_mid.text, wrong_last.text])
    assert not any(p.rejected_cut for p in whole)
    cut = build_pairs_for_problem("P", rollouts, random.Random(0), truncate_rejected_below=0.5)
    by_key = {p.rejected_key: p for p in cut}
    assert (by_key["p#1"].rejected, by_key["p#1"].rejected_cut) == ("A\n\nB'", True)
    assert (by_key["p#2"].rejected, by_key["p#2"].rejected_cut) == (wrong_last.text, False)
    assert all(p.rejected_score == 0 for p in cut)  # the score is the full response's
    with pytest.raises(ValueError, match=r"selection.truncate_rejected_below must be in \(0, 1\]"):
        SelectionConfig(truncate_rejected_below=0.0)


def test_a_cut_rejected_survives_a_round_trip():
    pair = PreferencePair("p", "Q", "A\n\nB", "A\n\nB'", "p#0", "p#1", 1.0, 0.0, rejected_cut=True)
    assert PreferencePair.from_dict(pair.to_dict()) == pair
    legacy = {k: v for k, v in pair.to_dict().items() if k != "rejected_cut"}  # a round written before the field
    assert PreferencePair.from_dict(legacy).rejected_cut is False


def test_the_cut_follows_the_rounds_step_delimiter():
    """With ``step_delimiter="\\n"`` the steps are lines; the cut is after the failing line."""
    problems = [Problem("b", "Q b", "1")]
    rollouts = [stepped("b", 0, True, (1, 1, 1), "x\ny\nz"), stepped("b", 1, False, (0, 1, 1), "x'\ny'\nz'")]
    diffs = classed({"b": Difficulty.BOUNDARY})
    cfg = SelectionConfig(truncate_rejected_below=0.5)
    (pair,) = select_training_data(problems, rollouts, diffs, cfg, lambda p: p.question, 0, step_delimiter="\n")
    assert (pair.rejected, pair.rejected_cut) == ("x'", True)
    (whole,) = select_training_data(problems, rollouts, diffs, cfg, lambda p: p.question, 0)  # "\n\n": one step
    assert (whole.rejected, whole.rejected_cut) == ("x'\ny'\nz'", False)
