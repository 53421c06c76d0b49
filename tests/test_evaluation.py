"""Held-out evaluation arithmetic, with an engine whose answers are known."""

from __future__ import annotations

import pytest

from hs_star_pl.evaluation import evaluate, results_table
from hs_star_pl.protocols import Completion, SamplingParams
from hs_star_pl.records import Problem
from hs_star_pl.verifiers import ExactMatchVerifier


class KnownAnswers:
    """Answers problem p<i>'s samples with the listed boxed values, in order."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers

    def generate(self, requests, params):
        return {r.key: [Completion(f"so \\boxed{{{a}}}", "stop", 3 + len(a)) for a in self.answers[r.key][: r.n]] for r in requests}


def test_accuracy_is_the_mean_per_problem_fraction():
    """p1: 2 of 4 right (0.5); p2: 4 of 4 (1.0); p3: 0 of 4 (0.0) -> (0.5 + 1 + 0) / 3 = 0.5.
    Tokens: 3 + len(answer) per sample."""
    problems = [Problem("p1", "Q1", "7"), Problem("p2", "Q2", "12"), Problem("p3", "Q3", "3")]
    engine = KnownAnswers({"p1": ["7", "8", "7", "9"], "p2": ["12"] * 4, "p3": ["4", "5", "6", "7"]})
    result = evaluate(problems, engine=engine, verifier=ExactMatchVerifier(), render_prompt=lambda p: p.question,
                      params=SamplingParams(temperature=0.0), n_samples=4)
    assert result.accuracy == pytest.approx(0.5)
    assert [r["accuracy"] for r in result.rows] == [0.5, 1.0, 0.0]
    assert result.rows[0]["correct"] == [True, False, True, False]
    assert result.mean_tokens == pytest.approx((4 * 4 + 4 * 5 + 4 * 4) / 12)
    assert (result.n_problems, result.n_samples, result.n_ungradeable) == (3, 4, 0)


def test_results_table_has_a_row_per_policy():
    entries = [
        {"policy": 0, "summary": {"accuracy": 0.25, "n_problems": 200, "mean_tokens": 40.0, "n_ungradeable": 0}},
        {"policy": 1, "n_pairs": 57, "summary": {"accuracy": 0.3125, "n_problems": 200, "mean_tokens": None, "n_ungradeable": 2}},
    ]
    table = results_table(entries).splitlines()
    assert table[2] == "| M_0 | 0.250 | 200 | 40.0 | 0 |  |"
    assert table[3] == "| M_1 | 0.312 | 200 |  | 2 | 57 |"


def test_bad_sample_count_names_the_key():
    with pytest.raises(ValueError, match="evaluation.n_samples must be >= 1"):
        evaluate([], engine=KnownAnswers({}), verifier=ExactMatchVerifier(), render_prompt=str, params=SamplingParams(), n_samples=0)
