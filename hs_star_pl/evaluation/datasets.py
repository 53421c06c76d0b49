"""Benchmark files in their published shapes, and each benchmark's evaluation protocol.

Covered:

* the seven math benchmarks of the paper as JSONL in the shape they are distributed in (the
  Qwen2.5-Math evaluation layout the HS-STaR reference code reads), each a :class:`BenchmarkFormat`
  that says where the question, gold, id and solution live:

  ============== =================================================================== =========
  format         row                                                                 ids
  ============== =================================================================== =========
  gsm8k          ``question``, ``answer`` = worked solution ending ``#### 1,234``    line
  math500        ``problem``, ``answer``, ``solution``, ``unique_id``                unique_id
  minerva        ``problem``, ``solution`` whose last ``\\boxed{}`` is the gold      idx
  olympiadbench  ``question``, ``final_answer`` = ``["$...$"]``, ``solution`` list   id
  college_math   ``question``, ``answer`` = ``"$...$"``                              line
  aime24         ``problem``, ``answer`` (text or integer), ``solution``             id
  amc23          ``question``, ``answer`` stored as a float (``27.0``)               id
  ============== =================================================================== =========

  plus ``auto``: any file :func:`hs_star_pl.core.problems.load_problems` reads with its default
  field detection (the embedded task's files);
* :class:`BenchmarkConfig`: which file, how many problems, and the protocol: greedy decoding
  (``n_samples: 1``, ``temperature: 0``), or ``n_samples`` responses at a temperature/top_p
  reported as avg@n (mean accuracy over samples) and pass@k.

Not covered: downloading (paths come from config), multiple-choice or proof benchmarks, and
the reference code's answer-string clean-up (units, ``\\text{}``); math-verify grades instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from hs_star_pl.core.problems import FieldMap, FilterValue, ProblemFileError, load_problems
from hs_star_pl.core.records import Problem

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class BenchmarkFormat:
    """How one published benchmark stores a problem.

    Attributes:
        name: the ``format`` key in config.
        fields: where question, gold, id and solution are (``id_key=None`` with
            ``default_id="line"``: the file has no ids, problems are ``line-<n>``).
        example: one row in the published shape (documentation and error messages).
        check_gold: raises ``ValueError``/``TypeError`` for a raw gold value without the
            published shape (a GSM8K answer with no ``####``), which would otherwise be
            read some other way and graded, without a word.
    """

    name: str
    fields: FieldMap
    example: str
    check_gold: Callable[[Any], None] | None = None


def _type_name(value: Any) -> str:
    return type(value).__name__


def _gsm8k_gold(value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"expected a worked solution ending '#### <answer>' (GSM8K's shape), got {_type_name(value)}")
    if "####" not in value:
        raise ValueError("no '#### <answer>' at the end of the worked solution (GSM8K's shape)")
    if not value.rsplit("####", 1)[1].strip():
        raise ValueError("nothing after '####' (GSM8K's shape: a worked solution ending '#### <answer>')")


def _text_gold(shape: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not isinstance(value, str):
            raise TypeError(f"expected the answer as text ({shape}), got {_type_name(value)}")
    return check


def _olympiad_gold(value: Any) -> None:
    shape = "expected a list of answers (OlympiadBench's shape: [\"$4$\"])"
    if not isinstance(value, list):
        raise TypeError(f"{shape}, got {_type_name(value)}")
    odd = next((v for v in value if not isinstance(v, str)), None)
    if odd is not None:
        raise TypeError(f"{shape}, got a {_type_name(odd)} in it")


_AIME = re.compile(r"^\d{1,3}$", re.ASCII)


def _aime_gold(value: Any) -> None:
    text = value.strip() if isinstance(value, str) else value
    ok = (_AIME.match(text) is not None if isinstance(text, str)
          else isinstance(text, int) and not isinstance(text, bool) and 0 <= text <= 999)
    if not ok:
        raise ValueError(f"an AIME answer is an integer from 0 to 999 (written as text or a number), got {value!r}")


def _number_gold(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected the answer as a number (AMC23's shape: 27.0), got {_type_name(value)}")


FORMATS: dict[str, BenchmarkFormat] = {
    f.name: f
    for f in (
        BenchmarkFormat("gsm8k", FieldMap("question", "answer", None, None, default_id="line"),
                        '{"question": "...", "answer": "... so she has 18 eggs.\\n#### 18"}', _gsm8k_gold),
        BenchmarkFormat("math500", FieldMap("problem", "answer", "unique_id", "solution"),
                        '{"problem": "...", "solution": "...", "answer": "\\\\frac{14}{3}", "subject": "...", '
                        '"level": 3, "unique_id": "test/precalculus/807.json"}', _text_gold("MATH500's shape")),
        BenchmarkFormat("minerva", FieldMap("problem", "solution", "idx", "solution", answer_from="boxed"),
                        '{"problem": "...", "solution": "... =\\\\boxed{1.6} \\\\mathrm{~cm}", "type": "...", "idx": 0}'),
        BenchmarkFormat("olympiadbench", FieldMap("question", "final_answer", "id", "solution"),
                        '{"id": 1606, "question": "...", "solution": ["..."], "final_answer": ["$\\\\frac{1}{2}$"], '
                        '"is_multiple_answer": false, "unit": null, "answer_type": "Numerical", ...}', _olympiad_gold),
        BenchmarkFormat("college_math", FieldMap("question", "answer", None, None, default_id="line"),
                        '{"data_source": "college_math.algebra", "question_number": "exercise.8.3.20", '
                        '"question": "...", "answer": "$-3 \\\\sqrt{2}$", "license": "...", "data_topic": "..."}',
                        _text_gold('College Math\'s shape: "$6$"')),
        BenchmarkFormat("aime24", FieldMap("problem", "answer", "id", "solution"),
                        '{"id": 60, "problem": "...", "solution": "...", "answer": "204", "url": "..."}', _aime_gold),
        BenchmarkFormat("amc23", FieldMap("question", "answer", "id", None),
                        '{"id": 0, "question": "...", "answer": 27.0, "url": "..."}', _number_gold),
        BenchmarkFormat("auto", FieldMap(), '{"id": "...", "question": "...", "answer": "...", "solution": "..."}'),
    )
}


def get_format(name: str) -> BenchmarkFormat:
    """The format called ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark format {name!r}; valid formats are {sorted(FORMATS)}") from None


@dataclass(frozen=True)
class BenchmarkConfig:
    """One benchmark and its evaluation protocol (an item of ``evaluation.benchmarks``).

    Attributes:
        name: label of the benchmark: folder under ``eval/``, table column, metric keys.
        path: the problems in ``format``'s shape: a JSONL or parquet file, a folder written
            by ``Dataset.save_to_disk`` or ``hub:<owner>/<name>`` (see ``core.problems``).
        format: a key of :data:`FORMATS` (``gsm8k``, ``math500``, ``minerva``,
            ``olympiadbench``, ``college_math``, ``aime24``, ``amc23``) or ``auto``.
        limit: evaluate only the first ``limit`` problems of the file (after ``filters``).
        n_samples: responses per problem. 1 with ``temperature: 0`` is greedy decoding
            (the paper's protocol for GSM8K, MATH500, Minerva, OlympiadBench, College Math);
            the paper samples 32 at T=0.6, top_p=0.95 for AIME24 and AMC23.
        temperature: sampling temperature (0: greedy).
        top_p: nucleus sampling mass.
        pass_k: the k of the pass@k values to report (each at most ``n_samples``); avg@n,
            the mean accuracy over samples, is always reported.
        max_new_tokens: generation cap for this benchmark; ``None`` uses
            ``evaluation.max_new_tokens``.
        seed: sampling seed; each problem's samples are seeded from it and the problem id,
            so they do not depend on batching or on the number of processes.
        split: the split of a ``DatasetDict`` folder or a ``hub:`` data set.
        dataset_config: the configuration (subset) of a ``hub:`` data set.
        data_files: the files of a ``hub:`` data set to read.
        filters: ``{field: value}`` (or ``{field: [values]}``) a row must match to be
            evaluated; fields may be dotted paths.
    """

    name: str
    path: str
    format: str = "auto"
    limit: int | None = None
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    pass_k: tuple[int, ...] = field(default_factory=tuple)
    max_new_tokens: int | None = None
    seed: int = 0
    split: str | None = None
    dataset_config: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    filters: dict[str, FilterValue] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "pass_k", tuple(self.pass_k))
        key = f"evaluation.benchmarks[{self.name!r}]"
        errors = []
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            errors.append(f"evaluation.benchmarks: name {self.name!r} must be letters, digits, '_', '.' or '-' "
                          "(it names a folder)")
        if self.format not in FORMATS:
            errors.append(f"{key}.format must be one of {sorted(FORMATS)}, got {self.format!r}")
        if self.limit is not None and self.limit < 1:
            errors.append(f"{key}.limit must be >= 1 (or null for all), got {self.limit}")
        if self.n_samples < 1:
            errors.append(f"{key}.n_samples must be >= 1, got {self.n_samples}")
        if self.temperature < 0:
            errors.append(f"{key}.temperature must be >= 0, got {self.temperature}")
        elif self.n_samples > 1 and self.temperature == 0:
            errors.append(f"{key}: n_samples={self.n_samples} at temperature 0 gives identical greedy samples; "
                          "set temperature > 0 or n_samples: 1")
        if not 0 < self.top_p <= 1:
            errors.append(f"{key}.top_p must be in (0, 1], got {self.top_p}")
        bad_k = [k for k in self.pass_k if not 1 <= k <= self.n_samples]
        if bad_k or len(set(self.pass_k)) != len(self.pass_k):
            errors.append(f"{key}.pass_k must be distinct values in 1..n_samples ({self.n_samples}), got {list(self.pass_k)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            errors.append(f"{key}.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def metric(self) -> str:
        """Name of the headline number: ``acc`` for one response per problem, else ``avg@n``."""
        return "acc" if self.n_samples == 1 else f"avg@{self.n_samples}"

    def with_sample_cap(self, max_samples: int | None) -> BenchmarkConfig:
        """This protocol with at most ``max_samples`` responses per problem (pass@k above it dropped)."""
        if max_samples is None or self.n_samples <= max_samples:
            return self
        return replace(self, n_samples=max_samples, pass_k=tuple(k for k in self.pass_k if k <= max_samples))

    def to_dict(self) -> dict:
        return {
            "name": self.name, "path": self.path, "format": self.format, "limit": self.limit,
            "n_samples": self.n_samples, "temperature": self.temperature, "top_p": self.top_p,
            "pass_k": list(self.pass_k), "max_new_tokens": self.max_new_tokens, "seed": self.seed,
            "split": self.split, "dataset_config": self.dataset_config, "data_files": self.data_files,
            "filters": self.filters,
        }


def load_benchmark(config: BenchmarkConfig, max_problems: int | None = None) -> list[Problem]:
    """The problems of ``config`` (its first ``limit``, and at most ``max_problems``).

    Raises:
        ProblemFileError: the file is missing or a row does not have the format's shape;
            the message names the file, the line and the ``evaluation.benchmarks`` entry.
    """
    fmt = get_format(config.format)
    f = fmt.fields
    caps = [n for n in (config.limit, max_problems) if n is not None]
    where = f"evaluation.benchmarks[{config.name!r}]"
    try:
        return load_problems(
            config.path, question_key=f.question_key, answer_key=f.answer_key, id_key=f.id_key,
            solution_key=f.solution_key, answer_from=f.answer_from, default_id=f.default_id,
            split=config.split, dataset_config=config.dataset_config, data_files=config.data_files,
            filters=config.filters, max_rows=min(caps) if caps else None, gold_check=fmt.check_gold,
        )
    except ProblemFileError as err:
        hint = (f" ({where}.path)" if err.line is None and err.row is None
                else f" ({where} has format {config.format!r}; its rows look like {fmt.example})")
        raise ProblemFileError(err.path, err.line, err.message + hint, row=err.row) from None
    except ValueError as err:  # an option out of range (filters)
        raise ValueError(f"{where}: {err}") from None

