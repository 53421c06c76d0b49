"""PRMs that need no model: a rule-based arithmetic checker and an outcome-only scorer.

Both are stdlib only (no torch) and deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

from hs_star_pl.core.protocols import StepScoringRequest

_NUM = r"-?\d{1,40}(?:\.\d{1,40})?"  # bounded: untrusted text, no runaway backtracking; ASCII digits (re.ASCII)
_EQUATION = re.compile(rf"(?<![\d.])({_NUM})\s*([-+*/×÷xX·])\s*({_NUM})\s*=\s*({_NUM})", re.ASCII)
_START = re.compile(rf"start\s+with\s+({_NUM})", re.IGNORECASE | re.ASCII)
_OPERATION = re.compile(
    rf"\b(add|plus|subtract|minus|multiply\s+by|times|divide\s+by)\s+({_NUM})", re.IGNORECASE | re.ASCII
)
# One unambiguous quantifier between the braces (the contents are stripped afterwards): the
# earlier "\{\s*([^{}]*?)\s*\}" backtracked cubically, 10 minutes on "\boxed{" + 10,000 spaces.
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}", re.ASCII)
_OPS = {"+": "+", "-": "-", "*": "*", "×": "*", "x": "*", "X": "*", "·": "*", "/": "/", "÷": "/"}
_WORD_OPS = {"add": "+", "plus": "+", "subtract": "-", "minus": "-", "multiply by": "*",
             "times": "*", "divide by": "/"}


def _apply(a: Fraction, op: str, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b if b != 0 else None


def parse_operations(question: str) -> tuple[Fraction, list[tuple[str, Fraction]]] | None:
    """The start value and operation list of a synthetic question, ``None`` if absent.

    >>> parse_operations("Start with 12. Add 7. Multiply by 3. What is the result?")
    (Fraction(12, 1), [('+', Fraction(7, 1)), ('*', Fraction(3, 1))])
    """
    start = _START.search(question)
    if start is None:
        return None
    ops = [
        (_WORD_OPS[re.sub(r"\s+", " ", m.group(1).lower())], Fraction(m.group(2)))
        for m in _OPERATION.finditer(question, start.end())
    ]
    return (Fraction(start.group(1)), ops) if ops else None


def _to_fraction(text: str) -> Fraction | None:
    text = text.strip().rstrip(".").replace(",", "")
    return Fraction(text) if re.fullmatch(_NUM, text, re.ASCII) else None


class ArithmeticPRM:
    """Exact step checker for the embedded synthetic arithmetic task.

    A step is *checkable* when it states at least one ``a op b = c`` (``op`` one of
    ``+ - * / × ÷ x``; integers or decimals) or contains a ``\\boxed{v}``. It scores
    ``1.0`` when every check below passes and ``0.0`` when one fails:

    1. **arithmetic**: ``a op b`` equals ``c`` exactly (rational arithmetic; ``/ 0`` fails);
    2. **chain**: ``a`` equals the previous stated result (from this or an earlier step);
    3. **question** (only when the question parses as "Start with N. Add 7. Multiply by 3.
       ..."): the first ``a`` is ``N`` and the k-th equation applies the k-th stated
       operation; an equation beyond the last stated operation fails. A question that does
       not parse disables this check (tolerant, not an error);
    4. **answer**: ``\\boxed{v}`` equals the last stated result, and, when the question
       parses, the question's true result. A non-numeric ``v`` fails.

    A step with neither an equation nor a box (prose, garbage, a partial "19 * 3 =") scores
    ``neutral_score``. With ``propagate_errors`` every step after the first failed one scores
    ``0.0`` too, like the "can this still reach the right answer" labels PRMs are trained on.

    Args:
        neutral_score: score of a step with nothing to check, in [0, 1].
        propagate_errors: whether steps after a failed step score 0.0.
        use_question: whether to check steps against the operations stated in the question.
    """

    def __init__(
        self, neutral_score: float = 0.5, propagate_errors: bool = True, use_question: bool = True
    ) -> None:
        if not 0.0 <= neutral_score <= 1.0:
            raise ValueError(f"prm.neutral_score must be in [0, 1], got {neutral_score}")
        self.neutral_score = float(neutral_score)
        self.propagate_errors = propagate_errors
        self.use_question = use_question

    def score(self, requests: Sequence[StepScoringRequest]) -> list[list[float]]:
        """One score in {0, neutral_score, 1} per step."""
        return [self.score_steps(r.question, r.steps) for r in requests]

    def score_steps(self, question: str, steps: Sequence[str]) -> list[float]:
        plan = parse_operations(question) if self.use_question else None
        expected_final: Fraction | None = None
        if plan is not None:
            value: Fraction | None = plan[0]
            for op, b in plan[1]:
                value = _apply(value, op, b) if value is not None else None
            expected_final = value
        previous: Fraction | None = plan[0] if plan is not None else None
        n_equations = 0
        failed = False
        scores: list[float] = []
        for step in steps:
            if failed and self.propagate_errors:
                scores.append(0.0)
                continue
            ok, checked = True, False
            for m in _EQUATION.finditer(step):
                checked = True
                a, b, c = Fraction(m.group(1)), Fraction(m.group(3)), Fraction(m.group(4))
                op = _OPS[m.group(2)]
                if _apply(a, op, b) != c:
                    ok = False
                if previous is not None and a != previous:
                    ok = False
                if plan is not None:
                    ops = plan[1]
                    if n_equations >= len(ops) or ops[n_equations] != (op, b):
                        ok = False
                n_equations += 1
                previous = c
            for m in _BOXED.finditer(step):
                checked = True
                v = _to_fraction(m.group(1).strip())
                if v is None or (n_equations and v != previous):
                    ok = False
                if v is not None and expected_final is not None and v != expected_final:
                    ok = False
            if not checked:
                scores.append(self.neutral_score)
                continue
            scores.append(1.0 if ok else 0.0)
            failed = failed or not ok
        return scores


class OutcomePRM:
    """Outcome-only scorer for the accuracy-only ablation: every step gets the answer's grade.

    Reads ``StepScoringRequest.correct``: ``True`` → ``correct_score`` for every step,
    ``False`` → ``wrong_score``, ``None`` (ungradeable) → ``ungradeable_score``. The default
    0.5 for ungradeable keeps "can't score" distinct from "wrong" without inventing a verdict.

    Args:
        correct_score: step score of a correct response, in [0, 1].
        wrong_score: step score of a wrong response, in [0, 1].
        ungradeable_score: step score of a response the verifier could not grade, in [0, 1].
    """

    def __init__(
        self, correct_score: float = 1.0, wrong_score: float = 0.0, ungradeable_score: float = 0.5
    ) -> None:
        for name, value in (("correct_score", correct_score), ("wrong_score", wrong_score),
                            ("ungradeable_score", ungradeable_score)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"prm.{name} must be in [0, 1], got {value}")
        self.correct_score = float(correct_score)
        self.wrong_score = float(wrong_score)
        self.ungradeable_score = float(ungradeable_score)

    def score(self, requests: Sequence[StepScoringRequest]) -> list[list[float]]:
        out = []
        for r in requests:
            if r.correct is None:
                s = self.ungradeable_score
            else:
                s = self.correct_score if r.correct else self.wrong_score
            out.append([s] * len(r.steps))
        return out
