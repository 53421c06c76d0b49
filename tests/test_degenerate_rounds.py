"""Rounds that yield no training examples: why (in words), and what the loop does about it.

The four ways a round ends up empty (every gold ungradeable, no boundary problem, boundary
problems without a correct/incorrect pair, every response the same text) are told apart by
``explain_no_examples`` (checked with the round fakes). Through the CLI, the default
``self_training.on_empty_round: skip`` trains on nothing that iteration with a warning and
goes on; ``error`` stops with that message; the round's artifacts are kept either way.
"""

from __future__ import annotations

import json
import sys

import pytest
from safetensors.torch import load_file

from hs_star_pl.cli import HSStarCLI, main
from hs_star_pl.core.artifacts import DONE, completed_rounds, round_dir
from hs_star_pl.core.budget import HierarchicalBudget
from hs_star_pl.core.difficulty import DifficultyConfig
from hs_star_pl.core.protocols import Completion
from hs_star_pl.core.records import Problem
from hs_star_pl.core.rounds import RoundConfig, explain_no_examples, run_round
from hs_star_pl.core.selection import SelectionConfig
from tests.helpers.round_fakes import BoxedNumberVerifier, KeywordPRM, ScriptedEngine
from tests.helpers.tiny_setup import REPO

CONFIG = RoundConfig(difficulty=DifficultyConfig(tau_low=0.3, tau_high=0.6))


class SameTextEngine:
    """Every sample of a problem is one and the same wrong answer (greedy decoding)."""

    def generate(self, requests, params):
        return {r.key: [Completion(f"Step 1: {r.key}\n\nso \\boxed{{8}}", "stop", 9)] * r.n for r in requests}


def round_of(problem_ids, engine=None, selection=SelectionConfig(), gold="7"):
    problems = [Problem(pid, f"question {pid}", gold) for pid in problem_ids]
    result = run_round(
        problems, engine=engine or ScriptedEngine(), verifier=BoxedNumberVerifier(), prm=KeywordPRM(),
        allocator=HierarchicalBudget(samples_per_problem=8, n_presample=3),
        config=RoundConfig(CONFIG.sampling, CONFIG.difficulty, selection), iteration=0, seed=1,
    )
    assert result.examples == []
    return explain_no_examples(result, selection)


def test_the_reasons_for_an_empty_round_are_told_apart():
    assert round_of(["easy", "hard"], gold="seven") == (
        "all 2 problems were dropped: the verifier cannot parse their gold answers (see the warnings naming them)")
    # easy: always right with PRM 0.9 > 0.6 (inlier); hard2: always wrong, PRM 0.1 < 0.3 (outlier)
    assert round_of(["easy", "hard2"]) == (
        "no problem is in selection.train_classes ['boundary'] (1 inlier, 0 boundary, 1 outlier, with "
        "tau_low=0.3, tau_high=0.6)")
    # hard: always wrong but PRM 0.9, so on the boundary; its 8 distinct responses are all wrong
    assert round_of(["hard"]) == (
        "none of the 1 boundary problem gave a pair: 0 had both correct and incorrect responses "
        "(0 only correct, 1 only incorrect, 0 only ungradeable)")
    assert round_of(["hard"], engine=SameTextEngine()) == (
        "every response of each of the 1 boundary problem is the same text (greedy decoding, "
        "self_training.sampling.temperature=0, or a collapsed policy)")
    assert round_of(["easy"], selection=SelectionConfig(train_classes=("inlier",), objective="sft",
                                                       min_chosen_prm=1.0)).startswith(
        "none of the 1 inlier problem has a usable correct response (1 only correct")


@pytest.fixture
def ungradeable_pool(tmp_path):
    """20 problems whose gold (``\\text{}``) math-verify cannot parse (the loader itself refuses
    golds that are empty after normalisation, such as ``$$``)."""
    path = tmp_path / "ungradeable.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "question": f"Start with {i}. Add 4. What is the result?",
                                        "answer": "\\text{}"}) + "\n" for i in range(20)))
    return path


MATH_VERIFY = ["--self_training.verifier.class_path=hs_star_pl.verifiers.MathVerifyVerifier"]


def args_for(run, problems, *extra):
    return ["fit", "-c", str(REPO / "configs" / "base.yaml"), "-c", str(REPO / "configs" / "debug" / "tiny_self_training.yaml"),
            f"--self_training.problems_file={problems}", f"--trainer.default_root_dir={run}",
            "--trainer.enable_progress_bar=false", *extra]


def test_empty_rounds_skip_training_with_a_warning_and_the_run_goes_on(ungradeable_pool, tmp_path):
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"round 1 produced no training examples: all 10 problems were dropped.*"
                                         r"Iteration 1 trains on nothing \(M_2 = M_1\)"):
        cli = HSStarCLI(args=args_for(run, ungradeable_pool, *MATH_VERIFY))
    assert completed_rounds(run) == [0, 1]
    for t in (0, 1):
        summary = json.loads((round_dir(run, t) / "summary.json").read_text())
        assert summary["n_pairs"] == 0 and summary["n_dropped_ungradeable"] == 10
        assert summary["empty_reason"].startswith("all 10 problems were dropped")
    # both iterations ran their epoch (one skipped placeholder step each) and nothing was trained
    assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 2
    assert (run / "checkpoints" / "last.ckpt").is_file()
    w0, w1 = (load_file(run / "hf" / f"policy_{t + 1:03d}" / "model.safetensors") for t in (0, 1))
    initial = {k: v for k, v in cli.model.model.state_dict().items()}
    assert all((w0[k] == w1[k]).all() and (w1[k] == initial[k]).all() for k in w1)


def test_on_empty_round_error_stops_with_the_reason_and_keeps_the_round(ungradeable_pool, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["hs-star"])
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(args_for(run, ungradeable_pool, *MATH_VERIFY, "--self_training.on_empty_round=error"))
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err
    assert err[err.index("hs-star: error:"):].strip() == (
        f"hs-star: error: round 0 produced no training examples: all 10 problems were dropped: the verifier "
        f"cannot parse their gold answers (see the warnings naming them). Its artifacts are kept in "
        f"{round_dir(run, 0)}. Set self_training.on_empty_round: skip to go on without training this iteration, "
        f"or change the data (self_training.problems_per_iteration), the classes "
        f"(self_training.selection.train_classes), the thresholds (self_training.difficulty) or the budget "
        f"(self_training.budget).")
    assert (round_dir(run, 0) / DONE).is_file()


def test_a_round_without_boundary_problems_after_sampling_is_skipped(tmp_path):
    """A random tiny policy never answers right and the outcome-only PRM scores its steps 0, so
    every problem is an outlier: sampling ran, the round is written, training is skipped."""
    run = tmp_path / "run"
    problems = REPO / "configs" / "data" / "arith_stepwise.jsonl"
    with pytest.warns(UserWarning, match=r"round 0 produced no training examples: no problem is in "
                                         r"selection.train_classes \['boundary'\] \(0 inlier, 0 boundary, 10 outlier"):
        HSStarCLI(args=args_for(run, problems, "--self_training.prm=hs_star_pl.prm.OutcomePRM",
                                "--self_training.sampling.max_new_tokens=16", "--self_training.n_iterations=1",
                                "--trainer.max_epochs=1"))
    summary = json.loads((round_dir(run, 0) / "summary.json").read_text())
    assert summary["samples_presample"] == 20 and summary["n_outlier"] == 10 and summary["n_pairs"] == 0
    assert (run / "hf" / "policy_001" / "model.safetensors").is_file()
