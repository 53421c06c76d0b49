"""Records serialize to JSON and back unchanged; derived values follow their definitions."""

from __future__ import annotations

import json

from hs_star_pl.core.records import (
    Difficulty,
    Phase,
    PreferencePair,
    Problem,
    ProblemDifficulty,
    Rollout,
    RolloutScore,
    ScoredRollout,
    SftExample,
)
from hs_star_pl.core.steps import split_steps


def through_json(obj):
    return type(obj).from_dict(json.loads(json.dumps(obj.to_dict())))


def test_records_round_trip_through_json():
    objs = [
        Problem("p1", "Q", "1", "s", {"level": 2}),
        ScoredRollout(Rollout("p1", 4, Phase.RESAMPLE, "a\n\nb", "length", 17), RolloutScore(False, (0.5, 0.25))),
        ScoredRollout(Rollout("p1", 0, Phase.PRESAMPLE, ""), RolloutScore(None)),
        ProblemDifficulty("p1", 0.5, None, Difficulty.BOUNDARY, 3, 2),
        PreferencePair("p1", "P", "c", "r", "p1#0", "p1#1", 0.9, None, -3.5, -4.0),
        SftExample("p1", "P", "c", 0.9),
    ]
    for obj in objs:
        assert through_json(obj) == obj


def test_process_reward_is_the_minimum_step_score():
    assert RolloutScore(True, (0.9, 0.2, 0.7)).prm_min == 0.2
    assert RolloutScore(True, ()).prm_min is None
    assert Rollout("p", 3, Phase.PRESAMPLE, "").key == "p#3"


def test_steps_split_on_blank_lines_and_drop_empty_blocks():
    assert split_steps("a\n\nb\n\n\n\n  c  \n\n") == ["a", "b", "c"]
    assert split_steps("   \n\n ") == []
    assert split_steps("x||y", "||") == ["x", "y"]
