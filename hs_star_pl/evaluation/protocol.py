"""Evaluation: generate, extract, verify, aggregate, tabulate; pure over the protocols.

Covered here:

* :class:`EvalBatch`: a chunk of one benchmark's problems with its rendered prompts and
  sampling protocol: what the Lightning test loop feeds ``HSStarModule.test_step`` and what
  the in-training evaluation hands the same method, so both generate identically;
* :func:`grade`: per-problem rows (every response, its extracted answer, its verdict, token
  count) from an engine's completions;
* the protocol's arithmetic: accuracy (greedy), avg@n (mean accuracy over ``n`` samples,
  computed per problem, then averaged over problems), unbiased pass@k (Chen et al., 2021,
  "Evaluating Large Language Models Trained on Code", eq. 1), mean response length. Rows
  reduce to *sums* (:func:`row_sums`) so that ranks can add theirs (torchmetrics does, in
  ``hs_star_pl.training.benchmark_metric``) and :func:`summarize` turns sums into the reported numbers;
* one results entry per evaluated policy (the unweighted average over benchmarks, as the
  paper reports) and the markdown table with one row per policy.

Ungradeable responses (verifier timeout, unparseable gold) count as wrong in the accuracy
and are reported separately; a response with no final answer is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hs_star_pl.core.answers import extract_answer
from hs_star_pl.core.protocols import AnswerVerifier, Completion, GenerationRequest, RolloutEngine, SamplingParams
from hs_star_pl.core.records import Problem, utf8_safe

SUM_KEYS = ("problems", "samples", "correct", "ungradeable", "truncated", "tokens", "accuracy")
"""What each row adds up to (besides one ``pass@k`` per reported k)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` of ``n`` samples right: ``1 - C(n-c, k) / C(n, k)``.

    The probability that ``k`` samples drawn without replacement from the ``n`` include a
    right one (Chen et al., 2021, eq. 1). ``pass@1 = c / n``; ``pass@n = 1`` if ``c > 0``.

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 2), pass_at_k(4, 0, 4), pass_at_k(4, 3, 2)
    (0.25, 0.5, 0.0, 1.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(frozen=True)
class EvalBatch:
    """A chunk of one benchmark: problems, their rendered prompts, and how to sample them.

    Attributes:
        benchmark: the benchmark's name.
        problems: the chunk's problems.
        prompts: ``problems[i]`` rendered with the training template.
        n_samples: responses per problem.
        params: sampling settings (temperature 0: greedy).
        batch_size: sequences per engine call.
        engine: the engine that generates this batch, already pointed at the policy being
            evaluated (``evaluation.engine``); ``None``: the policy in memory, through
            ``HFEngine`` (``HSStarModule.generate_for_eval``).
    """

    benchmark: str
    problems: tuple[Problem, ...]
    prompts: tuple[str, ...]
    n_samples: int
    params: SamplingParams
    batch_size: int
    engine: Any = field(default=None, compare=False, repr=False)

    @property
    def seed_scope(self) -> str:
        """``request`` when sampling: each problem's samples are seeded from (seed, problem id),
        so they are the same however problems are chunked or sharded over ranks. Greedy
        decoding needs no seed and batches prompts together (``batch``)."""
        return "batch" if self.params.temperature == 0 else "request"

    def requests(self) -> list[GenerationRequest]:
        return [GenerationRequest(p.id, prompt, self.n_samples) for p, prompt in zip(self.problems, self.prompts)]


def make_batch(
    benchmark: str,
    problems: Sequence[Problem],
    *,
    render_prompt: Callable[[Problem], str],
    params: SamplingParams,
    n_samples: int = 1,
    batch_size: int = 128,
    engine: Any = None,
) -> EvalBatch:
    """An :class:`EvalBatch` of ``problems`` (prompts rendered here)."""
    if n_samples < 1:
        raise ValueError(f"evaluation.n_samples must be >= 1, got {n_samples}")
    return EvalBatch(benchmark, tuple(problems), tuple(render_prompt(p) for p in problems), n_samples, params,
                     batch_size, engine)


def grade(batch: EvalBatch, outputs: Mapping[str, Sequence[Completion]], verifier: AnswerVerifier,
          pass_k: Sequence[int] = ()) -> list[dict[str, Any]]:
    """One row per problem: question, gold, responses, extracted answers, verdicts, tokens.

    ``answers`` are what the verifier graded: its own ``extract_answer`` method when it has
    one (both built-in verifiers do, by their ``extraction`` mode), else the strict
    :func:`~hs_star_pl.core.answers.extract_answer`.

    Raises:
        RuntimeError: the engine returned a different number of completions than asked for.
    """
    texts, golds = [], []
    for p in batch.problems:
        got = outputs.get(p.id, [])
        if len(got) != batch.n_samples:
            raise RuntimeError(f"{batch.benchmark}/{p.id}: the engine returned {len(got)} responses, expected {batch.n_samples}")
        texts += [utf8_safe(c.text) for c in got]
        golds += [p.answer] * len(got)
    verdicts = verifier.verify(texts, golds)
    extract = getattr(verifier, "extract_answer", extract_answer)
    rows = []
    for i, p in enumerate(batch.problems):
        got = outputs[p.id]
        mine = list(verdicts[i * batch.n_samples : (i + 1) * batch.n_samples])
        n_correct = sum(v is True for v in mine)
        rows.append(
            {
                "problem_id": p.id,
                "question": p.question,
                "gold": p.answer,
                "responses": [utf8_safe(c.text) for c in got],
                "answers": [extract(utf8_safe(c.text)) for c in got],
                "correct": mine,
                "n_tokens": [c.n_tokens for c in got],
                "finish_reasons": [c.finish_reason for c in got],
                "n_correct": n_correct,
                "accuracy": n_correct / len(mine),
                "pass_at_k": {f"pass@{k}": pass_at_k(len(mine), n_correct, k) for k in pass_k},
            }
        )
    return rows


def row_sums(row: Mapping[str, Any], pass_k: Sequence[int] = ()) -> dict[str, float]:
    """What one problem adds to a benchmark's totals (keys :data:`SUM_KEYS` and ``pass@k``)."""
    verdicts = row["correct"]
    sums = {
        "problems": 1.0,
        "samples": float(len(verdicts)),
        "correct": float(sum(v is True for v in verdicts)),
        "ungradeable": float(sum(v is None for v in verdicts)),
        "truncated": float(sum(r == "length" for r in row.get("finish_reasons", ()))),
        "tokens": float(sum(row["n_tokens"])),
        "accuracy": float(row["accuracy"]),
    }
    for k in pass_k:
        sums[f"pass@{k}"] = pass_at_k(len(verdicts), int(sums["correct"]), k)
    return sums


def add_sums(rows: Sequence[Mapping[str, Any]], pass_k: Sequence[int] = ()) -> dict[str, float]:
    keys = [*SUM_KEYS, *(f"pass@{k}" for k in pass_k)]
    parts = [row_sums(r, pass_k) for r in rows]
    return {key: math.fsum(p[key] for p in parts) for key in keys}


def summarize(sums: Mapping[str, float], n_samples: int, pass_k: Sequence[int] = ()) -> dict[str, Any]:
    """The reported numbers of one benchmark from its totals.

    ``accuracy`` is the mean over problems of each problem's fraction of right samples: the
    greedy accuracy for one sample, avg@n for ``n``. ``mean_tokens`` is per response.
    """
    n_problems = int(round(sums["problems"]))
    n_responses = sums["samples"]
    return {
        "metric": "acc" if n_samples == 1 else f"avg@{n_samples}",
        "accuracy": sums["accuracy"] / n_problems if n_problems else 0.0,
        "pass_at_k": {f"pass@{k}": (sums[f"pass@{k}"] / n_problems if n_problems else 0.0) for k in pass_k},
        "n_problems": n_problems,
        "n_samples": n_samples,
        "mean_tokens": sums["tokens"] / n_responses if n_responses else None,
        "n_ungradeable": int(round(sums["ungradeable"])),
        "n_truncated": int(round(sums["truncated"])),
    }


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one policy on one problem set.

    Attributes:
        accuracy: mean over problems of the fraction of right samples (greedy accuracy, or
            avg@n); ungradeable counts as wrong here and is reported separately.
        n_problems: problems evaluated.
        n_samples: samples per problem.
        n_ungradeable: samples the verifier could not grade.
        mean_tokens: mean response length in tokens.
        rows: per problem: id, question, gold, responses, answers, verdicts, token counts.
        pass_at_k: ``{"pass@k": value}`` for the requested k.
        n_truncated: responses cut at ``max_new_tokens``.
    """

    accuracy: float
    n_problems: int
    n_samples: int
    n_ungradeable: int
    mean_tokens: float | None
    rows: list[dict[str, Any]]
    pass_at_k: dict[str, float]
    n_truncated: int = 0

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], n_samples: int, pass_k: Sequence[int] = ()) -> EvalResult:
        """Aggregate per-problem rows (also rows gathered from several ranks)."""
        s = summarize(add_sums(rows, pass_k), n_samples, pass_k)
        return cls(s["accuracy"], s["n_problems"], n_samples, s["n_ungradeable"], s["mean_tokens"], rows,
                   s["pass_at_k"], s["n_truncated"])

    def summary(self) -> dict[str, Any]:
        return {
            "metric": "acc" if self.n_samples == 1 else f"avg@{self.n_samples}",
            **{k: getattr(self, k) for k in ("accuracy", "pass_at_k", "n_problems", "n_samples", "mean_tokens",
                                              "n_ungradeable", "n_truncated")},
        }


def evaluate(
    problems: Sequence[Problem],
    *,
    engine: RolloutEngine,
    verifier: AnswerVerifier,
    render_prompt: Callable[[Problem], str],
    params: SamplingParams,
    n_samples: int = 1,
    pass_k: Sequence[int] = (),
    name: str = "eval",
) -> EvalResult:
    """Sample ``n_samples`` responses per problem in one engine call and grade them."""
    batch = make_batch(name, problems, render_prompt=render_prompt, params=params, n_samples=n_samples)
    rows = grade(batch, engine.generate(batch.requests(), params), verifier, pass_k) if problems else []
    return EvalResult.from_rows(rows, n_samples, pass_k)


# ---------------------------------------------------------------------------------------
# Results of a policy over several benchmarks, and the table
# ---------------------------------------------------------------------------------------


def policy_entry(label: str, summaries: Mapping[str, Mapping[str, Any]], **extra: Any) -> dict[str, Any]:
    """One policy's results: per benchmark, and the unweighted averages over benchmarks.

    ``average`` is the plain mean of the benchmarks' headline numbers (greedy accuracy or
    avg@n), as the paper averages its seven benchmarks; ``mean_tokens`` the plain mean of
    their mean response lengths.
    """
    values = [s["accuracy"] for s in summaries.values()]
    tokens = [s["mean_tokens"] for s in summaries.values() if s.get("mean_tokens") is not None]
    return {
        "label": label,
        **extra,
        "benchmarks": {name: dict(s) for name, s in summaries.items()},
        "average": math.fsum(values) / len(values) if values else None,
        "mean_tokens": math.fsum(tokens) / len(tokens) if tokens else None,
    }


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def results_table(entries: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per policy (headline numbers in %), then one detail row per benchmark.

    A column's header names the metric when every row used the same one (``aime24 avg@32``);
    otherwise each cell does.
    """
    names: list[str] = []
    for e in entries:
        names += [n for n in e["benchmarks"] if n not in names]
    metrics = {n: {e["benchmarks"][n]["metric"] for e in entries if n in e["benchmarks"]} for n in names}
    header = [n if metrics[n] == {"acc"} else f"{n} {next(iter(metrics[n]))}" if len(metrics[n]) == 1 else n for n in names]
    lines = [
        "| policy | " + " | ".join(header) + " | average | mean tokens | pairs trained on |",
        "| --- |" + " ---: |" * (len(names) + 3),
    ]
    for e in entries:
        cells = []
        for n in names:
            s = e["benchmarks"].get(n)
            if s is None:
                cells.append("")
            else:
                cells.append(_pct(s["accuracy"]) + (f" ({s['metric']})" if len(metrics[n]) > 1 else ""))
        tokens = "" if e.get("mean_tokens") is None else f"{e['mean_tokens']:.1f}"
        pairs = "" if e.get("n_pairs") is None else str(e["n_pairs"])
        lines.append(f"| {e['label']} | " + " | ".join(cells) + f" | {_pct(e.get('average'))} | {tokens} | {pairs} |")
    details = [
        "| policy | benchmark | problems | samples | metric | value | pass@k | mean tokens | truncated | ungradeable |",
        "| --- | --- | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for e in entries:
        for n, s in e["benchmarks"].items():
            passes = ", ".join(f"{k} {_pct(v)}" for k, v in s.get("pass_at_k", {}).items())
            tokens = "" if s.get("mean_tokens") is None else f"{s['mean_tokens']:.1f}"
            details.append(f"| {e['label']} | {n} | {s['n_problems']} | {s['n_samples']} | {s['metric']} | "
                           f"{_pct(s['accuracy'])} | {passes} | {tokens} | {s.get('n_truncated', 0)} | {s['n_ungradeable']} |")
    return "\n".join(lines) + "\n\nPer benchmark:\n\n" + "\n".join(details) + "\n"
