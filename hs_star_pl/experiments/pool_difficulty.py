"""How hard a problem pool is for a policy: pass rates over K samples, and the classes HS-STaR sees.

    python -m hs_star_pl.experiments.pool_difficulty --model checkpoints/tiny/m0 \\
        --problems data/tiny/pool.jsonl --limit 300 --by n_steps

Samples K responses per problem (the round's sampling settings: T=0.7, top_p=0.95 by
default) with ``HFEngine``, grades them with the given verifier and scores them with the given
PRM (the tiny task's defaults: ``ExactMatchVerifier``, ``ArithmeticPRM``), then reports:

* the histogram of per-problem pass rates, ``c / K`` for ``c = 0..K``;
* the classes the round would see from the first ``n_presample`` of those samples (the
  pre-samples) under ``tau_low`` / ``tau_high``, and the classes from all K;
* with ``--by KEY``, both per value of a problem metadata field (e.g. ``n_steps``).

This is what decides whether reallocation has anything to move: with few inliers and
outliers at n_p, HS-STaR spends its budget almost as uniform sampling does. Written as
markdown to stdout and, with ``--out``, as JSON (every problem's verdicts and min-step scores).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hs_star_pl.core.difficulty import DifficultyConfig, count_by_class, estimate_difficulty
from hs_star_pl.core.records import Problem, ScoredRollout

CLASSES = ("inlier", "boundary", "outlier")


def profile(
    problems: Sequence[Problem],
    scored: Sequence[ScoredRollout],
    samples: int,
    n_presample: int,
    difficulty: DifficultyConfig,
    by: str | None = None,
) -> dict[str, Any]:
    """Pass-rate histogram and class counts (at ``n_presample`` and at ``samples``) of scored rollouts.

    ``scored`` holds ``samples`` rollouts per problem with sample indices ``0..samples-1``;
    the pre-samples are indices ``0..n_presample-1``, as in a round.
    """
    ids = [p.id for p in problems]
    presamples = [r for r in scored if r.rollout.sample_index < n_presample]
    at_np, _ = estimate_difficulty(presamples, difficulty, ids)
    at_k, _ = estimate_difficulty(scored, difficulty, ids)
    correct = Counter(r.problem_id for r in scored if r.correct is True)
    histogram = Counter(correct[pid] for pid in ids)
    out: dict[str, Any] = {
        "n_problems": len(ids),
        "samples": samples,
        "n_presample": n_presample,
        "tau_low": difficulty.tau_low,
        "tau_high": difficulty.tau_high,
        "pass_count_histogram": {str(c): histogram.get(c, 0) for c in range(samples + 1)},
        "classes_at_n_presample": count_by_class(at_np),
        "classes_at_samples": count_by_class(at_k),
    }
    if by is not None:
        groups: dict[str, list[str]] = defaultdict(list)
        for p in problems:
            groups[str(p.metadata.get(by, "?"))].append(p.id)
        rows = {}
        for value in sorted(groups, key=lambda v: (len(v), v)):
            members = groups[value]
            rows[value] = {
                "n_problems": len(members),
                "mean_pass_rate": sum(correct[pid] for pid in members) / (samples * len(members)),
                "classes_at_n_presample": count_by_class({pid: at_np[pid] for pid in members}),
            }
        out["by"] = {"key": by, "rows": rows}
    return out


def markdown(report: Mapping[str, Any]) -> str:
    k, n = report["samples"], report["n_problems"]
    lines = [
        f"{n} problems, {k} samples each; classes from the first {report['n_presample']} "
        f"(tau_low={report['tau_low']:g}, tau_high={report['tau_high']:g})",
        "",
        "| correct of " + str(k) + " | " + " | ".join(report["pass_count_histogram"]) + " |",
        "| --- |" + " ---: |" * (k + 1),
        "| problems | " + " | ".join(str(v) for v in report["pass_count_histogram"].values()) + " |",
        "",
        "| classes | " + " | ".join(CLASSES) + " |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, key in ((f"at n_p = {report['n_presample']}", "classes_at_n_presample"), (f"at K = {k}", "classes_at_samples")):
        counts = report[key]
        lines.append(f"| {label} | " + " | ".join(f"{counts[c]} ({100 * counts[c] / max(n, 1):.0f}%)" for c in CLASSES) + " |")
    if "by" in report:
        lines += ["", f"| {report['by']['key']} | problems | mean pass rate | " + " | ".join(f"{c} at n_p" for c in CLASSES) + " |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for value, row in report["by"]["rows"].items():
            counts = row["classes_at_n_presample"]
            lines.append(f"| {value} | {row['n_problems']} | {row['mean_pass_rate']:.3f} | " + " | ".join(str(counts[c]) for c in CLASSES) + " |")
    return "\n".join(lines) + "\n"


def sample_and_score_pool(args: argparse.Namespace, problems: Sequence[Problem]) -> list[ScoredRollout]:
    import torch

    from hs_star_pl.core.protocols import SamplingParams
    from hs_star_pl.core.records import Phase
    from hs_star_pl.core.rounds import sample_and_score
    from hs_star_pl.tensors.chat import tokenizer_chat_renderer
    from hs_star_pl.core.templates import get_template, render_prompt
    from hs_star_pl.engines import HFEngine
    from hs_star_pl.training.module import HSStarModule
    from hs_star_pl.prm import ArithmeticPRM
    from hs_star_pl.verifiers import ExactMatchVerifier

    torch.manual_seed(args.seed)
    tokenizer, model = HSStarModule._load(args.model, None, torch.float32)
    engine = HFEngine(batch_size=args.batch_size).bind(model, tokenizer)
    chat = tokenizer_chat_renderer(tokenizer) if get_template(args.template).chat else None
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
    return sample_and_score(
        problems,
        {p.id: args.samples for p in problems},
        {},
        Phase.PRESAMPLE,
        engine=engine,
        verifier=ExactMatchVerifier(),
        prm=ArithmeticPRM(),
        render_prompt=lambda p: render_prompt(args.template, p.question, chat=chat),
        sampling=params,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face model folder (e.g. checkpoints/tiny/m0)")
    parser.add_argument("--problems", type=Path, required=True, help="a JSONL problem file")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--samples", type=int, default=8, help="K, samples per problem (default: %(default)s)")
    parser.add_argument("--n-presample", type=int, default=3, help="n_p, the pre-samples that classify (default: %(default)s)")
    parser.add_argument("--tau-low", type=float, default=0.25)
    parser.add_argument("--tau-high", type=float, default=0.75)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--template", default="plain", help="a data.template name; chat uses the model's chat template "
                        "and the default system prompt (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--by", default=None, help="a metadata field to break the classes down by (e.g. n_steps)")
    parser.add_argument("--out", type=Path, default=None, help="write the report and every problem's samples as JSON here")
    args = parser.parse_args(argv)
    if not 1 <= args.n_presample <= args.samples:
        parser.error(f"--n-presample must be in 1..--samples ({args.samples}), got {args.n_presample}")

    from hs_star_pl.core.problems import load_problems

    problems = load_problems(args.problems)[: args.limit]
    scored = sample_and_score_pool(args, problems)
    report = profile(problems, scored, args.samples, args.n_presample, DifficultyConfig(tau_low=args.tau_low, tau_high=args.tau_high), args.by)
    print(markdown(report), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report["rollouts"] = [r.to_dict() for r in scored]
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
