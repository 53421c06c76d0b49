"""The ``harness`` answer extraction: the rules of the evaluation harness behind the paper's
tables (``simplerl_math_eval/parser.py::extract_answer`` of the HS-STaR reference code), one
real-shaped response per rule, graded by math-verify; and how configs select it.

Run: ``PYTHONPATH=$PWD python -m pytest tests/test_harness_extraction.py -q``.
"""

from __future__ import annotations

import time

import pytest
import yaml

from hs_star_pl.core.answers import extract_answer, extract_answer_harness
from hs_star_pl.verifiers import ExactMatchVerifier, MathVerifyVerifier
from tests.helpers.tiny_setup import REPO

CONFIGS = REPO / "configs"

# The two responses the harness grades right and the strict rule does not extract.
UNBOXED = "Adding the two equations gives 2x = 10.\nDividing both sides by 2, so x = 5"
MINERVA = "The total charge is $6$ units.\n\nFinal Answer: The final answer is $6$. I hope it is correct."


@pytest.fixture(scope="module")
def harness():
    with MathVerifyVerifier(n_workers=1, timeout_s=20.0, extraction="harness") as verifier:
        yield verifier


@pytest.fixture(scope="module")
def strict():
    with MathVerifyVerifier(n_workers=1, timeout_s=20.0) as verifier:
        yield verifier


# ---------------------------------------------------------------- the rules, one by one


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        # 1. Minerva: "final answer is $" and "$. I hope" anywhere; the FIRST such answer, and
        #    it beats a box written before it
        (MINERVA, "6"),
        ("The image is \\boxed{0.1} cm wide.\nFinal Answer: The final answer is $0.097$. I hope it is correct.", "0.097"),
        ("Final Answer: The final answer is $2$. I hope it is correct.\n\n"
         "Final Answer: The final answer is $3$. I hope it is correct.", "2"),
        ("Final Answer: The final answer is $4 \\times 10^{3}$. I hope it is correct.", "4 \\times 10^{3}"),
        # 2. "boxed": what follows the last one; nested braces; an unclosed group runs to the end
        ("We have $\\sin 60^\\circ = \\frac{\\sqrt{3}}{2}$.\n\nTherefore, the final answer is "
         "$\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
        ("First I got \\boxed{3}, but rechecking step 2 the answer is \\boxed{4}.", "4"),
        ("So the ratio is \\boxed{\\frac{1}{2", "\\frac{1}{2"),
        #    without a brace: the text up to the next "$"
        ("so the answer is $\\boxed 7$ apples", "7"),
        #    the last box wins even when empty: no answer, although an earlier box had one
        ("Candidates: \\boxed{3}. None of them works, so \\boxed{}", None),
        #    the substring, not the command: "unboxed" counts, \fbox does not
        ("I left the result unboxed: it is $12$ in total", "it is"),
        ("\\fbox{7} sheep and 12 goats", "12"),
        # 3. after the LAST "he answer is", the whole rest of the response, newlines deleted
        ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\nThe answer is 72.", "72"),
        ("the answer is 70. Wait, I forgot the three extra: the answer is 73", "73"),
        ("The answer is 72.\nWe can check: 48 + 24 = 72.", "72.We can check: 48 + 24 = 72"),
        # 4. after the last "final answer is" ("The final answer is" has no "he answer is")
        ("Multiplying out, the final answer is: 42.", "42"),
        # 5. after the FIRST "答案是", up to the blank line or the next "答案是"
        ("因此答案是 12\n\n验证：3 × 4 = 12，答案是 13", "12"),
        ("答案是 12 吗？不，答案是 13", "12 吗？不，"),
        # 6. the last number, commas deleted from the whole response first
        (UNBOXED, "5"),
        ("The farm has 1,234 sheep and 56 goats, so 1,290 animals.", "1290"),
        ("The point is (3,4).", "34"),
        ("The temperature drops to -0.5 degrees.", "-0.5"),
        ("Half of it is .5 of a cup.", ".5"),
        ("I cannot solve this problem.", None),
        # clean-up: Math-Shepherd's step tag deleted first; one leading ":" and the final "."
        ("Step 1: 2 + 2 = 4 \u043a\u0438\nStep 2: The answer is: 4 \u043a\u0438", "4"),
    ],
    ids=lambda value: None if value is None or len(value) < 40 else value[:40],
)
def test_each_rule_on_a_real_shaped_response(response, expected):
    assert extract_answer_harness(response) == expected


def test_the_use_last_number_switch_only_turns_off_the_last_rule():
    assert extract_answer_harness(UNBOXED, use_last_number=False) is None
    assert extract_answer_harness("The answer is 72.", use_last_number=False) == "72"


def test_strict_extraction_is_unchanged_by_the_mode():
    """Training-time verification keeps its rule: the same two responses extract as before."""
    assert extract_answer(UNBOXED) is None
    assert extract_answer(MINERVA) == "6$. I hope it is correct"
    assert ExactMatchVerifier().extraction == "strict"
    assert ExactMatchVerifier().extract_answer(UNBOXED) is None


@pytest.mark.parametrize("hostile", ["\\boxed{" * 100_000, "boxed" * 100_000, "1" * 1_000_000, "-." * 500_000,
                                     "{" * 50_000 + "\\boxed{7}"])
def test_harness_extraction_stays_fast_on_hostile_text(hostile):
    t0 = time.monotonic()
    extract_answer_harness(hostile)
    assert time.monotonic() - t0 < 2.0


# ---------------------------------------------------------------- graded by math-verify


def test_the_two_examples_are_graded_right_in_harness_mode_only(harness, strict):
    assert harness.extract_answer(UNBOXED) == "5" and harness.extract_answer(MINERVA) == "6"
    assert harness.verify([UNBOXED, MINERVA], ["5", "6"]) == [True, True]
    assert strict.verify([UNBOXED], ["5"]) == [False]


def test_minerva_answers_strict_extraction_garbles_are_right_in_harness_mode(harness, strict):
    """Strict extraction keeps "$. I hope it is correct" after the answer; math-verify
    rescues a bare number from that, but not a product, a tuple or a polynomial."""
    responses = [f"Final Answer: The final answer is ${a}$. I hope it is correct." for a in
                 ("4 \\times 10^{3}", "(1,5)", "x^2+1")]
    golds = ["4000", "(1,5)", "x^2+1"]
    assert harness.verify(responses, golds) == [True, True, True]
    assert strict.verify(responses, golds) == [False, False, False]


def test_harness_mode_still_grades_wrong_answers_wrong(harness):
    """The rest-of-response rule hands math-verify more than the number: as in the harness,
    a response that goes on past "The answer is" can lose its answer."""
    responses = [UNBOXED, "Final Answer: The final answer is $7$. I hope it is correct.",
                 "The answer is 72.\n\nAlternatively 70 + 3 = 73.", "\\boxed{3} or maybe \\boxed{}"]
    assert harness.verify(responses, ["6", "6", "72", "3"]) == [False, False, False, False]


def test_exact_match_verifier_has_the_mode_too():
    verifier = ExactMatchVerifier(extraction="harness")
    assert verifier.verify([UNBOXED, MINERVA, "I give up."], ["5", "6", "5"]) == [True, True, False]


@pytest.mark.parametrize("verifier_cls", [ExactMatchVerifier, MathVerifyVerifier])
def test_an_unknown_mode_names_the_key_and_the_modes(verifier_cls):
    with pytest.raises(ValueError, match=r"verifier\.extraction must be one of \['strict', 'harness'\], got 'paper'"):
        verifier_cls(extraction="paper")


# ---------------------------------------------------------------- configs


def extraction_settings() -> dict[str, object]:
    """``file: key -> value`` of every ``extraction`` set in a shipped YAML."""
    found: dict[str, object] = {}

    def walk(node, path, file):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "extraction":
                    found[f"{file}: {'.'.join(path)}"] = value
                walk(value, [*path, str(key)], file)
        elif isinstance(node, list):
            for value in node:
                walk(value, path, file)

    for path in sorted(CONFIGS.rglob("*.yaml")):
        walk(yaml.safe_load(path.read_text()), [], path.relative_to(CONFIGS).as_posix())
    return found


def test_only_the_paper_evaluation_config_selects_the_harness_rules():
    """Training verifiers (``self_training.verifier``) keep the strict default everywhere."""
    assert extraction_settings() == {"eval/paper.yaml: evaluation.verifier.init_args": "harness"}


def evaluation_cli(tmp_path, monkeypatch, *extra: str):
    from hs_star_pl.cli import HSStarCLI

    monkeypatch.chdir(REPO)
    return HSStarCLI(args=["-c", str(CONFIGS / "base.yaml"), "-c", str(CONFIGS / "debug" / "tiny_cpu.yaml"),
                           "-c", str(CONFIGS / "eval" / "paper.yaml"), f"--trainer.default_root_dir={tmp_path}", *extra], run=False)


def test_hs_star_test_with_the_paper_config_grades_with_harness_extraction(tmp_path, monkeypatch):
    from hs_star_pl.training.evaluation import EvaluationCallback

    cli = evaluation_cli(tmp_path, monkeypatch)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, EvaluationCallback)]
    try:
        assert isinstance(callback.verifier, MathVerifyVerifier)
        assert callback.verifier.extraction == "harness"
        assert callback.verifier.extract_answer(UNBOXED) == "5"
    finally:
        callback.verifier.close()


def test_an_unknown_mode_in_yaml_names_the_full_key(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"evaluation\.verifier\.init_args\.extraction must be one of"):
        evaluation_cli(tmp_path, monkeypatch, "--evaluation.verifier.init_args.extraction=paper")
