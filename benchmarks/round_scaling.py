"""Scaling: wall time of one HS-STaR iteration by phase, as the problems N and the budget K grow.

Run: ``python benchmarks/round_scaling.py [--quick] [--model-path DIR] [--problems 64 256 1024] [--k 4 8 16]``.

One iteration is what ``SelfTrainingCallback`` does between epochs, driven directly: the
round (``rounds.run_round``: generate, verify, PRM, the decisions in between), the pairs'
reference log-probs under M_t (``HSStarModule.compute_reference_logps``), then one DPO epoch
(``Trainer.fit``, batch 16 as in the demo). Each configuration starts from the same M_0
(``--model-path``, else the demo's shipped ``data/tiny/m0``, trained once when missing), with the
demo's components (HFEngine batch 128, exact match, ``ArithmeticPRM``, K/n_p = K/3).

Two sweeps: N over ``--problems`` at the smallest K, and K over ``--k`` at the smallest N.
Every phase's seconds and share are printed, and which phase dominates.
"""

from __future__ import annotations

import logging
import tempfile
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

PHASES = ("generate", "verify", "prm", "decide", "ref_logps", "train")


def one_iteration(args, model_path, n_problems: int, k: int, out_dir: str) -> dict:
    """Seconds per phase of one iteration from M_0, plus the counts behind them."""
    import lightning as L

    from hs_star_pl.core.budget import HierarchicalBudget
    from hs_star_pl.core.rounds import run_round
    from hs_star_pl.training.data import MathDataModule
    from hs_star_pl.engines import HFEngine
    from hs_star_pl.prm import ArithmeticPRM
    from hs_star_pl.verifiers import ExactMatchVerifier

    module = load_policy(model_path, args.quick)
    engine = HFEngine(batch_size=args.batch_size, progress=False).bind(module.model, module.tokenizer)
    problems = demo_problems(n_problems, args.problems_file)
    max_length = 384
    round_s, result = timed(lambda: run_round(
        problems, engine=engine, verifier=ExactMatchVerifier(), prm=ArithmeticPRM(),
        allocator=HierarchicalBudget(samples_per_problem=k, n_presample=min(3, k)),
        config=demo_round_config(max_new_tokens(args)), render_prompt=render_plain, seed=0,
    ))
    s = result.seconds
    phases = {
        "generate": s.get("presample_generate", 0.0) + s.get("resample_generate", 0.0),
        "verify": s.get("presample_verify", 0.0) + s.get("resample_verify", 0.0),
        "prm": s.get("presample_prm", 0.0) + s.get("resample_prm", 0.0),
    }
    phases["decide"] = round_s - sum(phases.values())  # gold checks, difficulty, allocation, selection, records
    pairs = result.examples
    phases["ref_logps"], pairs = timed(lambda: module.compute_reference_logps(pairs, max_length=max_length, batch_size=16))
    phases["train"], train_steps = 0.0, 0
    if pairs:
        data = MathDataModule(template="plain", max_length=max_length, batch_size=16)
        data.set_train_examples(pairs)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=1, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=out_dir,
        )
        phases["train"], _ = timed(lambda: trainer.fit(module, datamodule=data))
        train_steps = trainer.global_step
    summary = result.summary()
    return {
        "phases": phases,
        "rollouts": len(result.rollouts),
        "tokens": sum(r.rollout.n_tokens for r in result.rollouts),
        "pairs": len(pairs),
        "train_steps": train_steps,
        "boundary": summary["n_boundary"],
    }


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    add_round_args(parser)
    parser.add_argument("--problems", type=int, nargs="+", help="N values (default 64 256 1024)")
    parser.add_argument("--k", type=int, nargs="+", help="K values (default 4 8 16)")
    args = parser.parse_args()
    setup_torch(args.threads)
    warnings.filterwarnings("ignore", module="lightning")
    import lightning  # noqa: F401  (its import sets its loggers to INFO; quieten them after)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    ns = sorted(args.problems or ([4, 8] if args.quick else [64, 256, 1024]))
    ks = sorted(args.k or ([2, 4] if args.quick else [4, 8, 16]))
    model_path = round_policy_path(args)
    grid = [(n, ks[0]) for n in ns] + [(ns[0], k) for k in ks[1:]]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, k in grid:
            results[(n, k)] = one_iteration(args, model_path, n, k, f"{tmp}/{n}_{k}")

    rows = []
    base_total = sum(results[grid[0]]["phases"].values())
    for (n, k), r in results.items():
        total = sum(r["phases"].values())
        dominant = max(PHASES, key=lambda p: r["phases"][p])
        rows.append((
            n, k, r["rollouts"], r["tokens"], r["pairs"], r["train_steps"],
            *(f"{r['phases'][p]:.1f} ({100 * r['phases'][p] / total:.0f}%)" for p in PHASES),
            total, total / base_total, dominant,
        ))
    notes = [
        f"policy: {model_path or 'untrained tiny model (--quick)'}; hierarchical budget, n_p = min(3, K); "
        f"HFEngine batch {args.batch_size}; max {max_new_tokens(args)} new tokens; DPO batch 16, one epoch",
    ]
    emit("Scaling: one iteration's wall time by phase", notes,
         ["N", "K", "rollouts", "tokens", "pairs", "train steps", *(f"{p} s (%)" for p in PHASES), "total s", "vs first", "dominant"],
         rows, args.json)

if __name__ == "__main__":
    main()
