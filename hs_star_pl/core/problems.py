"""Problem sets: loading JSONL in the common math-dataset shapes, and per-iteration draws.

Covered: one JSON object per line, with the question under ``question``/``problem``/``query``
(or a configured key) and the gold under ``answer``/``final_answer``/``gold`` (or a
configured key). Gold fields are normalised by the one rule the verifiers use
(``core.answers.normalize_gold``): GSM8K's ``"... #### 1,234"`` becomes ``"1234"``, ``"$...$"``
and ``\\boxed{...}`` wrappers are removed, integral floats (AMC's ``27.0``) become ``"27"``,
and a list holds *acceptable alternatives*: a one-element list (OlympiadBench) is unwrapped,
a longer one is kept as a tuple of alternatives (any of them counts as right). A gold can
also be taken from the last ``\\boxed{}`` of a solution field (Minerva Math). Not covered
here: deciding whether an answer is *parseable* (that is the verifier's job, see
``verifiers``).

Every malformed row raises ``ProblemFileError`` naming the file and the 1-based line.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hs_star_pl.core.answers import last_boxed
from hs_star_pl.core.answers import normalize_gold as gold_alternatives
from hs_star_pl.core.records import GoldText, Problem
from hs_star_pl.errors import InputFileError
from hs_star_pl.jsonl import LineError, parse_json_line, why_not_a_file

QUESTION_KEYS = ("question", "problem", "query", "prompt")
ANSWER_KEYS = ("answer", "final_answer", "gold", "expected_answer")
ID_KEYS = ("id", "unique_id", "idx", "problem_id")
SOLUTION_KEYS = ("solution", "reference_solution")
MAX_LINE_BYTES = 4 * 1024 * 1024


class ProblemFileError(InputFileError):
    """A problem file (or one of its rows) cannot be used; the message names file and line."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
        self.message = message


def content_id(question: str, answer: GoldText) -> str:
    """Stable id from content: the same question and answer give the same id everywhere."""
    text = answer if isinstance(answer, str) else "\x1f".join(answer)
    digest = hashlib.sha256(f"{question}\x00{text}".encode()).hexdigest()
    return f"h{digest[:16]}"


def _check_gold_type(value: Any, inside_list: bool = False) -> None:
    if isinstance(value, bool) or value is None:
        raise TypeError(f"expected a string, number or list of them, got {value!r}")
    if isinstance(value, (list, tuple)) and not inside_list:
        if not value:
            raise ValueError("the answer list is empty")
        for v in value:
            _check_gold_type(v, inside_list=True)
        return
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        raise ValueError(f"the answer is not a finite number: {value!r}")
    if not isinstance(value, (str, int, float)):
        raise TypeError(f"expected a string, number or list of them, got {type(value).__name__}")


def normalize_gold(value: Any) -> GoldText:
    """Turn a gold-answer field into text (or a tuple of alternatives), or raise.

    The rule is ``core.answers.normalize_gold``, so what is stored is what gets graded; this
    adds the type checks a data file needs. A list means acceptable alternatives.

    >>> normalize_gold("Janet has 3 ... #### 1,234")
    '1234'
    >>> normalize_gold(27.0), normalize_gold(["$5$"]), normalize_gold(["1/2", "0.5"])
    ('27', '5', ('1/2', '0.5'))

    Raises:
        TypeError: not a string, number or list of them.
        ValueError: empty, not finite, or nothing left after normalisation.
    """
    _check_gold_type(value)
    alternatives = gold_alternatives(list(value) if isinstance(value, tuple) else value)
    if not alternatives:
        raise ValueError("the answer is empty")
    return alternatives[0] if len(alternatives) == 1 else alternatives


def _pick(row: Mapping[str, Any], configured: str | None, candidates: Sequence[str]) -> str | None:
    if configured is not None:
        return configured if configured in row else None
    return next((k for k in candidates if k in row), None)


@dataclass(frozen=True)
class FieldMap:
    """Where a row keeps each part of a problem (``None``: detect from the usual names).

    Attributes:
        question_key: field holding the question.
        answer_key: field holding the gold.
        id_key: field holding a stable id.
        solution_key: field holding a reference solution.
        answer_from: ``field``: the gold is the answer field itself; ``boxed``: the last
            ``\\boxed{}`` in it (a worked solution, as Minerva Math stores its answers).
        default_id: id of a row with no id field: ``content`` (a hash of question and
            answer, the same wherever the problem appears) or ``line`` (``line-<n>``, for
            benchmarks that hold repeated questions and no ids).
    """

    question_key: str | None = None
    answer_key: str | None = None
    id_key: str | None = None
    solution_key: str | None = None
    answer_from: Literal["field", "boxed"] = "field"
    default_id: Literal["content", "line"] = "content"


def load_problems(
    path: str | Path,
    *,
    question_key: str | None = None,
    answer_key: str | None = None,
    id_key: str | None = None,
    solution_key: str | None = None,
    answer_from: Literal["field", "boxed"] = "field",
    default_id: Literal["content", "line"] = "content",
    max_line_bytes: int = MAX_LINE_BYTES,
) -> list[Problem]:
    """Load problems from a JSONL file.

    Args:
        path: the ``.jsonl`` file.
        question_key: field holding the question; by default the first of
            ``question, problem, query, prompt`` present in the row.
        answer_key: field holding the gold; by default ``answer, final_answer, gold,
            expected_answer``.
        id_key: field holding a stable id; by default ``id, unique_id, idx, problem_id``,
            and ``default_id`` when none is present.
        solution_key: optional reference-solution field (``solution`` by default; for
            GSM8K the whole ``answer`` text is kept as the solution; of a list of
            alternative solutions, as OlympiadBench has, the first is kept).
        answer_from: ``field`` (the gold is the answer field) or ``boxed`` (the last
            ``\\boxed{}`` of the answer field; a row without one is an error).
        default_id: ``content`` (hash of question and answer) or ``line`` (``line-<n>``).
        max_line_bytes: longer lines are rejected rather than parsed.

    Raises:
        ProblemFileError: missing or empty file (or a directory, a broken or looping
            link), a line that is not UTF-8 or not a JSON object (see ``jsonl``: a lone
            surrogate or a 4,300-digit number is refused too; a byte-order mark is skipped),
            a missing/ill-typed question or answer, an over-long line, or a duplicate id
            (naming both lines).
    """
    fields = FieldMap(question_key, answer_key, id_key, solution_key, answer_from, default_id)
    if answer_from not in ("field", "boxed"):
        raise ValueError(f"answer_from must be 'field' or 'boxed', got {answer_from!r}")
    if default_id not in ("content", "line"):
        raise ValueError(f"default_id must be 'content' or 'line', got {default_id!r}")
    path = Path(path)
    if not path.is_file():
        raise ProblemFileError(path, None, why_not_a_file(path, "problem file"))
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if len(raw) > max_line_bytes:
                raise ProblemFileError(
                    path, lineno, f"line is {len(raw)} bytes, over the {max_line_bytes}-byte limit"
                )
            try:
                row = parse_json_line(raw, lineno)
            except LineError as err:
                raise ProblemFileError(path, lineno, str(err)) from None
            if row is None:
                continue
            if not isinstance(row, dict):
                raise ProblemFileError(path, lineno, f"expected a JSON object, got {type(row).__name__}")
            problem = _row_to_problem(path, lineno, row, fields)
            if problem.id in seen:
                raise ProblemFileError(
                    path, lineno, f"duplicate problem id {problem.id!r} (first seen on line {seen[problem.id]})"
                )
            seen[problem.id] = lineno
            problems.append(problem)
    if not problems:
        raise ProblemFileError(path, None, "the file holds no problems")
    return problems


def _gold_of(value: Any, answer_from: str) -> GoldText:
    if answer_from == "boxed":
        if not isinstance(value, str):
            raise TypeError(f"expected a solution string with a \\boxed{{}} answer, got {type(value).__name__}")
        boxed = last_boxed(value)
        if boxed is None:
            raise ValueError("no \\boxed{} answer in it")
        value = boxed
    return normalize_gold(value)


def _row_to_problem(path: Path, lineno: int, row: dict[str, Any], fields: FieldMap) -> Problem:
    qk = _pick(row, fields.question_key, QUESTION_KEYS)
    if qk is None:
        wanted = repr(fields.question_key) if fields.question_key else " or ".join(map(repr, QUESTION_KEYS))
        raise ProblemFileError(path, lineno, f"no question field ({wanted}); row has {sorted(row)}")
    question = row[qk]
    if not isinstance(question, str) or not question.strip():
        raise ProblemFileError(path, lineno, f"field {qk!r} must be a non-empty string, got {question!r:.60}")
    ak = _pick(row, fields.answer_key, ANSWER_KEYS)
    if ak is None:
        wanted = repr(fields.answer_key) if fields.answer_key else " or ".join(map(repr, ANSWER_KEYS))
        raise ProblemFileError(path, lineno, f"no answer field ({wanted}); row has {sorted(row)}")
    try:
        answer = _gold_of(row[ak], fields.answer_from)
    except (TypeError, ValueError) as err:
        raise ProblemFileError(path, lineno, f"field {ak!r}: {err}") from None
    sk = _pick(row, fields.solution_key, SOLUTION_KEYS)
    solution = row.get(sk) if sk else None
    if solution is None and isinstance(row[ak], str) and "####" in row[ak]:
        solution = row[ak]  # GSM8K keeps its worked solution in the answer field
    if isinstance(solution, list) and solution and all(isinstance(x, str) for x in solution):
        solution = solution[0]  # OlympiadBench lists alternative complete solutions
    if solution is not None and not isinstance(solution, str):
        raise ProblemFileError(path, lineno, f"field {sk!r} must be a string (or a list of strings), got {type(solution).__name__}")
    ik = _pick(row, fields.id_key, ID_KEYS)
    if fields.id_key is not None and ik is None:
        raise ProblemFileError(path, lineno, f"no id field {fields.id_key!r}")
    if ik is not None:
        raw_id = row[ik]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id) == "":
            raise ProblemFileError(path, lineno, f"field {ik!r} must be a non-empty string or integer")
        pid = str(raw_id)
    elif fields.default_id == "line":
        pid = f"line-{lineno}"
    else:
        pid = content_id(question, answer)
    used = {qk, ak, ik, sk}
    metadata = {k: v for k, v in row.items() if k not in used}
    return Problem(id=pid, question=question, answer=answer, solution=solution, metadata=metadata)


def write_problems(path: str | Path, problems: Iterable[Problem]) -> None:
    """Write problems as JSONL in the shape ``load_problems`` reads back unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for p in problems:
            answer = p.answer if isinstance(p.answer, str) else list(p.answer)
            row = {"id": p.id, "question": p.question, "answer": answer}
            if p.solution is not None:
                row["solution"] = p.solution
            row.update(p.metadata)
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class ProblemPool:
    """Draws each iteration's problems from a pool, seeded, without replacement.

    Iteration ``t`` takes the next ``problems_per_iteration`` problems of a seeded
    permutation of the pool, so no problem is seen twice until the pool runs out. What
    happens then is ``on_exhausted``: ``"error"`` (default) refuses; ``"reshuffle"`` starts
    a new permutation, with the problems of the previous iteration moved to its end so
    iteration ``t`` still never repeats iteration ``t-1``. That needs a pool at least twice
    the draw size; with a smaller one the reshuffling draw refuses too, rather than repeat
    problems. ``problems_per_iteration=None`` uses the whole pool every iteration (a
    deliberate choice of the config, for a pool that is one iteration's worth).
    """

    problems: tuple[Problem, ...]
    problems_per_iteration: int | None = None
    seed: int = 0
    on_exhausted: Literal["error", "reshuffle"] = "error"

    def __post_init__(self) -> None:
        n = self.problems_per_iteration
        if n is not None and not 1 <= n <= len(self.problems):
            raise ValueError(
                f"self_training.problems_per_iteration must be between 1 and the pool size "
                f"({len(self.problems)}), got {n}"
            )
        if self.on_exhausted not in ("error", "reshuffle"):
            raise ValueError(f"self_training.on_exhausted must be 'error' or 'reshuffle', got {self.on_exhausted!r}")

    def draw(self, iteration: int) -> list[Problem]:
        """The problems of ``iteration`` (0-based), in a seeded order."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        by_id = {p.id: p for p in self.problems}
        ids = sorted(by_id)
        size = self.problems_per_iteration
        if size is None:
            return [by_id[i] for i in random.Random(f"{self.seed}:order:{iteration}").sample(ids, len(ids))]
        perm: list[str] = []
        previous: list[str] = []
        current: list[str] = []
        n_pass = 0
        for t in range(iteration + 1):
            if len(perm) < size:
                if self.on_exhausted == "error" and t > 0:
                    fixes = (
                        "use a larger pool, fewer self_training.problems_per_iteration, or "
                        "self_training.on_exhausted: reshuffle"
                        if len(ids) >= 2 * size
                        else "use a larger pool or fewer self_training.problems_per_iteration "
                        f"(self_training.on_exhausted: reshuffle would need {2 * size} problems)"
                    )
                    raise ValueError(
                        f"the problem pool has {len(ids)} problems but iteration {t} needs "
                        f"{(t + 1) * size} distinct ones ({size} per iteration); {fixes}"
                    )
                if t > 0 and len(ids) < 2 * size:
                    raise ValueError(
                        f"the problem pool has {len(ids)} problems but iteration {t} needs {size} that "
                        f"iteration {t - 1} did not use; self_training.on_exhausted: reshuffle needs a pool "
                        f"of at least 2 x self_training.problems_per_iteration = {2 * size} problems"
                    )
                fresh = random.Random(f"{self.seed}:pool:{n_pass}").sample(ids, len(ids))
                n_pass += 1
                recent = set(previous)
                leftover = set(perm)
                fresh = [i for i in fresh if i not in recent and i not in leftover] + [
                    i for i in fresh if i in recent and i not in leftover
                ]
                perm = perm + fresh
            current, perm = perm[:size], perm[size:]
            previous = current
        return [by_id[i] for i in current]
