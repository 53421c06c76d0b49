"""A rollout engine with known answers, for tests of what reaches the engine (not of sampling).

``SolutionEngine`` answers each problem of a problems file with its reference solution on even
samples and the same solution with a wrong final answer on odd ones, so every problem is a
boundary problem and yields DPO pairs. It records every prompt it is asked to continue.
"""

from __future__ import annotations

from collections.abc import Sequence

from hs_star_pl.core.problems import load_problems
from hs_star_pl.core.protocols import Completion, GenerationRequest, SamplingParams


class SolutionEngine:
    """Right and wrong copies of each problem's ``solution``.

    Args:
        problems_file: problems JSONL with a ``solution`` per problem (the ids are the request keys).
    """

    def __init__(self, problems_file: str) -> None:
        self.problems = {p.id: p for p in load_problems(problems_file)}
        self.prompts: list[tuple[str, str]] = []

    def generate(self, requests: Sequence[GenerationRequest], params: SamplingParams) -> dict[str, list[Completion]]:
        out = {}
        for request in requests:
            self.prompts.append((request.key, request.prompt))
            problem = self.problems[request.key]
            right = problem.solution
            wrong = right.replace(f"\\boxed{{{problem.answer}}}", f"\\boxed{{{int(problem.answer) + 1}}}")
            out[request.key] = [Completion(right if i % 2 == 0 else wrong, "stop", len(right)) for i in range(request.n)]
        return out
