"""Verifications per second on a realistic batch, with and without the (answer, gold) cache.

Run: ``python benchmarks/verify_throughput.py [--quick] [--n-workers 2] [--repeats 3]``.

The batch mimics one HS-STaR round: every problem gets several sampled responses, many of
which repeat the same final answer, over a mix of gold forms (integers, fractions, LaTeX
expressions, tuples, intervals, GSM8K "####" golds). Rows:

* the whole batch in one call: exact match (stdlib), math-verify without the cache, with a
  cold cache, and the same batch again (warm cache);
* *round-shaped*: the batch split as a round verifies it, first the 3 pre-samples of every
  problem, then the other samples (the re-sample phase) in a second call, with the cache
  (the second call reuses answers seen in the first) and without.

Every variant runs on freshly started, warmed-up workers, the variants alternate for
``--repeats`` rounds and the medians are reported: one pass each moved by 2.5x from run to
run on a shared machine.

Not a test: numbers depend on the machine; compare rows of one run.
"""

from __future__ import annotations

import random
import time

from bench_common import common_parser, emit, interleaved, median

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


def make_batch(n_problems: int, n_samples: int, seed: int = 0, first_k: int = 10) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    responses, golds = [], []
    for p in range(n_problems):
        gold_t, answer_ts = GOLDS[p % len(GOLDS)]
        k = first_k + p
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
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--n-workers", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, help="timed rounds of every variant (default 3)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    n_problems, n_samples = (8, 4) if args.quick else (200, 16)
    responses, golds = make_batch(n_problems, n_samples)
    n = len(responses)
    # a round verifies the 3 pre-samples of every problem first, then the re-samples
    first = [i for i in range(n) if i % n_samples < 3]
    second = [i for i in range(n) if i % n_samples >= 3]

    def subset(idx: list[int]) -> tuple[list[str], list[str]]:
        return [responses[i] for i in idx], [golds[i] for i in idx]

    warm_up = make_batch(4 * args.n_workers, 2, first_k=100_000)  # other golds: nothing cached for the batch

    def fresh(cache_size: int | None = None) -> MathVerifyVerifier:
        """A verifier whose workers are started and warm, with none of the batch's golds parsed."""
        kwargs = {} if cache_size is None else {"cache_size": cache_size}
        v = MathVerifyVerifier(n_workers=args.n_workers, timeout_s=args.timeout_s, **kwargs)
        v.verify(*warm_up)
        v.clear_cache()
        return v

    def no_cache_whole() -> dict:
        with fresh(cache_size=0) as v:
            t, _ = timed(v.verify, responses, golds)
        return {"whole batch": t}

    def no_cache_round() -> dict:
        with fresh(cache_size=0) as v:
            t1, _ = timed(v.verify, *subset(first))
            t2, _ = timed(v.verify, *subset(second))
        return {"round": t1 + t2}

    def cache_whole() -> dict:
        with fresh() as v:
            t, out = timed(v.verify, responses, golds)
            stats = v.cache_stats
            t_again, out2 = timed(v.verify, responses, golds)
            assert out == out2
        return {"whole batch": t, "whole batch again": t_again, "stats": stats}

    def cache_round() -> dict:
        with fresh() as v:
            t1, _ = timed(v.verify, *subset(first))
            t2, _ = timed(v.verify, *subset(second))
            stats = v.cache_stats
        return {"round": t1 + t2, "stats": stats}

    t_start, v = timed(lambda: fresh(cache_size=0))  # one start-up, timed for the notes
    v.close()
    # each variant starts its own warm workers; variants alternate, so load changes hit all alike
    runs = interleaved(
        {"exact": lambda: ExactMatchVerifier().verify(responses, golds), "no cache, whole": no_cache_whole,
         "no cache, round": no_cache_round, "cache, whole": cache_whole, "cache, round": cache_round},
        repeats,
    )

    def med(name: str, key: str | None = None) -> float:
        return median([t if key is None else r[key] for t, r in runs[name]])

    rows = [
        ("exact-match (stdlib)", "whole batch", med("exact")),
        ("math-verify, no cache", "whole batch", med("no cache, whole", "whole batch")),
        ("math-verify, no cache", "round: pre- then re-sample", med("no cache, round", "round")),
        ("math-verify, cold cache", "whole batch", med("cache, whole", "whole batch")),
        ("math-verify, warm cache", "whole batch again", med("cache, whole", "whole batch again")),
        ("math-verify, cache", "round: pre- then re-sample", med("cache, round", "round")),
    ]
    rows = [(name, calls, t, n / t) for name, calls, t in rows]
    stats = runs["cache, whole"][-1][1]["stats"]
    round_stats = runs["cache, round"][-1][1]["stats"]

    base = rows[1][3]
    notes = [
        f"batch: {n} responses ({n_problems} problems x {n_samples} samples), {args.n_workers} workers; "
        f"worker start-up and warm-up {t_start:.2f} s (excluded); medians of {repeats} interleaved runs, "
        f"each on freshly started workers",
        f"cold-cache run: {stats.misses} distinct (answer, gold) pairs checked, {stats.hits} cache hits; "
        f"round-shaped run: {round_stats.misses} checked, {round_stats.hits} hits",
    ]
    emit("Verification throughput", notes, ["verifier", "calls", "seconds", "checks/s", "vs no cache"],
         [(name, calls, t, rate, f"{rate / base:.1f}x") for name, calls, t, rate in rows], args.json)

if __name__ == "__main__":
    main()
