"""The embedded demo's data: which arithmetic chains M_0 learns from, self-trains on, and is tested on.

``python -m hs_star_pl.tasks.tiny_demo --out data/tiny`` writes the three shipped files:

* ``sft.jsonl``: step-wise initialisation (M_0 learns the step format on 1-6 step chains);
* ``pool.jsonl``: the self-training pool, drawn from per iteration;
* ``test.jsonl``: the held-out test set, disjoint from both.

The pool and test chains have 2-6 steps (values in 0..40, +/- up to 10, multipliers up to
3); ``tests/test_task_arithmetic.py`` checks that the shipped files equal this output.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from hs_star_pl.problems import write_problems
from hs_star_pl.tasks.arithmetic import ArithmeticTaskConfig, generate_problems

# Measured (docs/results-tiny.md): with chains up to 99 and multipliers up to 5 the tiny M_0
# solved 1.5% of the test set; with values to 60 and +/- to 20 it solved a quarter, erring
# mostly on arithmetic facts (about 2,400 distinct ones). This mix has fewer facts, longer
# chains, and gives M_0 about 40% with ~40% of the pool on the boundary.
SFT = ArithmeticTaskConfig(min_steps=1, max_steps=6, max_start=20, max_addend=10, max_multiplier=3, max_value=40)
POOL = ArithmeticTaskConfig(min_steps=2, max_steps=6, max_start=20, max_addend=10, max_multiplier=3, max_value=40)
SIZES = {"sft": 12000, "pool": 1200, "test": 400}
SEED = 0


def build() -> dict[str, list]:
    """The three problem lists, disjoint by question."""
    sft = generate_problems(SIZES["sft"], SEED, SFT)
    pool = generate_problems(SIZES["pool"], SEED + 1, POOL, exclude=sft)
    test = generate_problems(SIZES["test"], SEED + 2, POOL, exclude=sft + pool)
    return {"sft": sft, "pool": pool, "test": test}


def write(directory: str | Path) -> dict[str, Path]:
    directory = Path(directory)
    paths = {}
    for name, problems in build().items():
        paths[name] = directory / f"{name}.jsonl"
        write_problems(paths[name], problems)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the tiny demo's problem files.")
    parser.add_argument("--out", default="data/tiny")
    args = parser.parse_args(argv)
    for name, path in write(args.out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
