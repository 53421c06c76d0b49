"""A synthetic multi-step arithmetic task whose difficulty is controlled by its knobs.

A problem is a chain of operations on a running value, phrased like a word problem::

    Start with 12. Add 7. Multiply by 3. Subtract 5. What is the result?

and its reference solution is written in the paper's step format (one step per blank-line
block, the final answer boxed)::

    Step 1: 12 + 7 = 19

    Step 2: 19 * 3 = 57

    Step 3: 57 - 5 = 52

    The answer is \\boxed{52}.

Difficulty grows with the number of steps, the operand ranges and the operations allowed.
Every intermediate value stays in ``[0, max_value]`` (an operation that would leave it is
redrawn), so gold answers are correct by construction and small enough for a tiny model.
Problems are written as JSONL in the same shape real datasets use (``id``, ``question``,
``answer``, ``solution`` + metadata), so ``problems.load_problems`` serves both.

Run ``python -m hs_star_pl.tasks.arithmetic --help`` to write a pool and a test set.
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hs_star_pl.core.problems import write_problems
from hs_star_pl.core.records import Problem

OPERATIONS = ("add", "subtract", "multiply", "divide")
_SYMBOL = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}
_PHRASE = {"add": "Add {}.", "subtract": "Subtract {}.", "multiply": "Multiply by {}.", "divide": "Divide by {}."}
_QUESTION_OP = re.compile(r"(Add|Subtract|Multiply by|Divide by) (\d+)\.")
_START = re.compile(r"^Start with (\d+)\.")


@dataclass(frozen=True)
class ArithmeticTaskConfig:
    """Knobs of the task.

    Args:
        min_steps: fewest operations in a chain.
        max_steps: most operations in a chain (step counts are drawn uniformly).
        max_start: the starting value is drawn from ``[0, max_start]``.
        max_addend: constants added or subtracted are drawn from ``[1, max_addend]``.
        max_multiplier: multipliers and divisors are drawn from ``[2, max_multiplier]``.
        max_value: every intermediate value stays in ``[0, max_value]``.
        operations: which of ``add``, ``subtract``, ``multiply``, ``divide`` (exact only) occur.
    """

    min_steps: int = 1
    max_steps: int = 6
    max_start: int = 30
    max_addend: int = 30
    max_multiplier: int = 5
    max_value: int = 99
    operations: tuple[str, ...] = ("add", "subtract", "multiply")

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"task.min_steps/max_steps must satisfy 1 <= min <= max, got {self.min_steps}, {self.max_steps}")
        if self.max_addend < 1 or self.max_multiplier < 2 or self.max_start < 0:
            raise ValueError("task.max_addend must be >= 1, task.max_multiplier >= 2 and task.max_start >= 0")
        if self.max_value < max(self.max_start, self.max_addend, 2 * self.max_multiplier):
            raise ValueError(
                f"task.max_value ({self.max_value}) must be >= max_start, max_addend and 2 * max_multiplier"
            )
        ops = tuple(self.operations)
        unknown = [o for o in ops if o not in OPERATIONS]
        if not ops or unknown:
            raise ValueError(f"task.operations must be a non-empty subset of {list(OPERATIONS)}, got {list(ops)}")
        object.__setattr__(self, "operations", ops)


def apply(op: str, value: int, operand: int) -> int:
    """The exact integer result of one operation (``divide`` must divide evenly)."""
    if op == "add":
        return value + operand
    if op == "subtract":
        return value - operand
    if op == "multiply":
        return value * operand
    if op == "divide":
        if operand == 0 or value % operand:
            raise ValueError(f"{value} is not divisible by {operand}")
        return value // operand
    raise ValueError(f"unknown operation {op!r}")


def _draw_step(rng: random.Random, value: int, cfg: ArithmeticTaskConfig) -> tuple[str, int]:
    for _ in range(100):
        op = rng.choice(cfg.operations)
        if op in ("add", "subtract"):
            operand = rng.randint(1, cfg.max_addend)
        else:
            operand = rng.randint(2, cfg.max_multiplier)
        try:
            result = apply(op, value, operand)
        except ValueError:
            continue
        if 0 <= result <= cfg.max_value:
            return op, operand
    # Always possible: add 1 below the cap, otherwise subtract 1.
    return ("add", 1) if value < cfg.max_value else ("subtract", 1)


def render_solution(start: int, steps: Sequence[tuple[str, int]]) -> tuple[str, int]:
    """The step-format solution of a chain and its final value."""
    lines, value = [], start
    for i, (op, operand) in enumerate(steps, start=1):
        result = apply(op, value, operand)
        lines.append(f"Step {i}: {value} {_SYMBOL[op]} {operand} = {result}")
        value = result
    lines.append(f"The answer is \\boxed{{{value}}}.")
    return "\n\n".join(lines), value


def make_problem(start: int, steps: Sequence[tuple[str, int]], problem_id: str | None = None) -> Problem:
    """A ``Problem`` for a given chain (id defaults to a readable encoding of the chain)."""
    question = " ".join([f"Start with {start}."] + [_PHRASE[op].format(n) for op, n in steps] + ["What is the result?"])
    solution, answer = render_solution(start, steps)
    pid = problem_id or "arith-" + "-".join([str(start)] + [f"{op[0]}{n}" for op, n in steps])
    return Problem(
        id=pid,
        question=question,
        answer=str(answer),
        solution=solution,
        metadata={"n_steps": len(steps), "task": "arithmetic"},
    )


def parse_question(question: str) -> tuple[int, list[tuple[str, int]]] | None:
    """Recover ``(start, [(op, operand), ...])`` from a question, ``None`` if it is not one.

    >>> parse_question("Start with 12. Add 7. Multiply by 3. What is the result?")
    (12, [('add', 7), ('multiply', 3)])
    """
    m = _START.match(question.strip())
    if not m:
        return None
    names = {"Add": "add", "Subtract": "subtract", "Multiply by": "multiply", "Divide by": "divide"}
    steps = [(names[w], int(n)) for w, n in _QUESTION_OP.findall(question)]
    return int(m.group(1)), steps


def generate_problems(
    n: int,
    seed: int = 0,
    config: ArithmeticTaskConfig = ArithmeticTaskConfig(),
    *,
    exclude: Sequence[Problem] = (),
) -> list[Problem]:
    """``n`` distinct problems, seeded; none shares a question with ``exclude``.

    Raises:
        ValueError: when the knobs admit fewer than ``n`` distinct problems.
    """
    rng = random.Random(f"arithmetic:{seed}")
    taken = {p.question for p in exclude}
    out: list[Problem] = []
    misses = 0
    while len(out) < n:
        start = rng.randint(0, config.max_start)
        n_steps = rng.randint(config.min_steps, config.max_steps)
        value, steps = start, []
        for _ in range(n_steps):
            op, operand = _draw_step(rng, value, config)
            steps.append((op, operand))
            value = apply(op, value, operand)
        problem = make_problem(start, steps)
        if problem.question in taken:
            misses += 1
            if misses > 50 * n + 1000:
                raise ValueError(f"the task config admits too few distinct problems for n={n}: {config}")
            continue
        taken.add(problem.question)
        out.append(problem)
    return out


def write_split(
    directory: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    config: ArithmeticTaskConfig = ArithmeticTaskConfig(),
    test_config: ArithmeticTaskConfig | None = None,
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` (the pool) and a disjoint ``test.jsonl``; returns both paths."""
    directory = Path(directory)
    train = generate_problems(n_train, seed, config)
    test = generate_problems(n_test, seed + 1_000_003, test_config or config, exclude=train)
    write_problems(directory / "train.jsonl", train)
    write_problems(directory / "test.jsonl", test)
    return directory / "train.jsonl", directory / "test.jsonl"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic arithmetic task as JSONL.")
    parser.add_argument("--out", required=True, help="output folder (train.jsonl, test.jsonl)")
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-steps", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=6)
    args = parser.parse_args(argv)
    cfg = ArithmeticTaskConfig(min_steps=args.min_steps, max_steps=args.max_steps)
    train, test = write_split(args.out, args.n_train, args.n_test, args.seed, cfg)
    print(f"wrote {args.n_train} problems to {train} and {args.n_test} to {test}")


if __name__ == "__main__":
    main()
