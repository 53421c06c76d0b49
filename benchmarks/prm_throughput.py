"""PRM scoring throughput on CPU for the tiny Skywork and Qwen2.5-Math formats, and the rule PRM.

Run: ``python benchmarks/prm_throughput.py [--quick] [--batch-size 16] [--repeats 3]``.

Builds tiny random PRMs in a temporary folder (no downloads), then scores synthetic
responses of 2-8 steps three ways:

* ``score`` batched (length-sorted, padded, ``--batch-size``);
* ``score`` one response per forward pass;
* *through the round*: ``rounds.score_rollouts``, which is what a round calls: the answer
  check (exact match), splitting each response into steps, then the PRM, batched;
* *a round with repeated texts*: the same, on a round-shaped workload in which
  ``--repeat-share`` of the rollouts (default 0.38, the share measured in the tiny demo's
  HS-STaR rounds, docs/performance.md section 8) repeat a text already sampled for their
  problem, scored once per distinct text as a round does, against the same rollouts with each
  copy given its own problem (every rollout scored: the round before texts were shared).

The three ways alternate for ``--repeats`` rounds; medians are reported.

Not a test: numbers depend on the machine and say nothing about real 1.5B-7B PRMs.
"""

from __future__ import annotations

import random
import tempfile

from bench_common import common_parser, emit, interleaved, median, setup_torch


def make_items(n: int, seed: int = 0) -> list[tuple[str, list[str], int]]:
    """``(question, steps, answer)`` of ``n`` synthetic addition chains."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        value = rng.randint(1, 30)
        question, steps = f"Start with {value}.", []
        for k in range(rng.randint(2, 8)):
            b = rng.randint(1, 9)
            question += f" Add {b}."
            steps.append(f"Step {k + 1}: {value} + {b} = {value + b}")
            value += b
        steps.append(f"The answer is \\boxed{{{value}}}.")
        out.append((question + " What is the result?", steps, value))
    return out


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, help="timed rounds of every variant (default 3)")
    parser.add_argument("--repeat-share", type=float, default=0.38,
                        help="share of a round's rollouts that repeat a text of their problem (default 0.38)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    setup_torch(args.threads)
    from hs_star_pl.core.protocols import StepScoringRequest
    from hs_star_pl.core.records import Phase, Problem, Rollout
    from hs_star_pl.core.rounds import score_rollouts
    from hs_star_pl.prm import ArithmeticPRM, QwenMathPRM, SkyworkPRM
    from hs_star_pl.prm.hf import build_tiny_prm_dir
    from hs_star_pl.verifiers import ExactMatchVerifier

    n = 16 if args.quick else 256
    config = dict(hidden_size=64, num_hidden_layers=2) if args.quick else dict(hidden_size=128, num_hidden_layers=4)
    items = make_items(n)
    requests = [StepScoringRequest(q, tuple(steps)) for q, steps, _ in items]
    problems = {f"p{i}": Problem(f"p{i}", q, str(answer)) for i, (q, _, answer) in enumerate(items)}
    rollouts = [Rollout(f"p{i}", 0, Phase.PRESAMPLE, "\n\n".join(steps)) for i, (_, steps, _) in enumerate(items)]
    n_steps = sum(len(r.steps) for r in requests)
    # a round: n rollouts of which a share repeat an earlier rollout's text for the same problem
    n_first = round(n * (1 - args.repeat_share))
    copies = [random.Random(1).randrange(n_first) for _ in range(n - n_first)]
    round_rollouts = [Rollout(f"p{i}", 0, Phase.PRESAMPLE, "\n\n".join(items[i][1])) for i in range(n_first)]
    round_rollouts += [Rollout(f"p{i}", 1 + k, Phase.RESAMPLE, round_rollouts[i].text) for k, i in enumerate(copies)]
    # the same work with nothing shared: each copy is a problem of its own
    unshared = [Rollout(f"{r.problem_id}#{k}", r.sample_index, r.phase, r.text) for k, r in enumerate(round_rollouts)]
    unshared_problems = {r.problem_id: problems[r.problem_id.split("#")[0]] for r in unshared}

    rows = []

    def add(name: str, how: str, seconds: float, base: float) -> None:
        rows.append((name, how, seconds, n / seconds, n_steps / seconds, f"{base / seconds:.2f}x"))

    def timed_medians(variants: dict) -> dict[str, float]:
        """Median seconds of each variant over ``repeats`` alternating rounds."""
        return {name: median([t for t, _ in runs]) for name, runs in interleaved(variants, repeats).items()}

    rule = ArithmeticPRM()
    t = timed_medians({
        "score": lambda: rule.score(requests),
        "round": lambda: score_rollouts(rollouts, problems, ExactMatchVerifier(), rule),
    })
    add("ArithmeticPRM", "score", t["score"], t["score"])
    add("ArithmeticPRM", "through the round", t["round"], t["score"])
    with tempfile.TemporaryDirectory() as tmp:
        for kind, cls in (("skywork", SkyworkPRM), ("qwen", QwenMathPRM)):
            path = build_tiny_prm_dir(f"{tmp}/{kind}", kind, **config)
            prm = cls(str(path), device="cpu", batch_size=args.batch_size, progress=False)
            n_params = sum(p.numel() for p in prm.model.parameters())
            prm.score(requests)  # warm-up (first calls pay one-off allocation costs)
            prm.score(requests[:4])
            name = f"{cls.__name__} ({n_params / 1e6:.2f}M)"
            t = timed_medians({
                "batched": lambda: prm.score(requests),
                "one": lambda: [prm.score([r]) for r in requests],
                "round": lambda: score_rollouts(rollouts, problems, ExactMatchVerifier(), prm),
            })
            add(name, f"score, batch {args.batch_size}", t["batched"], t["batched"])
            add(name, "score, one at a time", t["one"], t["batched"])
            add(name, "through the round", t["round"], t["batched"])
            t = timed_medians({
                "shared": lambda: score_rollouts(round_rollouts, problems, ExactMatchVerifier(), prm),
                "each": lambda: score_rollouts(unshared, unshared_problems, ExactMatchVerifier(), prm),
            })
            add(name, f"a round, {args.repeat_share:.0%} repeated texts, each scored (before)", t["each"], t["each"])
            add(name, f"a round, {args.repeat_share:.0%} repeated texts, scored once", t["shared"], t["each"])

    emit("PRM scoring throughput", [f"{n} responses, {n_steps} steps; tiny random PRMs; medians of {repeats} interleaved runs",
                                    f"round rows: {n} rollouts, {n_first} distinct texts; their last column is against the "
                                    f"round that scores every rollout"],
         ["scorer", "how", "seconds", "responses/s", "steps/s", "vs batched score"], rows, args.json)


if __name__ == "__main__":
    main()
