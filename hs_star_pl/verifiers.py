"""Final-answer extraction and answer checking: correct, wrong, or ungradeable.

Scope:

* **Extraction** (pure, stdlib): the last ``\\boxed{...}`` (nested braces, also ``\\fbox``),
  else the text after the last "The answer is", else after the last "Answer:", else after
  the last GSM8K-style "####". A response with none of these has no final answer and is
  graded *wrong* (the policy failed to answer; that is the model's fault, not the grader's).
* **Gold answers** in the common dataset forms: plain (``"42"``), LaTeX (``"\\frac{1}{2}"``),
  ``"$...$"``, ``"\\boxed{...}"``, GSM8K ``"... #### 1,234"``, numbers stored as floats
  (``27.0``/``"27.0"`` mean 27), and lists of acceptable answers (a Python list/tuple: any
  alternative matching counts as correct). A gold that cannot be parsed makes the problem
  *ungradeable* (``None``) with a warning naming it, never silently right or wrong.
* **Equivalence** by math-verify (numbers, fractions, LaTeX expressions, tuples, intervals,
  sets, percentages) in :class:`MathVerifyVerifier`, or by normalised string/number equality
  in the stdlib-only :class:`ExactMatchVerifier` (tests, the synthetic task).

Safety: model output is untrusted. Nothing here calls ``eval``; text reaches sympy only
through math-verify's own parser, and only inside a worker *process* that is killed when a
check exceeds ``timeout_s`` (math-verify's ``signal.alarm`` timeouts do not work off the main
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
import multiprocessing as mp
import re
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import wait as wait_connections
from typing import Any, Union

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

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)
_ANSWER_COLON = re.compile(r"answer\s*:", re.IGNORECASE)


def _boxed_contents(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}``/``\\fbox{...}`` in order (nested braces)."""
    found: list[tuple[int, str]] = []
    for command in _BOX_COMMANDS:
        start = 0
        while (i := text.find(command, start)) != -1:
            start = i + len(command)
            j = start
            while j < len(text) and text[j] == " ":
                j += 1
            if j < len(text) and text[j] == "{":
                depth, k = 0, j
                while k < len(text):
                    if text[k] == "{":
                        depth += 1
                    elif text[k] == "}":
                        depth -= 1
                        if depth == 0:
                            found.append((i, text[j + 1 : k]))
                            break
                    k += 1
            elif j > start:  # "\boxed 5": one token after a space
                m = re.match(r"[^\s$.,;]+", text[j:])
                if m:
                    found.append((i, m.group(0)))
    return [content for _, content in sorted(found)]


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
    boxed = [b.strip() for b in _boxed_contents(response)]
    boxed = [b for b in boxed if b]
    if boxed:
        return boxed[-1]
    for pattern in (_ANSWER_IS, _ANSWER_COLON):
        matches = list(pattern.finditer(response))
        if matches:
            answer = _clean_tail(response[matches[-1].end() :])
            if answer:
                return answer
    if "####" in response:
        return _clean_tail(response.rsplit("####", 1)[1])
    return None


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
        return (str(int(gold)),) if gold.is_integer() else (repr(gold),)
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
_FRAC = re.compile(r"^\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
_NUMBER = re.compile(r"^-?(\d+(\.\d*)?|\.\d+)$")


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
    if _NUMBER.match(s):
        value = Fraction(s)
    elif m := re.match(r"^(-?\d+)/(-?\d+)$", s) or _FRAC.match(s):
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
    """

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
            answer = extract_answer(response)
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
# The killable worker pool
# ---------------------------------------------------------------------------------------

_TIMEOUT = "timeout"
_CRASH = "crash"


def _worker_main(conn, memory_limit_mb: int) -> None:
    """Worker loop: answer ``(task_id, kind, payload)`` messages until ``None`` arrives."""
    if memory_limit_mb > 0:
        try:
            import resource

            limit = memory_limit_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):  # not on this platform; the kill still works
            pass
    try:
        import math_verify  # noqa: F401  (warm the import before saying ready)
    except ImportError:
        conn.send(("import_error", _MISSING_MATH_VERIFY))
        return
    # We disable math-verify's own signal timeouts (our parent kills us instead); it logs a
    # warning about that on every call.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        task_id, kind, payload = msg
        try:
            result: Any = ("ok", _run_task(kind, payload))
        except Exception as exc:  # reported back as "error" -> ungradeable, and counted
            result = ("error", f"{type(exc).__name__}: {exc}"[:300])
        conn.send((task_id, result))


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
    """One check in a worker. ``"gold"``: is it parseable; ``"verify"``: True/False/None."""
    from math_verify import verify

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


@dataclass
class _Worker:
    process: Any
    conn: Any
    ready: bool = False
    task: int | None = None
    deadline: float = 0.0


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    for w in workers:
        w.process.join(timeout=1.0)
        if w.process.is_alive():
            w.process.kill()
            w.process.join(timeout=1.0)
        w.conn.close()
    workers.clear()


class _WorkerPool:
    """``n_workers`` processes, each with its own pipe, so a hung check can be killed alone.

    Workers start on first use and are reused across calls. A task's clock starts when it
    is handed to a *ready* worker (after imports), so respawn time never counts against a
    check. On timeout the worker is killed and a fresh one spawned; a worker that dies
    (e.g. the memory limit) reports ``_CRASH`` for its task only.
    """

    def __init__(self, n_workers: int, timeout_s: float, memory_limit_mb: int, start_method: str):
        self.n_workers = n_workers
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        self.n_timeouts = 0
        self.n_crashes = 0
        self.n_errors = 0
        self.last_errors: list[str] = []

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main, args=(child_conn, self.memory_limit_mb), daemon=True,
            name="hs-star-verifier",
        )
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn)

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(timeout=5.0)
        worker.conn.close()
        self._workers[self._workers.index(worker)] = self._spawn()

    def close(self) -> None:
        _shutdown(self._workers)

    def run(self, tasks: Sequence[tuple[str, tuple]]) -> list[Any]:
        """Results in task order: the task's value, ``_TIMEOUT`` or ``_CRASH``."""
        results: list[Any] = [None] * len(tasks)
        if not tasks:
            return results
        while len(self._workers) < min(self.n_workers, len(tasks)):
            self._workers.append(self._spawn())
        next_task, n_done = 0, 0
        while n_done < len(tasks):
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.task is None and next_task < len(tasks):
                    kind, payload = tasks[next_task]
                    w.conn.send((next_task, kind, payload))
                    w.task, w.deadline = next_task, now + self.timeout_s
                    next_task += 1
            busy = [w for w in self._workers if w.task is not None]
            wait_s = max(0.0, min((w.deadline for w in busy), default=now + 30.0) - now)
            ready_conns = wait_connections([w.conn for w in self._workers], timeout=wait_s)
            for w in list(self._workers):
                if w.conn not in ready_conns:
                    continue
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):  # died: memory limit, or killed from outside
                    if w.task is not None:
                        results[w.task], n_done = _CRASH, n_done + 1
                        self.n_crashes += 1
                    self._replace(w)
                    continue
                if msg[0] == "ready":
                    w.ready = True
                elif msg[0] == "import_error":
                    self.close()
                    raise ImportError(msg[1])
                else:
                    task_id, (status, value) = msg
                    if status == "error":
                        self.n_errors += 1
                        self.last_errors = (self.last_errors + [value])[-10:]
                        value = _CRASH
                    results[task_id], n_done = value, n_done + 1
                    w.task = None
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now >= w.deadline:
                    results[w.task], n_done = _TIMEOUT, n_done + 1
                    self.n_timeouts += 1
                    self._replace(w)
        return results


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


_START_METHODS = ("spawn", "forkserver")


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
        if start_method not in _START_METHODS:
            errors.append(f"verifier.start_method must be one of {_START_METHODS}, got {start_method!r}")
        if float_rounding < 0:
            errors.append(f"verifier.float_rounding must be >= 0, got {float_rounding}")
        if errors:
            raise ValueError("; ".join(errors))
        self.timeout_s = float(timeout_s)
        self.cache_size = cache_size
        self.float_rounding = float_rounding
        self._pool = _WorkerPool(n_workers, float(timeout_s), memory_limit_mb, start_method)
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
        todo = sorted({k for k in keys if k is not None and k not in self._gold_ok})
        for key, value in zip(todo, self._pool.run([("gold", (k,)) for k in todo])):
            self._gold_ok[key] = value is True
        return [k is not None and self._gold_ok[k] for k in keys]

    def verify(self, responses: Sequence[str], golds: Sequence[str]) -> list[bool | None]:
        """``True``/``False`` per (response, gold); ``None`` when it cannot be graded.

        Golds are annotated as text to match the ``AnswerVerifier`` protocol; numbers and
        lists of acceptable answers are accepted too (see :func:`normalize_gold`).
        """
        _check_lengths(responses, golds)
        return self.verify_answers([extract_answer(r) for r in responses], golds)

    def verify_answers(
        self, answers: Sequence[str | None], golds: Sequence[str]
    ) -> list[bool | None]:
        """Like :meth:`verify` for answers already extracted (``None``: no answer, wrong)."""
        _check_lengths(answers, golds)
        results: list[bool | None] = [None] * len(answers)
        pending: dict[tuple, list[int]] = {}
        bad_golds: dict[tuple, GoldAnswer] = {}
        for i, (answer, gold) in enumerate(zip(answers, golds)):
            alternatives = normalize_gold(gold)
            if alternatives is None:
                bad_golds[("", repr(gold))] = gold
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
                if results[i] is None and self._gold_ok.get(alternatives) is False:
                    bad_golds[alternatives] = gold
            elif key in pending:  # repeated within this batch
                self._hits += 1
                pending[key].append(i)
            else:
                self._misses += 1
                pending.setdefault(key, []).append(i)
        keys = list(pending)
        tasks = [("verify", (k[0], k[1], self.float_rounding)) for k in keys]
        for key, value in zip(keys, self._pool.run(tasks)):
            verdict = value if isinstance(value, bool) else None
            if value is None:  # the gold itself did not parse
                self._gold_ok[key[1]] = False
                bad_golds[key[1]] = golds[pending[key][0]]
            for i in pending[key]:
                results[i] = verdict
            if self.cache_size and value != _CRASH:
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
