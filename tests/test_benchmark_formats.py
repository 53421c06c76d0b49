"""The seven benchmark loaders, each on a fixture in its published shape (tests/fixtures/benchmarks)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hs_star_pl.core.problems import ProblemFileError
from hs_star_pl.evaluation.datasets import FORMATS, BenchmarkConfig, load_benchmark

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"

# format -> (ids, golds, first solution starts with (None: no solution))
EXPECTED = {
    "gsm8k": (["line-1", "line-2", "line-3", "line-4"], ["27", "3000", "12", "-6"], "Maya buys 3 * 12"),
    "math500": (["test/prealgebra/1001.json", "test/algebra/2002.json", "test/algebra/2003.json", "test/precalculus/3004.json"],
                ["\\frac{5}{6}", "5\\sqrt{2}", "(1,5)", "\\left( 3, \\frac{\\pi}{2} \\right)"], "The common denominator"),
    # the gold is the *solution's* last box: the question of idx 1 quotes an earlier box (2)
    "minerva": (["0", "1", "2"], ["0.097", "9", "2"], "The image diameter"),
    "olympiadbench": (["2501", "2502", "2503"], ["4", "2,3", "2"], "By the AM-HM inequality"),
    # no ids in the file, and question_number repeats across sources: ids are line numbers
    "college_math": (["line-1", "line-2", "line-3", "line-4"], ["6", "1", "-2", "2"], None),
    "aime24": (["60", "61", "62"], ["130", "016", "24"], "There are"),
    "amc23": (["0", "1", "2", "3"], ["27", "4", "5", "0.25"], None),
}


def test_every_published_format_has_a_fixture():
    assert set(EXPECTED) == set(FORMATS) - {"auto"}
    assert {p.stem for p in FIXTURES.glob("*.jsonl")} == set(EXPECTED)


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_loader_reads_its_fixture(fmt):
    ids, golds, solution_start = EXPECTED[fmt]
    problems = load_benchmark(BenchmarkConfig(name=fmt, path=str(FIXTURES / f"{fmt}.jsonl"), format=fmt))
    assert [p.id for p in problems] == ids
    assert [p.answer for p in problems] == golds
    assert all(p.question.strip() for p in problems)
    if solution_start is None:
        assert problems[0].solution is None
    else:
        assert problems[0].solution.startswith(solution_start)


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_limit_and_cap_take_the_first_problems(fmt):
    config = BenchmarkConfig(name=fmt, path=str(FIXTURES / f"{fmt}.jsonl"), format=fmt, limit=2)
    assert [p.id for p in load_benchmark(config)] == EXPECTED[fmt][0][:2]
    assert [p.id for p in load_benchmark(config, max_problems=1)] == EXPECTED[fmt][0][:1]


def test_fixture_golds_are_graded_right_when_boxed_and_wrong_otherwise():
    """Every fixture gold, as the loaders produce it, is parseable by math-verify and is
    matched by a response boxing an equivalent form (and not by a wrong one)."""
    from hs_star_pl.verifiers import MathVerifyVerifier

    golds = [p.answer for fmt in sorted(EXPECTED) for p in load_benchmark(BenchmarkConfig(fmt, str(FIXTURES / f"{fmt}.jsonl"), fmt))]
    with MathVerifyVerifier(n_workers=1) as verifier:
        assert verifier.check_golds(golds) == [True] * len(golds)
        right = verifier.verify([f"so \\boxed{{{g}}}" for g in golds], golds)
        wrong = verifier.verify(["so \\boxed{12345}"] * len(golds), golds)
    assert right == [True] * len(golds)
    assert wrong == [False] * len(golds)


def test_a_file_in_the_wrong_shape_names_file_line_and_config_entry(tmp_path):
    config = BenchmarkConfig(name="math", path=str(FIXTURES / "gsm8k.jsonl"), format="math500")
    with pytest.raises(ProblemFileError) as info:
        load_benchmark(config)
    message = str(info.value)
    assert message.startswith(f"{FIXTURES / 'gsm8k.jsonl'}:1: no question field ('problem')")
    assert "evaluation.benchmarks['math'] has format 'math500'" in message
    with pytest.raises(ProblemFileError, match=re.escape("nowhere.jsonl: no such problem file (evaluation.benchmarks['gsm8k'].path)")):
        load_benchmark(BenchmarkConfig(name="gsm8k", path=str(tmp_path / "nowhere.jsonl"), format="gsm8k"))
    missing_box = tmp_path / "m.jsonl"
    missing_box.write_text(json.dumps({"problem": "P", "solution": "no box", "idx": 0}) + "\n")
    with pytest.raises(ProblemFileError, match=r"m.jsonl:1: field 'solution': no \\boxed\{\} answer"):
        load_benchmark(BenchmarkConfig(name="minerva", path=str(missing_box), format="minerva"))


# format -> (a row of the published shape with its gold replaced, what the message says); the
# replaced gold used to be accepted and graded (a GSM8K solution without "####" became the gold)
MALFORMED_GOLDS = {
    "gsm8k": [({"question": "Q", "answer": "She has 3 + 4 = 7 eggs."},
               "field 'answer': no '#### <answer>' at the end of the worked solution (GSM8K's shape)"),
              ({"question": "Q", "answer": "3 + 4 = 7\n####  "}, "field 'answer': nothing after '####'"),
              ({"question": "Q", "answer": 7}, "field 'answer': expected a worked solution ending '#### <answer>' "
                                               "(GSM8K's shape), got int")],
    "math500": [({"problem": "P", "answer": ["1", "2"], "unique_id": "u"},
                 "field 'answer': expected the answer as text (MATH500's shape), got list")],
    "minerva": [({"problem": "P", "solution": "so \\boxed{5", "idx": 0}, "field 'solution': no \\boxed{} answer")],
    "olympiadbench": [({"id": 1, "question": "Q", "final_answer": "$4$"},
                       "field 'final_answer': expected a list of answers (OlympiadBench's shape: [\"$4$\"]), got str"),
                      ({"id": 1, "question": "Q", "final_answer": [4]},
                       "field 'final_answer': expected a list of answers (OlympiadBench's shape: [\"$4$\"]), got a int in it")],
    "college_math": [({"question": "Q", "answer": 6}, "field 'answer': expected the answer as text (College Math's shape: "
                                                     "\"$6$\"), got int")],
    "aime24": [({"id": 1, "problem": "P", "answer": "1/2"},
                "field 'answer': an AIME answer is an integer from 0 to 999 (written as text or a number), got '1/2'"),
               ({"id": 1, "problem": "P", "answer": 1000},
                "field 'answer': an AIME answer is an integer from 0 to 999 (written as text or a number), got 1000")],
    "amc23": [({"id": 1, "question": "Q", "answer": "27"},
               "field 'answer': expected the answer as a number (AMC23's shape: 27.0), got str")],
}


def test_every_format_has_malformed_gold_cases():
    assert set(MALFORMED_GOLDS) == set(EXPECTED)


@pytest.mark.parametrize(("fmt", "row", "message"), [(f, r, m) for f, cases in MALFORMED_GOLDS.items() for r, m in cases])
def test_a_gold_without_its_formats_shape_stops_loading_at_file_line(fmt, row, message, tmp_path):
    path = tmp_path / f"{fmt}.jsonl"
    good = (FIXTURES / f"{fmt}.jsonl").read_text().splitlines()[0]
    path.write_text(good + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ProblemFileError) as info:
        load_benchmark(BenchmarkConfig(name="b", path=str(path), format=fmt))
    assert str(info.value).startswith(f"{path}:2: {message}"), str(info.value)
    assert f"evaluation.benchmarks['b'] has format '{fmt}'" in str(info.value)


def test_the_auto_format_keeps_reading_any_gold_a_problem_file_may_hold(tmp_path):
    path = tmp_path / "auto.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "Q", "answer": "7"}) + "\n"
                    + json.dumps({"id": "b", "question": "Q2", "answer": ["1/2", "0.5"]}) + "\n")
    assert [p.answer for p in load_benchmark(BenchmarkConfig(name="b", path=str(path)))] == ["7", ("1/2", "0.5")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "mmlu"}, "evaluation.benchmarks['b'].format must be one of"),
        ({"n_samples": 4}, "n_samples=4 at temperature 0 gives identical greedy samples"),
        ({"n_samples": 4, "temperature": 0.6, "pass_k": [8]}, "pass_k must be distinct values in 1..n_samples (4), got [8]"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"limit": 0}, "limit must be >= 1"),
        ({"name": "a/b"}, "must be letters, digits"),
    ],
)
def test_bad_protocols_name_the_key(kwargs, message):
    args = {"name": "b", "path": "x.jsonl", **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        BenchmarkConfig(**args)


def test_sample_cap_shrinks_the_protocol_and_drops_larger_k():
    paper = BenchmarkConfig("aime24", "x", "aime24", n_samples=32, temperature=0.6, top_p=0.95, pass_k=(1, 8, 32))
    assert paper.metric == "avg@32" and not paper.greedy
    capped = paper.with_sample_cap(8)
    assert (capped.n_samples, capped.pass_k, capped.metric) == (8, (1, 8), "avg@8")
    assert paper.with_sample_cap(None) is paper and paper.with_sample_cap(64) is paper
