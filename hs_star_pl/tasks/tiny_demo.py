"""The embedded demo's data: which arithmetic chains M_0 learns from, self-trains on, is tuned on and is tested on.

``python -m hs_star_pl.tasks.tiny_demo --out data/tiny`` writes the four shipped files:

* ``sft.jsonl``: step-wise initialisation (M_0 learns the step format on 1-6 step chains);
* ``pool.jsonl``: the self-training pool, drawn from per iteration;
* ``dev.jsonl``: the development set. Every setting of the demo (M_0's recipe, and any
  self-training knob) is chosen on this file, never on ``test.jsonl``;
* ``test.jsonl``: the held-out test set, reported only.

All four are disjoint by question. The pool, dev and test chains have 2-6 steps (values in
0..40, +/- up to 10, multipliers up to 3); ``tests/test_task_arithmetic.py`` checks that the
shipped files equal this output byte for byte.

Seeds and draw order (each draw excludes every question drawn before it):

1. ``sft``: seed 0, 12,000 chains (the SFT mix);
2. the first pool: seed 1, 1,200 chains, excluding ``sft``; shipped as ``pool.jsonl``;
3. the first test set: seed 2, 400 chains, excluding 1-2. It was shipped as ``test.jsonl``
   until 2026-12 and used to tune the demo's settings, so it is no longer shipped; it is
   still drawn here so the new sets avoid it;
4. ``dev``: seed 4, 1,000 chains, excluding 1-3;
5. ``test``: seed 5, 1,000 chains, excluding 1-4.

(Seed 3 drew the "fresh chains" of the first results, docs/results-tiny.md.) ``dev`` and
``test`` depend only on 1-3, never on ``pool.jsonl``'s current content: a pool redrawn later
(another size or mix) keeps them unchanged, and must be drawn with ``exclude`` covering
``sft``, ``dev`` and ``test`` to stay disjoint from them. M_0 is trained on ``sft`` alone, so
it does not depend on the pool either.

The study task (``--study``, into ``data/tiny/spread``) is where the paper's pilot study and
main comparison run: a pool whose difficulty is spread for its M_0 the way a real pool's is for
a 7B model (about a fifth of the problems always solved, a third never, the rest between), which
the demo's pool is not (docs/results-tiny-history.md, "The study task"). Its M_0 knows the demo's range
(values to 40) and is still learning values to 60; values to 99 are out of its reach:

* ``sft_stage2.jsonl``: seed 6, 2,000 chains of 1-6 steps with values up to 60, the second stage of
  the study's step-wise initialisation (``data/tiny/m0_spread/README.md``);
* ``pool.jsonl`` (seed 7, 1,200), ``dev.jsonl`` (seed 8, 1,000), ``test.jsonl`` (seed 9, 1,000): each
  80% chains of 2-6 steps with values up to 60 and 20% chains of 2-4 steps with values up to 99
  (+/- up to 20), drawn with the seed's ``random.Random`` deciding each problem's family.

Every study file excludes every demo file (and the first test set) and the study files drawn
before it, so all eight are disjoint by question.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

from hs_star_pl.core.problems import write_problems
from hs_star_pl.core.records import Problem
from hs_star_pl.tasks.arithmetic import ArithmeticTaskConfig, generate_problems

# Measured (docs/results-tiny.md): with chains up to 99 and multipliers up to 5 the tiny M_0
# solved 1.5% of the test set; with values to 60 and +/- to 20 it solved a quarter, erring
# mostly on arithmetic facts (about 2,400 distinct ones). This mix has fewer facts, longer
# chains, and gives M_0 about 40% with ~40% of the pool on the boundary.
SFT = ArithmeticTaskConfig(min_steps=1, max_steps=6, max_start=20, max_addend=10, max_multiplier=3, max_value=40)
POOL = ArithmeticTaskConfig(min_steps=2, max_steps=6, max_start=20, max_addend=10, max_multiplier=3, max_value=40)
SIZES = {"sft": 12000, "pool": 1200, "dev": 1000, "test": 1000}
FIRST_TEST_SIZE = 400
SEEDS = {"sft": 0, "pool": 1, "first_test": 2, "dev": 4, "test": 5}
SPLITS = ("sft", "pool", "dev", "test")


def first_draws() -> tuple[list[Problem], list[Problem], list[Problem]]:
    """``sft``, the first pool and the first (tuned-on) test set: draws 1-3 of the module docstring."""
    sft = generate_problems(SIZES["sft"], SEEDS["sft"], SFT)
    pool = generate_problems(SIZES["pool"], SEEDS["pool"], POOL, exclude=sft)
    first_test = generate_problems(FIRST_TEST_SIZE, SEEDS["first_test"], POOL, exclude=sft + pool)
    return sft, pool, first_test


def build() -> dict[str, list[Problem]]:
    """The four shipped problem lists, disjoint by question."""
    return _all_demo_draws()[0]


def _all_demo_draws() -> tuple[dict[str, list[Problem]], list[Problem]]:
    """The four shipped lists and the first test set, each drawn once."""
    sft, pool, first_test = first_draws()
    seen = sft + pool + first_test
    dev = generate_problems(SIZES["dev"], SEEDS["dev"], POOL, exclude=seen)
    test = generate_problems(SIZES["test"], SEEDS["test"], POOL, exclude=seen + dev)
    return {"sft": sft, "pool": pool, "dev": dev, "test": test}, first_test


# The study task (module docstring).
STUDY_SFT = ArithmeticTaskConfig(min_steps=1, max_steps=6, max_start=20, max_addend=10, max_multiplier=3, max_value=60)
STUDY_REACH = ArithmeticTaskConfig(min_steps=2, max_steps=6, max_start=20, max_addend=10, max_multiplier=3, max_value=60)
STUDY_BEYOND = ArithmeticTaskConfig(min_steps=2, max_steps=4, max_start=30, max_addend=20, max_multiplier=3, max_value=99)
STUDY_BEYOND_SHARE = 0.2
STUDY_SIZES = {"sft_stage2": 2000, "pool": 1200, "dev": 1000, "test": 1000}
STUDY_SEEDS = {"sft_stage2": 6, "pool": 7, "dev": 8, "test": 9}


def _mixture(n: int, seed: int, exclude: list[Problem]) -> list[Problem]:
    """``n`` problems, each from ``STUDY_BEYOND`` with probability ``STUDY_BEYOND_SHARE``, else ``STUDY_REACH``.

    Each carries the component it was drawn from in ``metadata["family"]`` (``reach`` or
    ``beyond``), so results can be split by it (``compare --group-by family``).
    """
    rng = random.Random(f"tiny-study-mixture:{seed}")
    n_beyond = sum(rng.random() < STUDY_BEYOND_SHARE for _ in range(n))
    reach = generate_problems(n - n_beyond, seed, STUDY_REACH, exclude=exclude)
    beyond = generate_problems(n_beyond, seed, STUDY_BEYOND, exclude=exclude + reach)
    order = [_tagged(p, "reach") for p in reach] + [_tagged(p, "beyond") for p in beyond]
    rng.shuffle(order)
    return order


def _tagged(problem: Problem, family: str) -> Problem:
    return dataclasses.replace(problem, metadata={**problem.metadata, "family": family})


def build_study() -> dict[str, list[Problem]]:
    """The study task's four problem lists, disjoint by question from each other and from the demo's."""
    demo, first_test = _all_demo_draws()
    seen = [p for problems in demo.values() for p in problems] + first_test
    out = {"sft_stage2": generate_problems(STUDY_SIZES["sft_stage2"], STUDY_SEEDS["sft_stage2"], STUDY_SFT, exclude=seen)}
    seen += out["sft_stage2"]
    for name in ("pool", "dev", "test"):
        out[name] = _mixture(STUDY_SIZES[name], STUDY_SEEDS[name], seen)
        seen += out[name]
    return out


# The U-shaped pool (``--u-pool``, into ``data/tiny/u_pool``): the study's M_0 on a pool whose
# pass-rate histogram is U-shaped, as a trained model's is on a real pool (most problems solved
# nearly every time or never, few between), where the study pool's is flat. Half short chains
# with small values (2-3 steps, values to 40), half chains longer than any M_0 was trained on
# (7-9 steps, values to 99). On a probe of 50 problems of each (docs/results-tiny.md) M_0 solved
# the short ones 6-8 times in 8 for 36 of 50 and the long ones never for 49 of 50. Chosen on that
# probe, never on a test set.
U_SHORT = ArithmeticTaskConfig(min_steps=2, max_steps=3, max_start=20, max_addend=10, max_multiplier=3, max_value=40)
U_LONG = ArithmeticTaskConfig(min_steps=7, max_steps=9, max_start=30, max_addend=20, max_multiplier=3, max_value=99)
U_COMPONENTS = {"short": (U_SHORT, 0.5), "long": (U_LONG, 0.5)}
U_SIZES = {"pool": 1200, "dev": 1000, "test": 1000}
U_SEEDS = {"pool": 10, "dev": 11, "test": 12}


def _components(n: int, seed: int, components: dict[str, tuple[ArithmeticTaskConfig, float]],
                exclude: list[Problem]) -> list[Problem]:
    """``n`` problems, each from a component drawn by its share (seeded), tagged ``metadata["family"]``."""
    rng = random.Random(f"tiny-u-mixture:{seed}")
    names = list(components)
    weights = [components[name][1] for name in names]
    counts = dict.fromkeys(names, 0)
    for _ in range(n):
        counts[rng.choices(names, weights)[0]] += 1
    order: list[Problem] = []
    for name in names:
        drawn = generate_problems(counts[name], seed, components[name][0], exclude=exclude + order)
        order += [_tagged(p, name) for p in drawn]
    rng.shuffle(order)
    return order


def build_u_pool() -> dict[str, list[Problem]]:
    """The U-shaped pool's pool, dev and test lists, disjoint from each other and every demo and study file."""
    demo, first_test = _all_demo_draws()
    seen = [p for problems in demo.values() for p in problems] + first_test
    seen += [p for problems in build_study().values() for p in problems]
    out = {}
    for name in ("pool", "dev", "test"):
        out[name] = _components(U_SIZES[name], U_SEEDS[name], U_COMPONENTS, seen)
        seen += out[name]
    return out


def write(directory: str | Path, study: bool = False, u_pool: bool = False) -> dict[str, Path]:
    directory = Path(directory)
    paths = {}
    for name, problems in (build_u_pool() if u_pool else build_study() if study else build()).items():
        paths[name] = directory / f"{name}.jsonl"
        write_problems(paths[name], problems)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the tiny demo's problem files.")
    parser.add_argument("--out", default=None, help="folder (default: data/tiny, or data/tiny/spread with --study)")
    parser.add_argument("--study", action="store_true", help="write the study task's files instead of the demo's")
    parser.add_argument("--u-pool", action="store_true",
                        help="write the U-shaped pool's pool, dev and test files (default folder data/tiny/u_pool)")
    args = parser.parse_args(argv)
    out = args.out or ("data/tiny/u_pool" if args.u_pool else "data/tiny/spread" if args.study else "data/tiny")
    for name, path in write(out, study=args.study, u_pool=args.u_pool).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
