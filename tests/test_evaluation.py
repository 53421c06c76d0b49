"""The evaluation protocol's arithmetic, with an engine whose answers are known.

Every expected number below is worked out by hand in the test's docstring.
"""

from __future__ import annotations

import pytest

from hs_star_pl.core.protocols import Completion, SamplingParams
from hs_star_pl.core.records import Problem
from hs_star_pl.evaluation.protocol import (
    SUM_KEYS, EvalResult, add_sums, evaluate, grade, make_batch, pass_at_k, policy_entry, results_table, summarize,
)
from hs_star_pl.verifiers import ExactMatchVerifier


class KnownAnswers:
    """Answers problem ``key``'s samples with the listed boxed values, in order; records the calls."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers
        self.calls: list[tuple[list[tuple[str, int]], SamplingParams]] = []

    def generate(self, requests, params):
        self.calls.append(([(r.key, r.n) for r in requests], params))
        return {
            r.key: [Completion(f"so \\boxed{{{a}}}", "length" if a == "cut" else "stop", 3 + len(a)) for a in self.answers[r.key][: r.n]]
            for r in requests
        }


GOLDS = {"p1": "7", "p2": "12", "p3": "3", "p4": "5"}
SAMPLES = {  # right answers: p1 2 of 4, p2 4 of 4, p3 0 of 4, p4 1 of 4
    "p1": ["7", "8", "7", "9"],
    "p2": ["12"] * 4,
    "p3": ["4", "5", "6", "cut"],
    "p4": ["1", "2", "5", "4"],
}
PROBLEMS = [Problem(k, f"Q{k}", g) for k, g in GOLDS.items()]


def run(n_samples: int, pass_k=(), temperature=0.6) -> tuple[EvalResult, KnownAnswers]:
    engine = KnownAnswers(SAMPLES)
    result = evaluate(PROBLEMS, engine=engine, verifier=ExactMatchVerifier(), render_prompt=lambda p: p.question,
                      params=SamplingParams(temperature=temperature, top_p=0.95), n_samples=n_samples, pass_k=pass_k)
    return result, engine


def test_greedy_accuracy_counts_each_problem_once():
    """Greedy: the first answer of each problem: 7 (right), 12 (right), 4 (wrong), 1 (wrong)
    -> 2 / 4 = 0.5. Tokens 3 + len: 4, 5, 4, 4 -> 17 / 4 = 4.25."""
    result, engine = run(1, temperature=0.0)
    assert engine.calls[0][0] == [("p1", 1), ("p2", 1), ("p3", 1), ("p4", 1)]
    assert result.accuracy == 0.5 and result.summary()["metric"] == "acc"
    assert [r["correct"] for r in result.rows] == [[True], [True], [False], [False]]
    assert result.mean_tokens == pytest.approx(17 / 4)


def test_avg_at_k_and_pass_at_k_by_hand():
    """4 samples each, c = 2, 4, 0, 1 right.

    avg@4 = mean(c / 4) = (0.5 + 1 + 0 + 0.25) / 4 = 0.4375 (= pass@1).
    pass@2 = mean(1 - C(4-c, 2) / C(4, 2)) = (1 - 1/6, 1, 0, 1 - 3/6) -> (5/6 + 1 + 0 + 1/2) / 4 = 7/12.
    pass@4 = mean(c > 0) = 3 / 4.
    Tokens: 16 responses, 3 + len(answer) each: p1 4+4+4+4, p2 5*4, p3 4+4+4+6, p4 4*4 -> 70 / 16.
    One response (p3's "cut") ended at the token cap.
    """
    result, engine = run(4, pass_k=(1, 2, 4))
    assert engine.calls[0][0] == [("p1", 4), ("p2", 4), ("p3", 4), ("p4", 4)]
    assert engine.calls[0][1].temperature == 0.6
    assert [r["n_correct"] for r in result.rows] == [2, 4, 0, 1]
    assert result.accuracy == pytest.approx(0.4375)
    assert result.pass_at_k == pytest.approx({"pass@1": 0.4375, "pass@2": 7 / 12, "pass@4": 0.75})
    assert result.summary()["metric"] == "avg@4"
    assert result.mean_tokens == pytest.approx(70 / 16)
    assert result.n_truncated == 1 and result.n_ungradeable == 0
    assert result.rows[0]["answers"] == ["7", "8", "7", "9"]
    assert result.rows[3]["pass_at_k"] == pytest.approx({"pass@1": 0.25, "pass@2": 0.5, "pass@4": 1.0})


def test_pass_at_k_edges():
    assert pass_at_k(32, 0, 32) == 0.0 and pass_at_k(32, 1, 32) == 1.0
    assert pass_at_k(32, 8, 1) == pytest.approx(0.25)
    assert pass_at_k(3, 1, 2) == pytest.approx(1 - 1 / 3)  # C(2,2) / C(3,2) = 1/3
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_sums_of_shards_give_the_same_numbers_as_the_whole():
    """What each rank adds up (its rows' sums) combines into exactly the one-process result."""
    result, _ = run(4, pass_k=(2,))
    halves = [add_sums(result.rows[0::2], (2,)), add_sums(result.rows[1::2], (2,))]
    total = {k: halves[0][k] + halves[1][k] for k in (*SUM_KEYS, "pass@2")}
    combined, whole = summarize(total, 4, (2,)), result.summary()
    assert combined.pop("pass_at_k") == pytest.approx(whole.pop("pass_at_k"))
    assert combined == pytest.approx(whole)


def test_ungradeable_counts_as_wrong_and_is_reported():
    """A gold that normalises to nothing makes its samples ungradeable (None): 0 right of 2."""
    batch = make_batch("b", [Problem("x", "Q", "$$")], render_prompt=lambda p: p.question,
                       params=SamplingParams(temperature=0.5), n_samples=2)
    with pytest.warns(UserWarning, match="ungradeable"):
        rows = grade(batch, {"x": [Completion("\\boxed{1}", "stop", 2)] * 2}, ExactMatchVerifier())
    s = EvalResult.from_rows(rows, 2).summary()
    assert (s["accuracy"], s["n_ungradeable"]) == (0.0, 2)


def test_rows_record_the_answer_the_verifier_extracted_by_its_mode():
    """Two unboxed responses to gold 7: "... so x = 7" and a Minerva-style final line. The
    strict rule finds no answer in the first (wrong) and reads "7$. I hope it is correct" in
    the second (wrong for exact match); the harness rules read 7 in both (right, 2 of 2).
    The rows show what was graded, not the strict rule's reading."""
    texts = ["Subtracting 3 from both sides, so x = 7",
             "Final Answer: The final answer is $7$. I hope it is correct."]
    batch = make_batch("b", [Problem("x", "Q", "7")], render_prompt=lambda p: p.question,
                       params=SamplingParams(temperature=0.5), n_samples=2)
    outputs = {"x": [Completion(t, "stop", 9) for t in texts]}
    (strict,) = grade(batch, outputs, ExactMatchVerifier())
    (harness,) = grade(batch, outputs, ExactMatchVerifier(extraction="harness"))
    assert strict["answers"] == [None, "7$. I hope it is correct"] and strict["correct"] == [False, False]
    assert harness["answers"] == ["7", "7"] and harness["correct"] == [True, True]
    assert harness["accuracy"] == 1.0


def test_an_engine_returning_too_few_samples_is_an_error():
    batch = make_batch("gsm8k", PROBLEMS[:1], render_prompt=lambda p: p.question, params=SamplingParams(), n_samples=2)
    with pytest.raises(RuntimeError, match="gsm8k/p1: the engine returned 1 responses, expected 2"):
        grade(batch, {"p1": [Completion("\\boxed{7}")]}, ExactMatchVerifier())


def test_sampled_batches_seed_per_request():
    greedy = make_batch("g", PROBLEMS, render_prompt=str, params=SamplingParams(temperature=0.0))
    sampled = make_batch("s", PROBLEMS, render_prompt=str, params=SamplingParams(temperature=0.6), n_samples=4)
    assert (greedy.seed_scope, sampled.seed_scope) == ("batch", "request")
    assert [(r.key, r.n) for r in sampled.requests()] == [(p.id, 4) for p in PROBLEMS]


def test_policy_entry_averages_benchmarks_unweighted_and_the_table_has_a_row_per_policy():
    """gsm8k 0.5 over 400 problems and aime24 avg@32 0.1 over 30: the average is
    (0.5 + 0.1) / 2 = 0.3, not weighted by problem count; mean tokens (100 + 300) / 2."""
    gsm = {"metric": "acc", "accuracy": 0.5, "pass_at_k": {}, "n_problems": 400, "n_samples": 1, "mean_tokens": 100.0,
           "n_ungradeable": 0, "n_truncated": 3}
    aime = {"metric": "avg@32", "accuracy": 0.1, "pass_at_k": {"pass@32": 0.4}, "n_problems": 30, "n_samples": 32,
            "mean_tokens": 300.0, "n_ungradeable": 1, "n_truncated": 0}
    m0 = policy_entry("M_0", {"gsm8k": gsm, "aime24": aime}, policy=0)
    assert m0["average"] == pytest.approx(0.3) and m0["mean_tokens"] == pytest.approx(200.0)
    m1 = policy_entry("M_1", {"gsm8k": {**gsm, "accuracy": 0.625}}, policy=1, n_pairs=57)
    table = results_table([m0, m1]).splitlines()
    assert table[0] == "| policy | gsm8k | aime24 avg@32 | average | mean tokens | pairs trained on |"
    assert table[2] == "| M_0 | 50.0 | 10.0 | 30.0 | 200.0 |  |"
    assert table[3] == "| M_1 | 62.5 |  | 62.5 | 100.0 | 57 |"
    assert "| M_0 | aime24 | 30 | 32 | avg@32 | 10.0 | pass@32 40.0 | 300.0 | 0 | 1 |" in table


def test_bad_sample_count_names_the_key():
    with pytest.raises(ValueError, match="evaluation.n_samples must be >= 1"):
        evaluate([], engine=KnownAnswers({}), verifier=ExactMatchVerifier(), render_prompt=str, params=SamplingParams(), n_samples=0)


def test_the_torchmetrics_totals_give_the_same_summary_as_the_rows():
    """BenchmarkMetric adds the same per-row sums (here in two updates, as two chunks would)."""
    from hs_star_pl.training.benchmark_metric import BenchmarkMetric

    result, _ = run(4, pass_k=(1, 2, 4))
    metric = BenchmarkMetric(4, (1, 2, 4))
    metric.update(result.rows[:1])
    metric.update(result.rows[1:])
    computed, expected = metric.compute(), result.summary()
    assert computed.pop("pass_at_k") == pytest.approx(expected.pop("pass_at_k"))
    assert computed == pytest.approx(expected)
    metric.reset()
    assert metric.compute()["n_problems"] == 0


@pytest.mark.parametrize("datamodule", [None, "a LightningDataModule of another kind"])
def test_the_evaluation_callback_refuses_a_data_module_that_cannot_render_its_prompts(tmp_path, datamodule):
    """The benchmarks' prompts are rendered by MathDataModule (data.template): with any other
    data module the callback stops at set-up, saying so, instead of failing at the first chunk."""
    from types import SimpleNamespace

    import lightning as L

    from hs_star_pl.training.evaluation import EvaluationCallback

    problems = tmp_path / "p.jsonl"
    problems.write_text('{"question": "1+1", "answer": "2"}\n')
    trainer = SimpleNamespace(world_size=1, datamodule=None if datamodule is None else L.LightningDataModule(), callbacks=[])
    with pytest.raises(ValueError, match="evaluation needs MathDataModule"):
        EvaluationCallback(problems_file=str(problems)).setup(trainer, None, "fit")
