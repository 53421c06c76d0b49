"""Held-out evaluation: generate, extract, verify, aggregate; pure over the protocols.

Covered here: greedy (or sampled, ``n_samples`` per problem) accuracy of a policy on a
problem file, with per-problem outputs kept for inspection and a markdown results table
across iterations. The benchmark loaders and the paper's avg@k / pass@k protocol build on
this in the evaluation issue.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hs_star_pl.protocols import AnswerVerifier, GenerationRequest, RolloutEngine, SamplingParams
from hs_star_pl.records import Problem, mean_or_none, utf8_safe


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one policy on one problem set.

    Attributes:
        accuracy: mean over problems of the fraction of correct samples (ungradeable counts
            as wrong here, and is reported separately).
        n_problems: problems evaluated.
        n_samples: samples per problem.
        n_ungradeable: samples the verifier could not grade.
        mean_tokens: mean response length in tokens.
        rows: per problem: id, gold, responses, verdicts, token counts.
    """

    accuracy: float
    n_problems: int
    n_samples: int
    n_ungradeable: int
    mean_tokens: float | None
    rows: list[dict[str, Any]]

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], n_samples: int) -> EvalResult:
        """Aggregate per-problem rows (also rows gathered from several ranks)."""
        return cls(
            accuracy=math.fsum(r["accuracy"] for r in rows) / len(rows) if rows else 0.0,
            n_problems=len(rows),
            n_samples=n_samples,
            n_ungradeable=sum(v is None for r in rows for v in r["correct"]),
            mean_tokens=mean_or_none([float(n) for r in rows for n in r["n_tokens"]]),
            rows=rows,
        )

    def summary(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("accuracy", "n_problems", "n_samples", "n_ungradeable", "mean_tokens")}


def evaluate(
    problems: Sequence[Problem],
    *,
    engine: RolloutEngine,
    verifier: AnswerVerifier,
    render_prompt: Callable[[Problem], str],
    params: SamplingParams,
    n_samples: int = 1,
) -> EvalResult:
    """Sample ``n_samples`` responses per problem and grade them against the gold answers."""
    if n_samples < 1:
        raise ValueError(f"evaluation.n_samples must be >= 1, got {n_samples}")
    outputs = engine.generate([GenerationRequest(p.id, render_prompt(p), n_samples) for p in problems], params)
    texts = [utf8_safe(c.text) for p in problems for c in outputs[p.id]]
    golds = [p.answer for p in problems for _ in outputs[p.id]]
    verdicts = verifier.verify(texts, golds)
    rows, cursor = [], 0
    for p in problems:
        got = outputs[p.id]
        mine = verdicts[cursor : cursor + len(got)]
        cursor += len(got)
        rows.append(
            {
                "problem_id": p.id,
                "gold": p.answer,
                "responses": [utf8_safe(c.text) for c in got],
                "correct": list(mine),
                "n_tokens": [c.n_tokens for c in got],
                "accuracy": sum(v is True for v in mine) / len(mine),
            }
        )
    return EvalResult.from_rows(rows, n_samples)


def results_table(entries: Sequence[dict[str, Any]]) -> str:
    """Markdown table, one row per policy ``M_t`` (entries carry ``policy`` and ``summary``)."""
    lines = [
        "| policy | accuracy | problems | mean tokens | ungradeable | pairs trained on |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in entries:
        s = e["summary"]
        tokens = "" if s["mean_tokens"] is None else f"{s['mean_tokens']:.1f}"
        pairs = "" if e.get("n_pairs") is None else str(e["n_pairs"])
        lines.append(f"| M_{e['policy']} | {s['accuracy']:.3f} | {s['n_problems']} | {tokens} | {s['n_ungradeable']} | {pairs} |")
    return "\n".join(lines) + "\n"
