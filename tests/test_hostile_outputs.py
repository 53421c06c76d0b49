"""Model output built to hurt the grader and the PRM plumbing (``tests/corpus/hostile_outputs.jsonl``).

Towers of exponents, huge factorials, deep nesting, a megabyte of text, unbalanced
``\\boxed{``, unicode look-alikes, a lone surrogate, and strings that would run code if they
ever reached ``eval``/``sympify``, each aimed at a canary file that must never appear. For
every case: math-verify (in its killable worker pool) answers within its timeout and the pool
still grades a normal answer afterwards; extraction, exact match, step splitting and the
rule-based PRMs finish in bounded time with well-formed results; the text goes through the
round's engine boundary and artifacts and reads back intact; the tokenizer path used for
reference log-probs handles it. Nothing executes.
"""

from __future__ import annotations

import json
import time

import pytest

from hs_star_pl.tensors.collate import encode_example
from hs_star_pl.core.answers import extract_answer
from hs_star_pl.core.artifacts import RoundStore
from hs_star_pl.core.protocols import Completion, SamplingParams, StepScoringRequest
from hs_star_pl.core.records import Phase, Problem, RolloutScore, ScoredRollout, utf8_safe
from hs_star_pl.core.rounds import generate_rollouts
from hs_star_pl.core.steps import split_steps
from hs_star_pl.prm.rules import ArithmeticPRM, OutcomePRM
from hs_star_pl.tensors.tiny import build_byte_tokenizer
from hs_star_pl.verifiers import ExactMatchVerifier, MathVerifyVerifier
from tests.helpers.tiny_setup import REPO

ROWS = [json.loads(line) for line in (REPO / "tests" / "corpus" / "hostile_outputs.jsonl").read_text().splitlines()[1:]]
CASES = {row["name"]: row for row in ROWS}
TIMEOUT_S = 1.5
SLACK_S = 1.0  # pipes, pickling a megabyte, the kill; a respawned worker's start is outside the clock
PURE_LIMIT_S = 5.0  # generous for a loaded 2-core machine: the slowest case takes about 1.6 s
QUESTION = "Start with 3. Add 4. What is the result?"


def response(case: dict, canary_dir) -> str:
    text = case["text"] if "text" in case else "".join(piece * count for piece, count in case["parts"])
    return text.replace("{canary}", str(canary_dir / f"CANARY_{case['name']}"))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working directory for the workers too (relative canary paths would land here)."""
    path = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path)
        yield path


@pytest.fixture(scope="module")
def verifier(sandbox):
    with MathVerifyVerifier(n_workers=2, timeout_s=TIMEOUT_S, cache_size=0) as v:
        yield v


def canaries(sandbox) -> list:
    return sorted(p.name for p in sandbox.rglob("*CANARY*"))


def test_the_corpus_covers_every_kind_of_hostile_output():
    names = set(CASES)
    assert len(names) == len(ROWS) >= 30
    for kind in ("tower", "factorial", "nested", "megabyte", "unclosed_boxed", "surrogate", "cyrillic", "eval", "exec"):
        assert any(kind in n for n in names), kind
    assert sum(bool(c.get("injection")) for c in ROWS) >= 8


@pytest.mark.parametrize("name", list(CASES))
def test_math_verify_answers_within_its_timeout_and_the_pool_survives(name, verifier, sandbox):
    case = CASES[name]
    assert verifier.verify(["\\boxed{2}"], ["2"]) == [True]  # workers up before the clock starts
    text = response(case, sandbox)
    started = time.monotonic()
    (verdict,) = verifier.verify([text], [case["gold"]])
    elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT_S + SLACK_S, f"{name}: {elapsed:.2f} s"
    assert verdict in (True, False, None)
    if case.get("injection"):
        assert verdict is not True
    assert verifier.verify(["so \\boxed{\\frac{1}{2}}"], ["0.5"]) == [True]  # the pool still grades
    assert canaries(sandbox) == []


@pytest.mark.parametrize("name", list(CASES))
def test_extraction_exact_match_steps_and_prms_stay_bounded(name, sandbox):
    case = CASES[name]
    text = response(case, sandbox)
    started = time.monotonic()
    answer = extract_answer(text)
    (exact,) = ExactMatchVerifier().verify([text], [case["gold"]])
    steps = tuple(split_steps(text))
    request = StepScoringRequest(QUESTION, steps, exact)
    (rule_scores,) = ArithmeticPRM().score([request])
    (outcome_scores,) = OutcomePRM().score([request])
    elapsed = time.monotonic() - started
    assert elapsed < PURE_LIMIT_S, f"{name}: {elapsed:.2f} s"
    assert answer is None or isinstance(answer, str)
    assert exact in (True, False) and not (case.get("injection") and exact)
    assert len(rule_scores) == len(outcome_scores) == len(steps)
    assert all(0.0 <= s <= 1.0 for s in (*rule_scores, *outcome_scores))
    assert canaries(sandbox) == []


class _Echo:
    """An engine that answers every request with one given text."""

    def __init__(self, text: str) -> None:
        self.text = text

    def generate(self, requests, params):
        return {r.key: [Completion(self.text, "length", 7)] * r.n for r in requests}


@pytest.mark.parametrize("name", list(CASES))
def test_the_text_survives_the_engine_boundary_the_artifacts_and_the_tokenizer(name, sandbox, tmp_path):
    text = response(CASES[name], sandbox)
    (rollout,) = generate_rollouts([Problem("p", QUESTION, "7")], {"p": 1}, {}, Phase.PRESAMPLE, _Echo(text),
                                   lambda p: p.question, SamplingParams())
    assert rollout.text == utf8_safe(text)
    store = RoundStore(tmp_path)
    store.save("presample_generated", [ScoredRollout(rollout, RolloutScore(None)).to_dict()])
    assert ScoredRollout.from_dict(store.load("presample_generated")[0]).rollout == rollout
    encoded = encode_example(build_byte_tokenizer(), QUESTION, rollout.text, max_length=256)
    assert encoded is not None and len(encoded.ids) <= 256


def test_a_lone_surrogate_becomes_a_replacement_character(tmp_path):
    assert utf8_safe(response(CASES["lone_surrogate"], tmp_path)).endswith("\\boxed{7}\ufffd")
