"""Final answers in text: extraction from a response and normalisation of answers and golds.

Pure and stdlib-only; the verifiers (:mod:`hs_star_pl.verifiers`) compare what these
functions return, and problem loading (:mod:`hs_star_pl.core.problems`) reads golds with them.

* **Extraction**, in one of two modes chosen by a verifier's ``extraction``
  (:data:`EXTRACTIONS`):

  - ``strict`` (:func:`extract_answer`, the default, used in training): the last
    ``\\boxed{...}`` (nested braces, also ``\\fbox``), else the text after the last "The
    answer is", else after the last "Answer:", else after the last GSM8K-style "####". A
    response with none of these has no final answer and is graded *wrong* (the policy
    failed to answer; that is the model's fault, not the grader's).
  - ``harness`` (:func:`extract_answer_harness`, for benchmark evaluation): the rules of the
    Qwen2.5-Math evaluation harness the paper's tables come from, in its order, ending in
    the last number of the response (see that function).
* **Gold answers** (:func:`normalize_gold`) in the common dataset forms: plain (``"42"``),
  LaTeX (``"\\frac{1}{2}"``), ``"$...$"``, ``"\\boxed{...}"``, GSM8K ``"... #### 1,234"``,
  numbers stored as floats (``27.0``/``"27.0"`` mean 27), and lists of acceptable answers (a
  Python list/tuple). ``None`` when there is nothing to compare with.
* **Answer text for exact matching** (:func:`normalize_answer`): numbers become reduced
  fractions, wrappers and spacing are dropped.

Model output is untrusted: every scan here is linear in the response's length, and nothing
is evaluated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction
from typing import Union

GoldAnswer = Union[str, int, float, Sequence[str]]
"""A gold answer: text, a number, or a list/tuple of acceptable answers."""

# ---------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)
_ANSWER_COLON = re.compile(r"answer\s*:", re.IGNORECASE)


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each ``{`` that is closed -> index of its ``}``, in one linear pass."""
    match: dict[int, int] = {}
    stack: list[int] = []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            match[stack.pop()] = i
    return match


_BOX_START = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])( *)")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}``/``\\fbox{...}`` in order (nested braces).

    Linear in ``len(text)``: model output is untrusted, and a scan per ``\\boxed`` made
    thousands of unclosed boxes quadratic.
    """
    if "\\boxed" not in text and "\\fbox" not in text:
        return []
    match = _matching_braces(text)
    found: list[str] = []
    for m in _BOX_START.finditer(text):
        j = m.end()
        if j < len(text) and text[j] == "{":
            if j in match:
                found.append(text[j + 1 : match[j]])
        elif m.group(1):  # "\\boxed 5": one token after a space
            token = re.match(r"[^\s$.,;\\][^\s$.,;]{0,199}", text[j : j + 201])
            if token:
                found.append(token.group(0))
    return found


def last_boxed(text: str) -> str | None:
    """Contents of the last complete non-empty ``\\boxed{...}`` (or ``\\fbox``), else ``None``.

    >>> last_boxed("so $\\\\boxed{1.6} \\\\mathrm{~cm}$")
    '1.6'
    """
    boxed = [b.strip() for b in _boxed_contents(text)]
    boxed = [b for b in boxed if b]
    return boxed[-1] if boxed else None


def _clean_tail(text: str) -> str | None:
    """The answer in the rest of a line after an anchor: trim ``$``, spaces, final period."""
    line = text.strip().split("\n", 1)[0].strip()
    line = line.strip("$ ").rstrip(".").strip().strip("$ ")
    return line or None


def extract_answer(response: str) -> str | None:
    """The final answer stated in a response, or ``None`` when it states none.

    Order: the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), else the rest of the
    line after the last "The answer is", else after the last "Answer:", else after the last
    "####". Surrounding ``$`` and a sentence-final period are removed from the fallbacks.

    >>> extract_answer("so \\\\boxed{\\\\frac{1}{2}}. Wait, \\\\boxed{\\\\frac{3}{4}}")
    '\\\\frac{3}{4}'
    >>> extract_answer("The answer is $12$.")
    '12'
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {type(response).__name__}")
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    for pattern in (_ANSWER_IS, _ANSWER_COLON):
        matches = list(pattern.finditer(response))
        if matches:
            answer = _clean_tail(response[matches[-1].end() :])
            if answer:
                return answer
    if "####" in response:
        return _clean_tail(response.rsplit("####", 1)[1])
    return None


# The harness's rules, written from reading simplerl_math_eval/parser.py::extract_answer of
# the HS-STaR reference code (the Qwen2.5-Math evaluation harness). Every literal below is
# case-sensitive there and here.
_HARNESS_STEP_TAG = "\u043a\u0438"  # "ки", Math-Shepherd's step tag: deleted before anything else
_HARNESS_LAST_NUMBER = re.compile(r"-?\d*\.?\d+")  # str pattern: \d is any Unicode digit, as there
_HARNESS_NEWLINES = re.compile(r"\n\s*")


def _harness_box(tail: str) -> str:
    """What follows the last "boxed": a braced group (to its match, or to the end when it
    never closes), else the text up to the next ``$``."""
    if not tail.startswith("{"):
        return tail.split("$", 1)[0].strip()
    depth = 1
    for i in range(1, len(tail)):
        ch = tail[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return tail[1:i]
    return tail[1:]


def extract_answer_harness(response: str, *, use_last_number: bool = True) -> str | None:
    """The final answer by the rules of the paper's evaluation harness, or ``None`` if empty.

    The HS-STaR tables come from the Qwen2.5-Math harness (``extract_answer`` in the
    reference code's ``simplerl_math_eval/parser.py``). Its rules, first that applies wins:

    1. Minerva: the response contains both "final answer is $" and "$. I hope": the text
       after the *first* "final answer is $" up to the next "$. I hope".
    2. The substring "boxed" anywhere (``\\boxed``, but also a bare word "unboxed"; ``\\fbox``
       is not special): what follows its *last* occurrence: a ``{...}`` group with nested
       braces (an unclosed one runs to the end of the response), else the text up to the
       next ``$``. The last box wins even when empty: ``\\boxed{}`` is no answer, however
       many boxes came before it.
    3. After the last "he answer is" (so "The answer is" and "the answer is"), the whole
       rest of the response, not just its line.
    4. After the last "final answer is", likewise.
    5. After the first "答案是", up to the next "答案是" or the blank line after it.
    6. The last match of ``-?\\d*\\.?\\d+`` once every comma is deleted from the response:
       "1,234" reads 1234 (and "(3,4)" reads 34, as there); a sentence-final period is
       not part of the number; ``\\d`` matches any Unicode digit. With
       ``use_last_number=False`` (the harness's switch, on in its benchmark runs) this rule
       gives no answer.

    Then, as there: each newline and the whitespace after it are deleted, one leading
    ``:``, one trailing ``.`` and then one trailing ``/`` are removed; and, as the first
    two steps of its ``strip_string``, surrounding whitespace and trailing periods are
    trimmed. An empty result is ``None`` (no answer: graded wrong, as the harness grades an
    empty prediction). The harness also deletes "ки" (Math-Shepherd's step tag) before
    anything else; so does this.

    Not done here: the rest of ``strip_string``. The harness's answer goes through it and
    then ``math_equal``; ours goes to the verifier as extracted. math-verify normalises
    LaTeX itself (``\\dfrac``, ``\\left``, ``\\text{}`` units, ``^\\circ``, ``\\%``,
    ``x =``), and ``strip_string`` also deletes unit words, single letters among them, on
    both sides of the harness's comparison: on the answer alone it would make right answers
    wrong (``a+1`` becomes ``+1``), on both it makes different ones equal (``a+1`` and
    ``c+1``). See docs/evaluation.md. Nor is its multiple-choice branch (letter answers),
    which none of the seven benchmarks use.

    >>> extract_answer_harness("The final answer is $6$. I hope it is correct.")
    '6'
    >>> extract_answer_harness("Adding them, 2 + 3 = 5, so x = 5.")
    '5'
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {type(response).__name__}")
    text = response.replace(_HARNESS_STEP_TAG, "")
    if "final answer is $" in text and "$. I hope" in text:
        answer = text.split("final answer is $", 1)[1].split("$. I hope", 1)[0].strip()
    elif "boxed" in text:
        tail = text.rsplit("boxed", 1)[1]
        if not tail:
            return None
        answer = _harness_box(tail)
    elif "he answer is" in text:
        answer = text.rsplit("he answer is", 1)[1].strip()
    elif "final answer is" in text:
        answer = text.rsplit("final answer is", 1)[1].strip()
    elif "答案是" in text:
        answer = text.split("答案是", 2)[1].strip().split("\n\n", 1)[0].strip()
    elif use_last_number:
        numbers = _HARNESS_LAST_NUMBER.findall(text.replace(",", ""))
        answer = numbers[-1] if numbers else ""
    else:
        answer = ""
    answer = _HARNESS_NEWLINES.sub("", answer)
    answer = answer.removeprefix(":").removesuffix(".").removesuffix("/")
    answer = answer.strip().rstrip(".")
    return answer or None


EXTRACTIONS = {"strict": extract_answer, "harness": extract_answer_harness}
"""Answer-extraction modes by name: a verifier's ``extraction`` setting."""


def extraction_error(mode: object) -> str | None:
    """The message for a verifier's ``extraction`` that names no mode, else ``None``."""
    if isinstance(mode, str) and mode in EXTRACTIONS:
        return None
    return (f"verifier.extraction must be one of {list(EXTRACTIONS)}, got {mode!r}: 'strict' for training-time "
            "verification, 'harness' for the paper's benchmark evaluation (docs/evaluation.md)")


# ---------------------------------------------------------------------------------------
# Gold answers and answer text
# ---------------------------------------------------------------------------------------

_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_FLOAT_INTEGRAL = re.compile(r"^(-?\d+)\.0+$")


def _normalize_gold_text(text: str) -> str | None:
    text = text.strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    if "\\boxed" in text or "\\fbox" in text:
        boxed = _boxed_contents(text)
        text = boxed[-1].strip() if boxed else text
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    if m := _FLOAT_INTEGRAL.match(text):
        text = m.group(1)
    return text or None


def normalize_gold(gold: GoldAnswer) -> tuple[str, ...] | None:
    """Acceptable answers of a gold, as text; ``None`` when there is nothing to compare with.

    >>> normalize_gold("Natalia sold 48/2 = 24 clips ... #### 1,234")
    ('1234',)
    >>> normalize_gold(27.0), normalize_gold(["$\\\\frac12$", "0.5"])
    (('27',), ('\\\\frac12', '0.5'))
    """
    if isinstance(gold, bool):
        raise TypeError("a gold answer must be text or a number, got a bool")
    if isinstance(gold, int):
        return (str(gold),)
    if isinstance(gold, float):
        if gold != gold or gold in (float("inf"), float("-inf")):
            return None
        # Positional notation: repr(1e-07) is "1e-07", which no answer written as a decimal matches.
        return (str(int(gold)),) if gold.is_integer() else (format(Decimal(repr(gold)), "f"),)
    if isinstance(gold, str):
        text = _normalize_gold_text(gold)
        return (text,) if text is not None else None
    if isinstance(gold, Sequence):
        alternatives: list[str] = []
        for alt in gold:
            norm = normalize_gold(alt)
            if norm:
                alternatives.extend(a for a in norm if a not in alternatives)
        return tuple(alternatives) or None
    raise TypeError(f"a gold answer must be text, a number or a list, got {type(gold).__name__}")


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
# ASCII digits only: "\\boxed{７}" (fullwidth) or "٧" (Arabic-Indic) is not the text "7".
_FRAC = re.compile(r"^\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$", re.ASCII)
_NUMBER = re.compile(r"^-?(\d+(\.\d*)?|\.\d+)$", re.ASCII)
_RATIO = re.compile(r"^(-?\d+)/(-?\d+)$", re.ASCII)
_MAX_NUMBER_CHARS = 1000
"""Longer numbers are compared as text: Python refuses int() of over 4300 digits, and model
output is untrusted (a 100,000-digit "answer" raised ValueError out of ``verify``)."""


def normalize_answer(text: str) -> str:
    """Canonical text of an answer for exact matching: numbers become reduced fractions.

    Removes ``$``, ``\\left``/``\\right``, ``\\!``, ``\\text{}`` wrappers, spaces, a final
    period and thousands separators; ``"27.0"``, ``"27"`` and ``"\\frac{54}{2}"`` all become
    ``"27"``, ``"0.5"`` and ``"1/2"`` both ``"1/2"``.
    """
    s = text.strip().strip("$")
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ "):
        s = s.replace(token, "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    value: Fraction | None = None
    if len(s) > _MAX_NUMBER_CHARS:
        pass
    elif _NUMBER.match(s):
        value = Fraction(s)
    elif m := _RATIO.match(s) or _FRAC.match(s):
        num, den = int(m.group(1)), int(m.group(2))
        value = Fraction(num, den) if den else None
    if value is not None:
        return str(value)
    return s.lower()

