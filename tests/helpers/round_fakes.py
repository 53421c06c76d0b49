"""Small components with known behaviour for exercising ``run_round`` (not mocks of it).

The engine answers each problem right with a fixed per-problem probability (seeded), the
verifier compares the boxed number exactly, and the PRM scores a step 0.9 unless it
contains "guess".
"""

from __future__ import annotations

import random
import re

from hs_star_pl.core.budget import HierarchicalBudget
from hs_star_pl.core.difficulty import DifficultyConfig
from hs_star_pl.core.protocols import Completion
from hs_star_pl.core.records import Problem
from hs_star_pl.core.rounds import RoundConfig, run_round

P_RIGHT = {"easy": 1.0, "mid1": 0.5, "mid2": 0.5, "hard": 0.0, "hard2": 0.0}


class ScriptedEngine:
    def __init__(self):
        self.calls = []

    def generate(self, requests, params):
        self.calls.append([(r.key, r.n) for r in requests])
        out = {}
        for req in reversed(requests):  # order must not matter to the caller
            rng = random.Random(f"{params.seed}:{req.key}")
            answers = []
            for i in range(req.n):
                right = rng.random() < P_RIGHT[req.key]
                value = 7 if right else 8
                hedge = "guess" if req.key == "hard2" else "so"
                answers.append(Completion(f"Step 1: {req.key} attempt {i}\n\n{hedge} \\boxed{{{value}}}", "stop", 12))
            out[req.key] = answers
        return out


class BoxedNumberVerifier:
    def verify(self, responses, golds):
        out = []
        for text, gold in zip(responses, golds):
            m = re.search(r"\\boxed\{(\d+)\}", text)
            out.append(None if m is None else m.group(1) == gold)
        return out

    def check_golds(self, golds):
        return [g.isdigit() for g in golds]


class KeywordPRM:
    def score(self, requests):
        return [[0.1 if "guess" in s else 0.9 for s in req.steps] for req in requests]


def problems():
    return [Problem(pid, f"question {pid}", "7") for pid in P_RIGHT] + [Problem("bad", "question bad", "seven")]


def run(store=None, engine=None, **kw):
    kw.setdefault("allocator", HierarchicalBudget(samples_per_problem=8, n_presample=3))
    kw.setdefault("config", RoundConfig(difficulty=DifficultyConfig(tau_low=0.3, tau_high=0.6)))
    return run_round(
        problems(),
        engine=engine or ScriptedEngine(),
        verifier=BoxedNumberVerifier(),
        prm=KeywordPRM(),
        render_prompt=lambda p: f"Q: {p.question}\nA:",
        iteration=1,
        seed=123,
        store=store,
        **kw,
    )
