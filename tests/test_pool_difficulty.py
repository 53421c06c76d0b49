"""The pool profiler (``python -m hs_star_pl.experiments.pool_difficulty``): by hand, then on a real tiny M_0."""

from __future__ import annotations

import json
import subprocess
import sys

from hs_star_pl.core.difficulty import DifficultyConfig
from hs_star_pl.core.records import Phase, Problem, Rollout, RolloutScore, ScoredRollout
from hs_star_pl.experiments.pool_difficulty import markdown, profile
from tests.helpers.self_training import env


def scored(pid: str, verdicts: list[bool], prm: float = 1.0) -> list[ScoredRollout]:
    return [ScoredRollout(Rollout(pid, i, Phase.PRESAMPLE, f"{pid} {i}"), RolloutScore(v, (prm,))) for i, v in enumerate(verdicts)]


def test_profile_by_hand():
    """K=4, n_p=2. a: right 4/4 (inlier at n_p and K); b: right, right, wrong, wrong (inlier
    from its first two, boundary from all four); c: wrong 4/4 with min-step 0.0 (outlier);
    d: wrong, right, wrong, wrong (boundary). Histogram of right answers: 0:1, 1:1, 2:1, 4:1."""
    problems = [Problem(pid, f"q {pid}", "1", metadata={"n_steps": n}) for pid, n in zip("abcd", (2, 2, 3, 3))]
    rollouts = scored("a", [True] * 4) + scored("b", [True, True, False, False]) + scored("c", [False] * 4, 0.0) + scored("d", [False, True, False, False])
    report = profile(problems, rollouts, samples=4, n_presample=2, difficulty=DifficultyConfig(tau_low=0.25, tau_high=0.75), by="n_steps")
    assert report["pass_count_histogram"] == {"0": 1, "1": 1, "2": 1, "3": 0, "4": 1}
    assert report["classes_at_n_presample"] == {"inlier": 2, "boundary": 1, "outlier": 1}
    assert report["classes_at_samples"] == {"inlier": 1, "boundary": 2, "outlier": 1}
    rows = report["by"]["rows"]
    assert rows["2"] == {"n_problems": 2, "mean_pass_rate": 6 / 8, "classes_at_n_presample": {"inlier": 2, "boundary": 0, "outlier": 0}}
    assert rows["3"]["mean_pass_rate"] == 1 / 8
    text = markdown(report)
    assert "| problems | 1 | 1 | 1 | 0 | 1 |" in text and "| at n_p = 2 | 2 (50%) | 1 (25%) | 1 (25%) |" in text


def test_profiles_a_tiny_policy_through_the_command(tiny_m0, tmp_path):
    m0, problems = tiny_m0
    out = tmp_path / "profile.json"
    done = subprocess.run(
        [sys.executable, "-m", "hs_star_pl.experiments.pool_difficulty", "--model", str(m0), "--problems", str(problems),
         "--limit", "12", "--samples", "4", "--n-presample", "2", "--max-new-tokens", "48", "--out", str(out)],
        env=env(), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert sum(report["pass_count_histogram"].values()) == 12 and len(report["rollouts"]) == 48
    assert sum(report["classes_at_n_presample"].values()) == 12
    right = {}
    for r in report["rollouts"]:
        right[r["problem_id"]] = right.get(r["problem_id"], 0) + (r["correct"] is True)
    assert report["pass_count_histogram"] == {str(c): sum(v == c for v in right.values()) for c in range(5)}
    assert "correct of 4" in done.stdout
