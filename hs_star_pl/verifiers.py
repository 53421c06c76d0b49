"""Final-answer extraction and answer checking: correct, wrong, or ungradeable.

Scope:

* **Extraction** (pure, stdlib), in one of two modes chosen by a verifier's ``extraction``:

  - ``strict`` (:func:`extract_answer`, the default, used in training): the last
    ``\\boxed{...}`` (nested braces, also ``\\fbox``), else the text after the last "The
    answer is", else after the last "Answer:", else after the last GSM8K-style "####". A
    response with none of these has no final answer and is graded *wrong* (the policy
    failed to answer; that is the model's fault, not the grader's).
  - ``harness`` (:func:`extract_answer_harness`, for benchmark evaluation): the rules of the
    Qwen2.5-Math evaluation harness the paper's tables come from, in its order, ending in
    the last number of the response (see that function).
* **Gold answers** in the common dataset forms: plain (``"42"``), LaTeX (``"\\frac{1}{2}"``),
  ``"$...$"``, ``"\\boxed{...}"``, GSM8K ``"... #### 1,234"``, numbers stored as floats
  (``27.0``/``"27.0"`` mean 27), and lists of acceptable answers (a Python list/tuple: any
  alternative matching counts as correct). A gold that cannot be parsed makes the problem
  *ungradeable* (``None``) with a warning naming it, never silently right or wrong.
* **Equivalence** by math-verify (numbers, fractions, LaTeX expressions, tuples, intervals,
  sets, percentages) in :class:`MathVerifyVerifier`, or by normalised string/number equality
  in the stdlib-only :class:`ExactMatchVerifier` (tests, the synthetic task).

Safety: model output is untrusted. Nothing here calls ``eval``; text reaches sympy only
through math-verify's own parser, and only inside a worker *process*
(:class:`hs_star_pl.workers.KillablePool`) that is killed when a check exceeds ``timeout_s`` (math-verify's ``signal.alarm`` timeouts do not work off the main
thread, and sympy can hang on towers of exponents). A killed check is ungradeable; the
worker is respawned and the other checks of the batch are kept. Workers also run under an
address-space limit (``memory_limit_mb``) so a runaway expansion dies with ``MemoryError``
instead of taking the machine with it.

What is *not* covered: answers whose equivalence needs the question (units, "in simplest
form" conventions), multiple-choice letter mapping, and free-text answers beyond normalised
string equality.

This module imports neither torch nor lightning; math-verify is imported lazily, in the
worker processes.
"""

from __future__ import annotations

import atexit
import logging
import re
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Union

from hs_star_pl.workers import CRASH, START_METHODS, TIMEOUT, KillablePool

log = logging.getLogger(__name__)

GoldAnswer = Union[str, int, float, Sequence[str]]
"""A gold answer: text, a number, or a list/tuple of acceptable answers."""

_MISSING_MATH_VERIFY = (
    "MathVerifyVerifier needs the `math-verify` package: pip install 'math-verify>=0.7' "
    "(or use hs_star_pl.verifiers.ExactMatchVerifier)"
)

# ---------------------------------------------------------------------------------------
# Extraction (pure)
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


def _extraction_error(mode: object) -> str | None:
    """The message for a verifier's ``extraction`` that names no mode, else ``None``."""
    if isinstance(mode, str) and mode in EXTRACTIONS:
        return None
    return (f"verifier.extraction must be one of {list(EXTRACTIONS)}, got {mode!r}: 'strict' for training-time "
            "verification, 'harness' for the paper's benchmark evaluation (docs/evaluation.md)")

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


# ---------------------------------------------------------------------------------------
# Exact match (stdlib only)
# ---------------------------------------------------------------------------------------

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


class ExactMatchVerifier:
    """Stdlib-only verifier: normalised string/number equality after answer extraction.

    Cheap and dependency-free; right for the synthetic arithmetic task and for tests. It
    does not know that ``\\sqrt{2}/2`` equals ``\\frac{\\sqrt2}{2}``: use
    :class:`MathVerifyVerifier` for real math data. A gold that normalises to nothing is
    ungradeable (``None``, with a warning); a response without a final answer is wrong.

    Args:
        extraction: how the final answer is found: ``"strict"`` (:func:`extract_answer`)
            or ``"harness"`` (:func:`extract_answer_harness`, the paper's evaluation rules).
    """

    def __init__(self, extraction: str = "strict") -> None:
        if error := _extraction_error(extraction):
            raise ValueError(error)
        self.extraction = extraction

    def extract_answer(self, response: str) -> str | None:
        """The final answer of ``response`` by this verifier's ``extraction`` mode."""
        return EXTRACTIONS[self.extraction](response)

    def verify(self, responses: Sequence[str], golds: Sequence[str]) -> list[bool | None]:
        """``True``/``False`` per (response, gold); ``None`` when the gold is unusable."""
        _check_lengths(responses, golds)
        results: list[bool | None] = []
        for response, gold in zip(responses, golds):
            alternatives = normalize_gold(gold)
            if alternatives is None:
                _warn_bad_gold(gold)
                results.append(None)
                continue
            answer = self.extract_answer(response)
            if answer is None:
                results.append(False)
                continue
            norm = normalize_answer(answer)
            results.append(any(norm == normalize_answer(alt) for alt in alternatives))
        return results

    def check_golds(self, golds: Sequence[str]) -> list[bool]:
        """Whether each gold has something to compare with."""
        return [normalize_gold(g) is not None for g in golds]


# ---------------------------------------------------------------------------------------
# math-verify tasks (run inside the worker processes of hs_star_pl.workers.KillablePool)
# ---------------------------------------------------------------------------------------

_parsed_gold_cache: dict[tuple[str, ...], list] = {}


def _mv_parse(text: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = text.strip()
    if "\\boxed" not in text and "$" not in text:
        text = f"${text}$"
    return parse(
        text,
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=None,  # type: ignore[arg-type]
        raise_on_error=False,
    )


def _parse_gold(alternatives: tuple[str, ...]) -> list[list]:
    if alternatives not in _parsed_gold_cache:
        if len(_parsed_gold_cache) > 4096:
            _parsed_gold_cache.clear()
        _parsed_gold_cache[alternatives] = [p for p in (_mv_parse(a) for a in alternatives) if p]
    return _parsed_gold_cache[alternatives]


def _run_task(kind: str, payload: tuple) -> bool | None:
    """One check in a worker. ``"gold"``: is it parseable; ``"verify"``: True/False/None.

    math-verify's own ``signal.alarm`` timeouts are turned off (``None``): the pool kills
    the worker instead, which also works where signals cannot (and math-verify would return
    ``False`` on its own timeout, turning "can't score" into "wrong"). It logs a warning
    about the disabled timeout on every call, hence the logger level.
    """
    from math_verify import verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)

    if kind == "gold":
        return bool(_parse_gold(payload[0]))
    if kind == "verify":
        answer, alternatives, float_rounding = payload
        golds = _parse_gold(alternatives)
        if not golds:
            return None
        parsed = _mv_parse(answer)
        if not parsed:  # not math at all: normalised text equality is the only fair test
            return any(normalize_answer(answer) == normalize_answer(a) for a in alternatives)
        return any(
            verify(gold, parsed, float_rounding=float_rounding, timeout_seconds=None)  # type: ignore[arg-type]
            for gold in golds
        )
    raise ValueError(f"unknown task kind {kind!r}")


# ---------------------------------------------------------------------------------------
# MathVerifyVerifier
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheStats:
    """Counters of a verifier's (answer, gold) cache."""

    hits: int
    misses: int
    size: int
    max_size: int


PROGRESS_MIN_CHECKS = 1000
"""A verifier call with this many checks for the workers shows a progress bar."""


class MathVerifyVerifier:
    """Answer checks by math-verify, in killable worker processes, with an LRU cache.

    Outcomes per (response, gold): ``True``/``False``; ``None`` (ungradeable) when the gold
    cannot be parsed (a warning names it), when the check times out, or when the worker
    fails on it (memory limit, an exception inside math-verify). A response with no final
    answer is ``False``; an answer math-verify cannot parse is compared as normalised text.

    Args:
        n_workers: worker processes; each holds a warm math-verify import (~100 MB).
        timeout_s: wall-clock limit of one check; past it the worker is killed and the
            check is ungradeable.
        cache_size: (extracted answer, gold) results kept in the LRU cache; 0 disables it.
            Timeouts are cached too, so a pathological answer repeated in a batch costs one
            timeout, not many.
        memory_limit_mb: address-space limit of each worker (``RLIMIT_AS``); 0 for none.
        start_method: ``"spawn"`` or ``"forkserver"``; both are safe in a process that
            already runs torch threads (``fork`` is not offered for that reason).
        float_rounding: decimal places math-verify rounds floats to before comparing.
        progress: show a progress bar when a call sends ``PROGRESS_MIN_CHECKS`` (1000)
            checks or more to the workers (cache hits are not counted).
        extraction: how the final answer is found before math-verify compares it:
            ``"strict"`` (:func:`extract_answer`; for training-time verification) or
            ``"harness"`` (:func:`extract_answer_harness`: the rules of the harness the
            paper's benchmark numbers come from, down to the last number of the response).

    Use as a context manager, or call :meth:`close`; workers are also stopped at exit.
    """

    def __init__(
        self,
        n_workers: int = 2,
        timeout_s: float = 5.0,
        cache_size: int = 65536,
        memory_limit_mb: int = 4096,
        start_method: str = "spawn",
        float_rounding: int = 6,
        progress: bool = True,
        extraction: str = "strict",
    ) -> None:
        errors = []
        if n_workers < 1:
            errors.append(f"verifier.n_workers must be >= 1, got {n_workers}")
        if not timeout_s > 0:
            errors.append(f"verifier.timeout_s must be > 0, got {timeout_s}")
        if cache_size < 0:
            errors.append(f"verifier.cache_size must be >= 0, got {cache_size}")
        if memory_limit_mb < 0:
            errors.append(f"verifier.memory_limit_mb must be >= 0 (0 = no limit), got {memory_limit_mb}")
        if start_method not in START_METHODS:
            errors.append(f"verifier.start_method must be one of {START_METHODS}, got {start_method!r}")
        if float_rounding < 0:
            errors.append(f"verifier.float_rounding must be >= 0, got {float_rounding}")
        if error := _extraction_error(extraction):
            errors.append(error)
        if errors:
            raise ValueError("; ".join(errors))
        self.timeout_s = float(timeout_s)
        self.cache_size = cache_size
        self.float_rounding = float_rounding
        self.progress = progress
        self.extraction = extraction
        self._pool = KillablePool(
            _run_task, n_workers, float(timeout_s), memory_limit_mb, start_method,
            warm_imports=("math_verify",), import_hint=_MISSING_MATH_VERIFY, config_key="verifier",
        )
        self._cache: OrderedDict[tuple, bool | None] = OrderedDict()
        self._gold_ok: dict[tuple[str, ...], bool] = {}
        self._hits = 0
        self._misses = 0

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker processes (a later call starts fresh ones)."""
        self._pool.close()

    def __enter__(self) -> MathVerifyVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stats --------------------------------------------------------------------------
    @property
    def cache_stats(self) -> CacheStats:
        return CacheStats(self._hits, self._misses, len(self._cache), self.cache_size)

    @property
    def n_timeouts(self) -> int:
        """Checks killed at ``timeout_s`` since construction."""
        return self._pool.n_timeouts

    @property
    def n_failures(self) -> int:
        """Checks lost to a worker error or crash since construction."""
        return self._pool.n_errors + self._pool.n_crashes

    def clear_cache(self) -> None:
        self._cache.clear()
        self._hits = self._misses = 0

    # -- protocol -----------------------------------------------------------------------
    def check_golds(self, golds: Sequence[str]) -> list[bool]:
        """Whether math-verify can parse each gold (a timeout counts as not parseable)."""
        keys = [normalize_gold(g) for g in golds]
        self._learn_golds(keys)
        return [k is not None and self._gold_ok[k] for k in keys]

    def _learn_golds(self, keys: Sequence[tuple[str, ...] | None]) -> None:
        todo = sorted({k for k in keys if k is not None and k not in self._gold_ok})
        for key, value in zip(todo, self._pool.run([("gold", (k,)) for k in todo])):
            self._gold_ok[key] = value is True

    def verify(self, responses: Sequence[str], golds: Sequence[str]) -> list[bool | None]:
        """``True``/``False`` per (response, gold); ``None`` when it cannot be graded.

        Golds are annotated as text to match the ``AnswerVerifier`` protocol; numbers and
        lists of acceptable answers are accepted too (see :func:`normalize_gold`).
        """
        _check_lengths(responses, golds)
        return self.verify_answers([self.extract_answer(r) for r in responses], golds)

    def extract_answer(self, response: str) -> str | None:
        """The final answer of ``response`` by this verifier's ``extraction`` mode."""
        return EXTRACTIONS[self.extraction](response)

    def verify_answers(
        self, answers: Sequence[str | None], golds: Sequence[str]
    ) -> list[bool | None]:
        """Like :meth:`verify` for answers already extracted (``None``: no answer, wrong)."""
        _check_lengths(answers, golds)
        results: list[bool | None] = [None] * len(answers)
        pending: dict[tuple, list[int]] = {}
        bad_golds: dict[str, GoldAnswer] = {}
        gold_keys = [normalize_gold(g) for g in golds]
        self._learn_golds(gold_keys)  # first, so a bad gold is never "wrong" for lack of an answer
        for i, (answer, gold, alternatives) in enumerate(zip(answers, golds, gold_keys)):
            if alternatives is None or not self._gold_ok[alternatives]:
                bad_golds[repr(gold)] = gold
                continue
            if answer is None:
                results[i] = False
                continue
            # with cache_size=0 nothing is shared, not even repeats within the batch
            key = (answer, alternatives) if self.cache_size else (answer, alternatives, i)
            if key in self._cache:
                self._cache.move_to_end(key)
                self._hits += 1
                results[i] = self._cache[key]
            elif key in pending:  # repeated within this batch
                self._hits += 1
                pending[key].append(i)
            else:
                self._misses += 1
                pending.setdefault(key, []).append(i)
        keys = list(pending)
        tasks = [("verify", (k[0], k[1], self.float_rounding)) for k in keys]
        loud = self.progress and len(tasks) >= PROGRESS_MIN_CHECKS
        outcomes = self._pool.run(tasks, progress="answer checks" if loud else None)
        n_lost = sum(1 for v in outcomes if v in (TIMEOUT, CRASH))
        if n_lost:
            log.warning("%d of %d answer checks timed out or failed (timeout_s=%s); they are "
                        "ungradeable", n_lost, len(tasks), self.timeout_s)
        for key, value in zip(keys, outcomes):
            verdict = value if isinstance(value, bool) else None
            if value is None:  # the gold did not parse after all (its check timed out before)
                gold = golds[pending[key][0]]
                self._gold_ok[key[1]] = False
                bad_golds[repr(gold)] = gold
            for i in pending[key]:
                results[i] = verdict
            if self.cache_size and value != CRASH:
                self._cache[key] = verdict
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        for gold in bad_golds.values():
            _warn_bad_gold(gold)
        return results


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} responses but {len(b)} gold answers")


def _warn_bad_gold(gold: GoldAnswer) -> None:
    text = repr(gold)
    text = text if len(text) <= 120 else text[:117] + "..."
    warnings.warn(
        f"gold answer {text} cannot be parsed; its problem is ungradeable and should be dropped",
        UserWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------------
# Script / notebook entry point
# ---------------------------------------------------------------------------------------

_default_verifier: MathVerifyVerifier | None = None


def _close_default() -> None:
    if _default_verifier is not None:
        _default_verifier.close()


atexit.register(_close_default)


def is_correct(response: str, gold: GoldAnswer, *, timeout_s: float = 5.0) -> bool | None:
    """Whether ``response``'s final answer equals ``gold``; ``None`` when it can't be graded.

    For scripts and notebooks. Uses one shared :class:`MathVerifyVerifier` with a single
    worker (started on first call, stopped at exit); batch work should build its own
    verifier and call ``verify`` on whole lists.

    >>> is_correct("... so the answer is \\\\boxed{\\\\frac{1}{2}}", "0.5")  # doctest: +SKIP
    True
    """
    global _default_verifier
    if _default_verifier is None or _default_verifier.timeout_s != timeout_s:
        _close_default()
        _default_verifier = MathVerifyVerifier(n_workers=1, timeout_s=timeout_s)
    return _default_verifier.verify([response], [gold])[0]
