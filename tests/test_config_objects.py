"""The pure layer's settings build from YAML through jsonargparse, as the CLI will build them."""

from __future__ import annotations

import pytest
import yaml
from jsonargparse import ArgumentParser

from hs_star_pl.budget import BudgetAllocator, HierarchicalBudget, ProportionalBudget, UniformBudget
from hs_star_pl.difficulty import DifficultyConfig
from hs_star_pl.selection import SelectionConfig


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False)
    p.add_argument("--budget", type=BudgetAllocator)
    p.add_argument("--difficulty", type=DifficultyConfig, default=DifficultyConfig())
    p.add_argument("--selection", type=SelectionConfig, default=SelectionConfig())
    return p


def build(config: dict):
    p = parser()
    return p.instantiate(p.parse_string(yaml.safe_dump(config)))


@pytest.mark.parametrize(
    "class_path, init_args, expected",
    [
        ("hs_star_pl.budget.HierarchicalBudget", {"samples_per_problem": 8, "n_presample": 3}, HierarchicalBudget(8, 3)),
        ("hs_star_pl.budget.UniformBudget", {"samples_per_problem": 8}, UniformBudget(8)),
        ("hs_star_pl.budget.ProportionalBudget", {"no_boundary": "uniform"}, ProportionalBudget(no_boundary="uniform")),
    ],
)
def test_allocators_are_chosen_by_class_path(class_path, init_args, expected):
    cfg = build({"budget": {"class_path": class_path, "init_args": init_args}})
    assert cfg.budget == expected


def test_difficulty_and_selection_groups_parse_with_ablation_values():
    cfg = build(
        {
            "budget": {"class_path": "hs_star_pl.budget.HierarchicalBudget"},
            "difficulty": {"mode": "reward_only", "tau_low": 0.15, "tau_high": 0.65, "calibration": [0.2, 0.8]},
            "selection": {"train_classes": ["inlier", "boundary"], "objective": "sft"},
        }
    )
    assert cfg.difficulty == DifficultyConfig("reward_only", 0.15, 0.65, (0.2, 0.8))
    assert cfg.selection == SelectionConfig(("inlier", "boundary"), "sft")


def test_contradictory_values_fail_with_the_key():
    with pytest.raises(ValueError, match=r"budget.n_presample \(3\) must be <= budget.samples_per_problem \(2\)"):
        build({"budget": {"class_path": "hs_star_pl.budget.HierarchicalBudget", "init_args": {"samples_per_problem": 2}}})
    with pytest.raises(Exception, match="has no attribute 'Nope'"):
        build({"budget": {"class_path": "hs_star_pl.budget.Nope"}})
    with pytest.raises(Exception, match="difficulty.mode"):
        build({"budget": {"class_path": "hs_star_pl.budget.UniformBudget"}, "difficulty": {"mode": "vibes"}})
