"""Difficulty classes at their exact edges, the ablation modes, ungradeable handling, calibration."""

from __future__ import annotations

import pytest

from hs_star_pl.core.difficulty import (
    DifficultyConfig,
    DifficultyThresholds,
    calibrate_thresholds,
    classify,
    estimate_difficulty,
    quantile,
)
from hs_star_pl.core.records import Difficulty, Phase, Rollout, RolloutScore, ScoredRollout

T = DifficultyThresholds(tau_low=0.2, tau_high=0.6)
I, B, O = Difficulty.INLIER, Difficulty.BOUNDARY, Difficulty.OUTLIER


@pytest.mark.parametrize(
    "phi_a, phi_r, expected",
    [
        (1.0, 0.61, I),
        (1.0, 0.6, B),  # strict: phi_r must exceed tau_high
        (1.0, 0.1, B),  # all right but the PRM distrusts the reasoning
        (2 / 3, 0.9, B),
        (0.0, 0.19, O),
        (0.0, 0.2, B),  # strict: phi_r must be below tau_low
        (0.0, 0.9, B),  # all wrong but the PRM likes the steps: worth a closer look
        (None, 0.9, B),  # nothing gradeable: never "too easy"
        (1.0, None, B),  # no steps anywhere: never "too easy"
    ],
)
def test_reward_guided_classes_at_the_edges(phi_a, phi_r, expected):
    assert classify(phi_a, phi_r, T, "reward_guided") is expected


def test_ablation_modes_use_one_signal_each():
    assert classify(1.0, 0.0, T, "accuracy_only") is I
    assert classify(0.0, 1.0, T, "accuracy_only") is O
    assert classify(0.5, 0.0, T, "accuracy_only") is B
    assert classify(0.0, 0.9, T, "reward_only") is I
    assert classify(1.0, 0.1, T, "reward_only") is O
    assert classify(1.0, 0.4, T, "reward_only") is B
    assert classify(None, None, T, "reward_only") is B


def scored(pid, index, correct, *steps):
    return ScoredRollout(Rollout(pid, index, Phase.PRESAMPLE, "x"), RolloutScore(correct, tuple(steps)))


def test_estimate_difficulty_averages_per_problem_and_skips_ungradeable():
    """easy: phi_a = 3/3 = 1, phi_r = (0.9 + 0.8 + 0.7)/3 = 0.8 > 0.6 -> inlier.
    mixed: verdicts (True, None, False) -> phi_a = 1/2 over the two gradeable ones.
    hard: phi_a = 0, phi_r = mean(min(0.3, 0.1), min(0.2)) = 0.15 < 0.2 -> outlier.
    """
    rollouts = [
        scored("easy", 0, True, 0.9), scored("easy", 1, True, 0.8, 0.95), scored("easy", 2, True, 0.7),
        scored("mixed", 0, True, 0.9), scored("mixed", 1, None, 0.5), scored("mixed", 2, False, 0.3),
        scored("hard", 0, False, 0.3, 0.1), scored("hard", 1, False, 0.2), scored("hard", 2, False),
    ]
    result, used = estimate_difficulty(rollouts, DifficultyConfig(tau_low=0.2, tau_high=0.6), ["easy", "mixed", "hard", "unseen"])
    assert used == T
    assert result["easy"].phi_a == 1.0 and result["easy"].phi_r == pytest.approx(0.8)
    assert result["easy"].difficulty is I
    assert (result["mixed"].phi_a, result["mixed"].n_samples, result["mixed"].n_gradeable) == (0.5, 3, 2)
    assert result["mixed"].difficulty is B
    assert result["hard"].phi_r == pytest.approx(0.15) and result["hard"].difficulty is O
    assert (result["unseen"].n_samples, result["unseen"].difficulty) == (0, B)


def test_quantiles_and_calibration():
    """Type-7 quantile of [0, 0.1, 0.5, 0.9]: q=0.25 -> pos 0.75 -> 0.075; q=0.75 -> pos 2.25 -> 0.6."""
    values = [0.9, 0.0, 0.5, 0.1]
    assert quantile(values, 0.25) == pytest.approx(0.075)
    assert quantile(values, 0.75) == pytest.approx(0.6)
    assert quantile([0.3], 0.9) == 0.3
    assert calibrate_thresholds(values, 0.0, 1.0) == DifficultyThresholds(0.0, 0.9)
    rollouts = [scored(f"p{i}", 0, True, v) for i, v in enumerate(values)]
    result, used = estimate_difficulty(rollouts, DifficultyConfig(calibration=(0.25, 0.75)))
    assert used.tau_low == pytest.approx(0.075) and used.tau_high == pytest.approx(0.6)
    assert [result[f"p{i}"].difficulty for i in range(4)] == [I, B, B, B]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tau_low": 0.7, "tau_high": 0.3}, r"difficulty.tau_low \(0.7\) must be <= difficulty.tau_high \(0.3\)"),
        ({"tau_low": -0.1}, r"difficulty.tau_low must be a number in \[0, 1\]"),
        ({"tau_high": 1.5}, r"difficulty.tau_high must be a number in \[0, 1\]"),
        ({"mode": "vibes"}, r"difficulty.mode must be one of \['reward_guided', 'accuracy_only', 'reward_only'\]"),
        ({"calibration": (0.9, 0.1)}, r"0 <= q_low <= q_high <= 1"),
    ],
)
def test_bad_difficulty_config_names_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DifficultyConfig(**kwargs)
