"""Answer checking: correct, wrong, or ungradeable.

Scope:

* **The final answer** is found by the extraction rules of :mod:`hs_star_pl.core.answers`
  (pure, stdlib), in the mode a verifier's ``extraction`` names: ``strict``
  (:func:`~hs_star_pl.core.answers.extract_answer`, the default, used in training) or
  ``harness`` (:func:`~hs_star_pl.core.answers.extract_answer_harness`, the rules of the
  evaluation harness behind the paper's tables). A response with no final answer is graded
  *wrong*.
* **Gold answers** are read by :func:`~hs_star_pl.core.answers.normalize_gold` (plain, LaTeX,
  ``$...$``, ``\\boxed``, GSM8K ``####``, floats, lists of acceptable answers). A gold that
  cannot be parsed makes the problem *ungradeable* (``None``) with a warning naming it, never
  silently right or wrong.
* **Equivalence** by math-verify (numbers, fractions, LaTeX expressions, tuples, intervals,
  sets, percentages) in :class:`MathVerifyVerifier`, or by normalised string/number equality
  in the stdlib-only :class:`ExactMatchVerifier` (tests, the synthetic task).

Safety: model output is untrusted. Nothing here calls ``eval``; text reaches sympy only
through math-verify's own parser, and only inside a worker *process*
(:class:`hs_star_pl.infra.workers.KillablePool`) that is killed when a check exceeds ``timeout_s`` (math-verify's ``signal.alarm`` timeouts do not work off the main
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
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from hs_star_pl.core.answers import EXTRACTIONS, GoldAnswer, extraction_error, normalize_answer, normalize_gold
from hs_star_pl.infra.workers import CRASH, START_METHODS, TIMEOUT, KillablePool

log = logging.getLogger(__name__)

_MISSING_MATH_VERIFY = (
    "MathVerifyVerifier needs the `math-verify` package: pip install 'math-verify>=0.7' "
    "(or use hs_star_pl.verifiers.ExactMatchVerifier)"
)

# ---------------------------------------------------------------------------------------
# Exact match (stdlib only)
# ---------------------------------------------------------------------------------------


class ExactMatchVerifier:
    """Stdlib-only verifier: normalised string/number equality after answer extraction.

    Cheap and dependency-free; right for the synthetic arithmetic task and for tests. It
    does not know that ``\\sqrt{2}/2`` equals ``\\frac{\\sqrt2}{2}``: use
    :class:`MathVerifyVerifier` for real math data. A gold that normalises to nothing is
    ungradeable (``None``, with a warning); a response without a final answer is wrong.

    Args:
        extraction: how the final answer is found: ``"strict"``
            (:func:`~hs_star_pl.core.answers.extract_answer`) or ``"harness"``
            (:func:`~hs_star_pl.core.answers.extract_answer_harness`, the paper's evaluation rules).
    """

    def __init__(self, extraction: str = "strict") -> None:
        if error := extraction_error(extraction):
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
# math-verify tasks (run inside the worker processes of hs_star_pl.infra.workers.KillablePool)
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
            ``"strict"`` (:func:`~hs_star_pl.core.answers.extract_answer`; for training-time
            verification) or ``"harness"`` (:func:`~hs_star_pl.core.answers.extract_answer_harness`:
            the rules of the harness the paper's benchmark numbers come from, down to the last
            number of the response).

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
        if error := extraction_error(extraction):
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
        lists of acceptable answers are accepted too (see :func:`~hs_star_pl.core.answers.normalize_gold`).
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
