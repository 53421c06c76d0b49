"""Problem sets: loading rows in the common math-dataset shapes, and per-iteration draws.

Covered sources: a JSONL file (one JSON object per line), a parquet file, a folder written by
``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``, one ``split`` of it), and
``hub:<owner>/<name>``, a data set on the Hugging Face Hub (``dataset_config``, ``split``,
``data_files``); the last three are read by the ``datasets`` library (``problem_sources``),
imported only when such a source is named. Each row has the question under
``question``/``problem``/``query``/``prompt`` (or a configured key) and the gold under
``answer``/``final_answer``/``gold`` (or a configured key). A key may be a dotted path into
nested fields (verl's ``reward_model.ground_truth``, ``extra_info.index``), and a question
given as chat messages (a list of ``{role, content}``) is the content of its last ``user``
message. Rows can be kept by equality ``filters`` and cut to the first ``max_rows``. Gold fields are normalised by the one rule the verifiers use
(``core.answers.normalize_gold``): GSM8K's ``"... #### 1,234"`` becomes ``"1234"``, ``"$...$"``
and ``\\boxed{...}`` wrappers are removed, integral floats (AMC's ``27.0``) become ``"27"``,
and a list holds *acceptable alternatives*: a one-element list (OlympiadBench) is unwrapped,
a longer one is kept as a tuple of alternatives (any of them counts as right). A gold can
also be taken from the last ``\\boxed{}`` of a solution field (Minerva Math). Not covered
here: deciding whether an answer is *parseable* (that is the verifier's job, see
``verifiers``).

Every malformed row raises ``ProblemFileError`` naming the file and the 1-based line (JSONL)
or the 0-based row index (parquet, arrow, hub).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hs_star_pl.core.answers import last_boxed
from hs_star_pl.core.answers import normalize_gold as gold_alternatives
from hs_star_pl.core.problem_sources import HUB_PREFIX, ProblemFileError, dataset_rows
from hs_star_pl.core.records import GoldText, Problem
from hs_star_pl.infra.jsonl import LineError, LongLineError, parse_json_line, read_lines, why_not_a_file

QUESTION_KEYS = ("question", "problem", "query", "prompt")
ANSWER_KEYS = ("answer", "final_answer", "gold", "expected_answer", "reward_model.ground_truth")
ID_KEYS = ("id", "unique_id", "idx", "problem_id", "extra_info.index")
SOLUTION_KEYS = ("solution", "reference_solution")
MAX_LINE_BYTES = 4 * 1024 * 1024


class _RowError(ValueError):
    """A row cannot be used; the caller adds where it is."""


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
        ValueError: empty, not finite, nothing left after normalisation, a ``\\boxed{}``
            that is not closed, or a text of several lines with no ``####`` or box (a worked
            solution kept whole would grade every response wrong).
    """
    _check_gold_type(value)
    for text in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(text, str):
            _check_gold_shape(text)
    alternatives = gold_alternatives(list(value) if isinstance(value, tuple) else value)
    if not alternatives:
        raise ValueError("the answer is empty")
    return alternatives[0] if len(alternatives) == 1 else alternatives


def _check_gold_shape(text: str) -> None:
    """Refuse a gold text that would be kept whole though it is not an answer.

    A gold is reduced to its answer by its markers (``####``, ``\\boxed{}``); without one it is
    kept as written. Kept whole, a worked solution (a GSM8K row that lost its ``####``, a
    solution field read as the gold) or a box that never closes grades every response
    wrong, silently. A gold written over several lines with no marker is such a solution.
    """
    if "####" in text:
        return  # the answer is what follows the last "####" (an empty one is refused by the caller)
    if ("\\boxed" in text or "\\fbox" in text) and last_boxed(text) is None:
        raise ValueError("a \\boxed{} that is not closed or holds nothing; write the answer itself, or close the box")
    if "\\boxed" not in text and "\\fbox" not in text and "\n" in text.strip():
        n = len(text.strip().splitlines())
        raise ValueError(
            f"the answer spans {n} lines, so it looks like a worked solution rather than an answer: end it with "
            "'#### <answer>' (GSM8K's shape) or a \\boxed{<answer>} and read it with answer_from: boxed, or name the "
            "field that holds the answer (answer_key)"
        )


_MISSING = object()
FilterValue = str | int | float | bool | list[str | int | float | bool]
"""A filter's value: one value, or a list meaning "any of these". Typed (not ``Any``) so that the
CLI keeps a quoted YAML ``"Yes"`` as text; a bare ``Yes`` is still YAML's ``true``."""


def field_value(row: Mapping[str, Any], key: str) -> Any:
    """The value at ``key`` in ``row``: a field name, or a dotted path into nested fields.

    A key present as written wins over a dotted reading of it; ``_MISSING`` when absent.

    >>> field_value({"reward_model": {"ground_truth": "7"}}, "reward_model.ground_truth")
    '7'
    >>> field_value({"a.b": 1, "a": {"b": 2}}, "a.b"), field_value({"a": 1}, "a.c") is _MISSING
    (1, True)
    """
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _pick(row: Mapping[str, Any], configured: str | None, candidates: Sequence[str]) -> str | None:
    if configured is not None:
        return configured if field_value(row, configured) is not _MISSING else None
    return next((k for k in candidates if field_value(row, k) is not _MISSING), None)


def question_text(value: Any) -> str:
    """The question of a question field: its text, or the last user message of a chat.

    >>> question_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}])
    '1+1?'

    Raises:
        ValueError: not a non-empty string, not a list of ``{role, content}`` messages, or a
            chat with no (non-empty) user message.
    """
    if isinstance(value, list):
        if not value or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value):
            raise ValueError(f"must be a non-empty string or a list of {{role, content}} chat messages, got {value!r:.80}")
        users = [m["content"] for m in value if m["role"] == "user"]
        if not users:
            raise ValueError(f"is a chat with no user message (roles: {[m['role'] for m in value]})")
        value = users[-1]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r:.60}")
    return value


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
            answer, the same wherever the problem appears) or ``line`` (``line-<n>`` in a
            JSONL file, ``row-<i>`` in a data set, for benchmarks that hold repeated
            questions and no ids).
        split: the split to read from a ``DatasetDict`` folder or a ``hub:`` data set
            (may be left unset when there is only one).
        dataset_config: the configuration (subset) of a ``hub:`` data set.
        data_files: the files of a ``hub:`` data set to read (a path/glob, a list of them,
            or a ``{split: files}`` mapping), as ``datasets.load_dataset`` takes them.
        filters: keep only rows whose field (a name or dotted path) equals the value, or
            is one of the values when a list is given; every filter must hold.
        max_rows: keep only the first ``max_rows`` rows that pass the filters.

    Every key names a field or a dotted path into nested fields (``reward_model.ground_truth``).
    """

    question_key: str | None = None
    answer_key: str | None = None
    id_key: str | None = None
    solution_key: str | None = None
    answer_from: Literal["field", "boxed"] = "field"
    default_id: Literal["content", "line"] = "content"
    split: str | None = None
    dataset_config: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    filters: dict[str, FilterValue] | None = None
    max_rows: int | None = None


def load_problems(
    path: str | Path,
    *,
    question_key: str | None = None,
    answer_key: str | None = None,
    id_key: str | None = None,
    solution_key: str | None = None,
    answer_from: Literal["field", "boxed"] = "field",
    default_id: Literal["content", "line"] = "content",
    split: str | None = None,
    dataset_config: str | None = None,
    data_files: str | list[str] | dict[str, str | list[str]] | None = None,
    filters: Mapping[str, Any] | None = None,
    max_rows: int | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    gold_check: Callable[[Any], None] | None = None,
) -> list[Problem]:
    """Load problems from a JSONL or parquet file, a ``save_to_disk`` folder or ``hub:<name>``.

    Args:
        path: a ``.jsonl`` file (any name not ending ``.parquet``), a ``.parquet`` file, a
            folder written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``, or
            ``hub:<owner>/<name>`` (downloaded by ``datasets.load_dataset``, needs a network
            the first time).
        question_key: field holding the question; by default the first of
            ``question, problem, query, prompt`` present in the row. A list of
            ``{role, content}`` messages counts as its last user message.
        answer_key: field holding the gold; by default ``answer, final_answer, gold,
            expected_answer, reward_model.ground_truth``.
        id_key: field holding a stable id; by default ``id, unique_id, idx, problem_id,
            extra_info.index``, and ``default_id`` when none is present.
        solution_key: optional reference-solution field (``solution`` by default; for
            GSM8K the whole ``answer`` text is kept as the solution; of a list of
            alternative solutions, as OlympiadBench has, the first is kept).
        answer_from: ``field`` (the gold is the answer field) or ``boxed`` (the last
            ``\\boxed{}`` of the answer field; a row without one is an error).
        default_id: ``content`` (hash of question and answer) or ``line`` (``line-<n>``
            in a JSONL file, ``row-<i>`` in a data set).
        split, dataset_config, data_files: which part of a data set (see ``FieldMap``).
        filters: ``{field: value}`` (or ``{field: [values]}``) a row must match to be kept.
        max_rows: keep the first ``max_rows`` rows that pass the filters.
        max_line_bytes: longer JSONL lines are rejected rather than parsed.
        gold_check: called with each row's raw answer value before it is read; a
            ``ValueError`` or ``TypeError`` it raises stops loading at that row (a benchmark
            format's shape, ``evaluation.datasets``).

    Every key may be a dotted path into nested fields.

    Raises:
        ProblemFileError: missing or empty file (or a directory that ``save_to_disk`` did
            not write, a broken or looping link), a line that is not UTF-8 or not a JSON
            object (see ``jsonl``: a lone surrogate or a 4,300-digit number is refused too; a
            byte-order mark is skipped), a data set that ``datasets`` cannot read (or an
            unreachable hub), a missing/ill-typed question or answer, a row without a
            filtered field, no row left after the filters, an over-long line, or a duplicate
            id (naming both lines or rows).
        ValueError: an option out of range (``answer_from``, ``default_id``, ``max_rows``,
            ``filters``).
    """
    fields = FieldMap(question_key, answer_key, id_key, solution_key, answer_from, default_id)
    if answer_from not in ("field", "boxed"):
        raise ValueError(f"answer_from must be 'field' or 'boxed', got {answer_from!r}")
    if default_id not in ("content", "line"):
        raise ValueError(f"default_id must be 'content' or 'line', got {default_id!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be an integer >= 1 (or null for all rows), got {max_rows!r}")
    if filters is not None and (not isinstance(filters, Mapping) or not all(isinstance(k, str) and k for k in filters)):
        raise ValueError(f"filters must map field names to a value or a list of values, got {filters!r}")
    source = str(path)
    is_hub = source.startswith(HUB_PREFIX)
    where = "line" if not is_hub and Path(path).suffix.lower() != ".parquet" and not Path(path).is_dir() else "row"
    if where == "line":
        extra = [k for k, v in (("split", split), ("dataset_config", dataset_config), ("data_files", data_files)) if v is not None]
        if extra:
            raise ProblemFileError(path, None, f"{', '.join(extra)} applies to a data set (a save_to_disk folder or "
                                               f"{HUB_PREFIX}<name>), not to a JSONL file; unset it")
        rows: Iterable[tuple[int, Any]] = _jsonl_rows(Path(path), max_line_bytes)
    else:
        rows = dataset_rows(source, split=split, dataset_config=dataset_config, data_files=data_files)

    def fail(at: int, message: str) -> ProblemFileError:
        return ProblemFileError(path, at, message) if where == "line" else ProblemFileError(path, None, message, row=at)

    problems: list[Problem] = []
    seen: dict[str, int] = {}
    n_read = 0
    for at, row in rows:
        if not isinstance(row, dict):
            raise fail(at, f"expected a JSON object, got {type(row).__name__}")
        n_read += 1
        try:
            if filters and not _passes(row, filters):
                continue
            problem = _row_to_problem(row, fields, f"{where}-{at}", gold_check)
        except _RowError as err:
            raise fail(at, str(err)) from None
        if problem.id in seen:
            raise fail(at, f"duplicate problem id {problem.id!r} (first seen on {where} {seen[problem.id]})")
        seen[problem.id] = at
        problems.append(problem)
        if max_rows is not None and len(problems) >= max_rows:
            break
    if not problems:
        if filters and n_read:
            hint = ("; YAML reads an unquoted Yes/No/true/false as a boolean: quote a text value (\"Yes\")"
                    if any(isinstance(v, bool) for vs in filters.values() for v in (vs if isinstance(vs, list) else [vs]))
                    else "")
            raise ProblemFileError(path, None, f"none of its {n_read} rows matches the filters {dict(filters)}{hint}")
        raise ProblemFileError(path, None, "the file holds no problems" if where == "line" else "the data set holds no rows")
    return problems


def _jsonl_rows(path: Path, max_line_bytes: int) -> Iterable[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file."""
    if not path.is_file():
        raise ProblemFileError(path, None, why_not_a_file(path, "problem file"))
    with path.open("rb") as fh:
        lines = read_lines(fh, max_line_bytes)
        while True:
            try:
                lineno, raw = next(lines)
            except StopIteration:
                return
            except LongLineError as err:
                raise ProblemFileError(path, err.lineno, str(err)) from None
            try:
                row = parse_json_line(raw, lineno)
            except LineError as err:
                raise ProblemFileError(path, lineno, str(err)) from None
            if row is not None:
                yield lineno, row


def _passes(row: Mapping[str, Any], filters: Mapping[str, Any]) -> bool:
    """Whether ``row`` matches every filter (equality, or membership for a list value)."""
    for key, wanted in filters.items():
        value = field_value(row, key)
        if value is _MISSING:
            raise _RowError(f"no field {key!r} for the filter on it; row has {sorted(row)}")
        if isinstance(wanted, list):
            if value not in wanted:
                return False
        elif value != wanted:
            return False
    return True


def _gold_of(value: Any, answer_from: str) -> GoldText:
    if answer_from == "boxed":
        if not isinstance(value, str):
            raise TypeError(f"expected a solution string with a \\boxed{{}} answer, got {type(value).__name__}")
        boxed = last_boxed(value)
        if boxed is None:
            raise ValueError("no \\boxed{} answer in it")
        value = boxed
    return normalize_gold(value)


def _row_to_problem(row: dict[str, Any], fields: FieldMap, position_id: str,
                    gold_check: Callable[[Any], None] | None = None) -> Problem:
    """The problem of one row (``position_id``: its id under ``default_id: line``)."""
    qk = _pick(row, fields.question_key, QUESTION_KEYS)
    if qk is None:
        wanted = repr(fields.question_key) if fields.question_key else " or ".join(map(repr, QUESTION_KEYS))
        raise _RowError(f"no question field ({wanted}); row has {sorted(row)}; name the field with question_key")
    try:
        question = question_text(field_value(row, qk))
    except ValueError as err:
        raise _RowError(f"field {qk!r} {err}") from None
    ak = _pick(row, fields.answer_key, ANSWER_KEYS)
    if ak is None:
        wanted = repr(fields.answer_key) if fields.answer_key else " or ".join(map(repr, ANSWER_KEYS))
        raise _RowError(f"no answer field ({wanted}); row has {sorted(row)}; name the field with answer_key")
    raw_answer = field_value(row, ak)
    try:
        if gold_check is not None:
            gold_check(raw_answer)
        answer = _gold_of(raw_answer, fields.answer_from)
    except (TypeError, ValueError) as err:
        raise _RowError(f"field {ak!r}: {err}") from None
    sk = _pick(row, fields.solution_key, SOLUTION_KEYS)
    solution = field_value(row, sk) if sk else None
    if solution is None and isinstance(raw_answer, str) and "####" in raw_answer:
        solution = raw_answer  # GSM8K keeps its worked solution in the answer field
    if isinstance(solution, list) and solution and all(isinstance(x, str) for x in solution):
        solution = solution[0]  # OlympiadBench lists alternative complete solutions
    if solution is not None and not isinstance(solution, str):
        raise _RowError(f"field {sk!r} must be a string (or a list of strings), got {type(solution).__name__}")
    ik = _pick(row, fields.id_key, ID_KEYS)
    if fields.id_key is not None and ik is None:
        raise _RowError(f"no id field {fields.id_key!r}")
    if ik is not None:
        raw_id = field_value(row, ik)
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id) == "":
            raise _RowError(f"field {ik!r} must be a non-empty string or integer")
        pid = str(raw_id)
    elif fields.default_id == "line":
        pid = position_id
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
