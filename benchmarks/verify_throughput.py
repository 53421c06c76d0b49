"""Verifications per second on a realistic batch, with and without the (answer, gold) cache.

Run: ``python benchmarks/verify_throughput.py [--quick] [--n-workers 2]``.

The batch mimics one HS-STaR round: every problem gets several sampled responses, many of
which repeat the same final answer, over a mix of gold forms (integers, fractions, LaTeX
expressions, tuples, intervals, GSM8K "####" golds). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import random
import time

from hs_star_pl.verifiers import ExactMatchVerifier, MathVerifyVerifier

# (gold, candidate answers) templates; {k} makes each problem's answers its own, so the cache
# only helps with repeats *within* a problem's samples, as in a real round.
GOLDS = [
    ("{k}", ["{k}", "{k1}", "{k}.0", "\\frac{{{k2}}}{{2}}"]),
    ("\\frac{{1}}{{{k}}}", ["1/{k}", "\\frac{{1}}{{{k}}}", "\\frac{{1}}{{{k1}}}", "\\frac{{2}}{{{k2}}}"]),
    ("\\frac{{\\sqrt{{2}}}}{{{k}}}", ["\\frac{{\\sqrt2}}{{{k}}}", "\\sqrt{{2}}/{k}", "\\frac{{1}}{{\\sqrt{{{k}}}}}", "1"]),
    ("({k}, 2)", ["({k},2)", "(2, {k})", "[{k}, 2]"]),
    ("[{k}, \\infty)", ["[{k},\\infty)", "({k}, \\infty)"]),
    ("x^2 + {k}x + 1", ["x^2+{k}x+1", "1 + {k}x + x^2", "x^2+1"]),
    ("Natalia sold {k} clips. #### {k},000", ["{k}000", "{k},000", "{k}"]),
    ("{k}.0", ["{k}", "{k1}"]),
]

def make_batch(n_problems: int, n_samples: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    responses, golds = [], []
    for p in range(n_problems):
        gold_t, answer_ts = GOLDS[p % len(GOLDS)]
        k = 10 + p
        gold = gold_t.format(k=k)
        answers = [a.format(k=k, k1=k + 1, k2=2 * k) for a in answer_ts]
        for _ in range(n_samples):
            answer = rng.choice(answers)
            if rng.random() < 0.1:
                responses.append("Step 1: some reasoning without a final answer.")
            else:
                responses.append(f"Step 1: work.\n\nStep 2: more work.\n\nThe answer is \\boxed{{{answer}}}.")
            golds.append(gold)
    return responses, golds


def timed(fn, *args) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny batch (a smoke run)")
    parser.add_argument("--n-workers", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    args = parser.parse_args()
    n_problems, n_samples = (8, 4) if args.quick else (200, 16)
    responses, golds = make_batch(n_problems, n_samples)
    n = len(responses)

    rows = []
    t, _ = timed(ExactMatchVerifier().verify, responses, golds)
    rows.append(("exact-match (stdlib)", t, n / t))
    with MathVerifyVerifier(n_workers=args.n_workers, timeout_s=args.timeout_s, cache_size=0) as v:
        t_start, _ = timed(v.verify, responses[:1], golds[:1])  # worker start-up, excluded below
        t, _ = timed(v.verify, responses, golds)
        rows.append(("math-verify, no cache", t, n / t))
    with MathVerifyVerifier(n_workers=args.n_workers, timeout_s=args.timeout_s) as v:
        v.verify(responses[:1], golds[:1])
        v.clear_cache()
        t, out = timed(v.verify, responses, golds)
        rows.append(("math-verify, cold cache", t, n / t))
        stats = v.cache_stats
        t, out2 = timed(v.verify, responses, golds)
        rows.append(("math-verify, warm cache", t, n / t))
        assert out == out2

    print(f"batch: {n} responses ({n_problems} problems x {n_samples} samples), "
          f"{args.n_workers} workers; worker start-up {t_start:.2f} s (excluded)")
    print(f"cold-cache run: {stats.misses} distinct (answer, gold) pairs checked, {stats.hits} cache hits")
    base = rows[1][2]
    print(f"{'verifier':<26}{'seconds':>10}{'checks/s':>12}{'vs no cache':>13}")
    for name, t, rate in rows:
        print(f"{name:<26}{t:>10.3f}{rate:>12.0f}{rate / base:>12.1f}x")


if __name__ == "__main__":
    main()
