"""Problem sets: loading JSONL in the common math-dataset shapes, and per-iteration draws.

Covered: one JSON object per line, with the question under ``question``/``problem``/``query``
(or a configured key) and the gold under ``answer``/``final_answer``/``gold`` (or a
configured key). GSM8K's ``"... #### 1,234"`` answers are reduced to the part after
``####``; single-element lists (OlympiadBench) are unwrapped; integral floats (AMC's
``27.0``) become ``"27"``. Not covered here: deciding whether an answer is *parseable*
(that is the verifier's job, see ``verifiers``).

Every malformed row raises ``ProblemFileError`` naming the file and the 1-based line.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hs_star_pl.errors import InputFileError
from hs_star_pl.records import Problem

QUESTION_KEYS = ("question", "problem", "query", "prompt")
ANSWER_KEYS = ("answer", "final_answer", "gold", "expected_answer")
ID_KEYS = ("id", "unique_id", "idx", "problem_id")
SOLUTION_KEYS = ("solution", "reference_solution")
MAX_LINE_BYTES = 4 * 1024 * 1024

_GSM8K_GOLD = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


class ProblemFileError(InputFileError):
    """A problem file (or one of its rows) cannot be used; the message names file and line."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


def content_id(question: str, answer: str) -> str:
    """Stable id from content: the same question and answer give the same id everywhere."""
    digest = hashlib.sha256(f"{question}\x00{answer}".encode()).hexdigest()
    return f"h{digest[:16]}"


def normalize_gold(value: Any) -> str:
    """Turn a gold-answer field into text, or raise ``TypeError``/``ValueError``.

    >>> normalize_gold("Janet has 3 ... #### 1,234")
    '1234'
    >>> normalize_gold(27.0), normalize_gold(["$5$"]), normalize_gold([1, 2])
    ('27', '$5$', '1, 2')
    """
    if isinstance(value, bool) or value is None:
        raise TypeError(f"expected a string, number or list of them, got {value!r}")
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("the answer list is empty")
        return ", ".join(normalize_gold(v) for v in value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"the answer is not a finite number: {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    if not isinstance(value, str):
        raise TypeError(f"expected a string, number or list of them, got {type(value).__name__}")
    text = value
    match = _GSM8K_GOLD.search(text)
    if match:
        text = match.group(1)
        if _THOUSANDS.match(text):
            text = text.replace(",", "")
    text = text.strip()
    if not text:
        raise ValueError("the answer is empty")
    return text


def _pick(row: Mapping[str, Any], configured: str | None, candidates: Sequence[str]) -> str | None:
    if configured is not None:
        return configured if configured in row else None
    return next((k for k in candidates if k in row), None)


def load_problems(
    path: str | Path,
    *,
    question_key: str | None = None,
    answer_key: str | None = None,
    id_key: str | None = None,
    solution_key: str | None = None,
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
            and a content hash when none is present.
        solution_key: optional reference-solution field (``solution`` by default; for
            GSM8K the whole ``answer`` text is kept as the solution).
        max_line_bytes: longer lines are rejected rather than parsed.

    Raises:
        ProblemFileError: missing or empty file, a line that is not UTF-8 or not a JSON
            object, a missing/ill-typed question or answer, an over-long line, or a
            duplicate id (naming both lines).
    """
    path = Path(path)
    if not path.is_file():
        raise ProblemFileError(path, None, "no such problem file")
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if len(raw) > max_line_bytes:
                raise ProblemFileError(
                    path, lineno, f"line is {len(raw)} bytes, over the {max_line_bytes}-byte limit"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ProblemFileError(path, lineno, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ProblemFileError(path, lineno, f"invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise ProblemFileError(path, lineno, f"expected a JSON object, got {type(row).__name__}")
            problem = _row_to_problem(path, lineno, row, question_key, answer_key, id_key, solution_key)
            if problem.id in seen:
                raise ProblemFileError(
                    path, lineno, f"duplicate problem id {problem.id!r} (first seen on line {seen[problem.id]})"
                )
            seen[problem.id] = lineno
            problems.append(problem)
    if not problems:
        raise ProblemFileError(path, None, "the file holds no problems")
    return problems


def _row_to_problem(
    path: Path,
    lineno: int,
    row: dict[str, Any],
    question_key: str | None,
    answer_key: str | None,
    id_key: str | None,
    solution_key: str | None,
) -> Problem:
    qk = _pick(row, question_key, QUESTION_KEYS)
    if qk is None:
        wanted = repr(question_key) if question_key else " or ".join(map(repr, QUESTION_KEYS))
        raise ProblemFileError(path, lineno, f"no question field ({wanted}); row has {sorted(row)}")
    question = row[qk]
    if not isinstance(question, str) or not question.strip():
        raise ProblemFileError(path, lineno, f"field {qk!r} must be a non-empty string, got {question!r:.60}")
    ak = _pick(row, answer_key, ANSWER_KEYS)
    if ak is None:
        wanted = repr(answer_key) if answer_key else " or ".join(map(repr, ANSWER_KEYS))
        raise ProblemFileError(path, lineno, f"no answer field ({wanted}); row has {sorted(row)}")
    try:
        answer = normalize_gold(row[ak])
    except (TypeError, ValueError) as err:
        raise ProblemFileError(path, lineno, f"field {ak!r}: {err}") from None
    sk = _pick(row, solution_key, SOLUTION_KEYS)
    solution = row.get(sk) if sk else None
    if solution is None and isinstance(row[ak], str) and "####" in row[ak]:
        solution = row[ak]  # GSM8K keeps its worked solution in the answer field
    if solution is not None and not isinstance(solution, str):
        raise ProblemFileError(path, lineno, f"field {sk!r} must be a string, got {type(solution).__name__}")
    ik = _pick(row, id_key, ID_KEYS)
    if id_key is not None and ik is None:
        raise ProblemFileError(path, lineno, f"no id field {id_key!r}")
    if ik is not None:
        raw_id = row[ik]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id) == "":
            raise ProblemFileError(path, lineno, f"field {ik!r} must be a non-empty string or integer")
        pid = str(raw_id)
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
            row = {"id": p.id, "question": p.question, "answer": p.answer}
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
    iteration ``t`` still never repeats iteration ``t-1`` (given a pool at least twice the
    draw size). ``problems_per_iteration=None`` uses the whole pool every iteration.
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
                    raise ValueError(
                        f"the problem pool has {len(ids)} problems but iteration {t} needs "
                        f"{(t + 1) * size} distinct ones ({size} per iteration); use a larger pool, "
                        f"fewer self_training.problems_per_iteration, or self_training.on_exhausted: reshuffle"
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
