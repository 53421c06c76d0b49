"""Budget efficiency: DPO pairs per 1000 rollouts and samples per difficulty class, by allocator.

Run: ``python benchmarks/budget_efficiency.py [--quick] [--model-path DIR] [--draws 2]``.

One HS-STaR round (``rounds.run_round``) per allocator on the *same* problems of the tiny
demo's pool, at the same budget K * N, with the demo's components: ``HFEngine`` on M_0,
exact-match answers, ``ArithmeticPRM``, thresholds 0.25/0.75, T=0.7, top_p 0.95:

* ``HierarchicalBudget`` (HS-STaR): n_p pre-samples each, the rest to boundary problems only;
* ``UniformBudget``: K samples per problem (plain iterative DPO at equal budget);
* ``ProportionalBudget``: the rest in proportion to the failure rate (DART-Math style);
* ``ExpectedPairsBudget``: the rest where a Beta posterior expects the most new pairs.

The last two re-sample and train on all three classes, as their comparison overlays
(``configs/tiny/methods/``) do; HS-STaR on the boundary split.

Each response is in at most one pair, so 500 pairs per 1000 rollouts is the ceiling of any
allocator; "% of ceiling" is an allocator's pairs per 1000 rollouts as a share of it.

M_0 is ``--model-path``, else the demo's shipped ``data/tiny/m0`` (trained first, about 4.5
minutes once, when missing). ``--draws`` repeats the comparison on disjoint problem draws and
sums the counts. A problem's class is what its own allocator saw: from the n_p pre-samples
for the two-phase allocators, from all K for the uniform one.
"""

from __future__ import annotations

import dataclasses
import warnings

from bench_common import (
    add_round_args,
    common_parser,
    demo_problems,
    demo_round_config,
    emit,
    load_policy,
    max_new_tokens,
    render_plain,
    round_policy_path,
    setup_torch,
    timed,
)

CLASSES = ("inlier", "boundary", "outlier")


ALL_CLASSES = ("inlier", "boundary", "outlier")


def allocators(samples_per_problem: int, n_presample: int) -> dict:
    """``{name: (allocator, the split it re-samples and trains on)}``."""
    from hs_star_pl.core.budget import ExpectedPairsBudget, HierarchicalBudget, ProportionalBudget, UniformBudget

    k, n_p = samples_per_problem, n_presample
    return {
        "hierarchical (HS-STaR)": (HierarchicalBudget(samples_per_problem=k, n_presample=n_p), ("boundary",)),
        "uniform": (UniformBudget(samples_per_problem=k), ("boundary",)),
        "proportional": (ProportionalBudget(samples_per_problem=k, n_presample=n_p), ALL_CLASSES),
        "expected pairs": (ExpectedPairsBudget(samples_per_problem=k, n_presample=n_p), ALL_CLASSES),
    }


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    add_round_args(parser)
    parser.add_argument("--problems", type=int, help="problems per draw (default 300, the demo's)")
    parser.add_argument("--draws", type=int, help="disjoint problem draws (default 1)")
    parser.add_argument("--samples-per-problem", type=int, default=8, help="K (default 8)")
    parser.add_argument("--n-presample", type=int, default=3, help="n_p (default 3)")
    args = parser.parse_args()
    setup_torch(args.threads)
    warnings.filterwarnings("ignore", message=".*no boundary.*")

    from hs_star_pl.core.rounds import run_round
    from hs_star_pl.engines import HFEngine
    from hs_star_pl.prm import ArithmeticPRM
    from hs_star_pl.verifiers import ExactMatchVerifier

    n_problems = args.problems or (8 if args.quick else 300)
    n_draws = args.draws or 1
    model_path = round_policy_path(args)
    module = load_policy(model_path, args.quick)
    engine = HFEngine(batch_size=args.batch_size, progress=False).bind(module.model, module.tokenizer)
    config = demo_round_config(max_new_tokens(args))
    methods = allocators(args.samples_per_problem, args.n_presample)

    totals = {name: {"rollouts": 0, "pairs": 0, "with_pairs": 0, "budget": 0, "seconds": 0.0, "correct": 0,
                     **{f"samples_{c}": 0 for c in CLASSES}, **{f"problems_{c}": 0 for c in CLASSES}}
              for name in methods}
    for draw in range(n_draws):
        problems = demo_problems(n_problems * n_draws, args.problems_file)[draw * n_problems : (draw + 1) * n_problems]
        for name, (allocator, split) in methods.items():
            split_config = dataclasses.replace(config, selection=dataclasses.replace(config.selection, train_classes=split))
            seconds, result = timed(lambda: run_round(
                problems, engine=engine, verifier=ExactMatchVerifier(), prm=ArithmeticPRM(), allocator=allocator,
                config=split_config, render_prompt=render_plain, iteration=draw, seed=0,
            ))
            t = totals[name]
            summary = result.summary()
            t["rollouts"] += len(result.rollouts)
            t["correct"] += sum(r.correct is True for r in result.rollouts)
            t["pairs"] += summary["n_pairs"]
            t["with_pairs"] += len({p.problem_id for p in result.examples})
            t["budget"] += summary["budget_total"]
            t["seconds"] += seconds
            for c in CLASSES:
                t[f"samples_{c}"] += summary["samples_per_class"][c]
                t[f"problems_{c}"] += summary[f"n_{c}"]

    rows = []
    for name, t in totals.items():
        n = max(t["rollouts"], 1)
        rows.append((
            name, t["rollouts"], t["budget"], t["pairs"], 1000.0 * t["pairs"] / n, 100.0 * t["pairs"] / (n / 2),
            t["with_pairs"],
            *(f"{100.0 * t[f'samples_{c}'] / n:.0f}% ({t[f'problems_{c}']})" for c in CLASSES),
            t["correct"] / n, t["seconds"],
        ))
    notes = [
        f"policy: {model_path or 'untrained tiny model (--quick)'}; {n_problems} problems x {n_draws} draw(s) of "
        f"{args.problems_file or 'the demo pool'}; K={args.samples_per_problem}, n_p={args.n_presample}; "
        f"HFEngine batch {args.batch_size}; max {config.sampling.max_new_tokens} new tokens",
    ]
    base, hier = totals["uniform"], totals["hierarchical (HS-STaR)"]
    if base["pairs"]:
        ratio = (hier["pairs"] / max(hier["rollouts"], 1)) / (base["pairs"] / max(base["rollouts"], 1))
        notes.append(f"hierarchical / uniform, pairs per rollout: {ratio:.2f}x")
    emit("Budget efficiency: pairs per 1000 rollouts at equal budget", notes,
         ["allocator", "rollouts", "budget K*N", "pairs", "pairs / 1000 rollouts", "% of ceiling (500 / 1000)",
          "problems with pairs",
          "samples on inlier (problems)", "on boundary", "on outlier", "rollout accuracy", "round s"],
         rows, args.json)

if __name__ == "__main__":
    main()
