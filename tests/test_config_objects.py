"""The pure layer's settings build from YAML through jsonargparse, as the CLI will build them."""

from __future__ import annotations

import pytest
import yaml
from jsonargparse import ArgumentParser

from hs_star_pl.core.budget import BudgetAllocator, HierarchicalBudget, ProportionalBudget, UniformBudget
from hs_star_pl.core.difficulty import DifficultyConfig
from hs_star_pl.core.selection import SelectionConfig


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
        ("hs_star_pl.core.budget.HierarchicalBudget", {"samples_per_problem": 8, "n_presample": 3}, HierarchicalBudget(8, 3)),
        ("hs_star_pl.core.budget.UniformBudget", {"samples_per_problem": 8}, UniformBudget(8)),
        ("hs_star_pl.core.budget.ProportionalBudget", {"no_boundary": "uniform"}, ProportionalBudget(no_boundary="uniform")),
    ],
)
def test_allocators_are_chosen_by_class_path(class_path, init_args, expected):
    cfg = build({"budget": {"class_path": class_path, "init_args": init_args}})
    assert cfg.budget == expected


def test_difficulty_and_selection_groups_parse_with_ablation_values():
    cfg = build(
        {
            "budget": {"class_path": "hs_star_pl.core.budget.HierarchicalBudget"},
            "difficulty": {"mode": "reward_only", "tau_low": 0.15, "tau_high": 0.65, "calibration": [0.2, 0.8]},
            "selection": {"train_classes": ["inlier", "boundary"], "objective": "sft"},
        }
    )
    assert cfg.difficulty == DifficultyConfig("reward_only", 0.15, 0.65, (0.2, 0.8))
    assert cfg.selection == SelectionConfig(("inlier", "boundary"), "sft")


def test_contradictory_values_fail_with_the_key():
    with pytest.raises(ValueError, match=r"budget.n_presample \(3\) must be <= budget.samples_per_problem \(2\)"):
        build({"budget": {"class_path": "hs_star_pl.core.budget.HierarchicalBudget", "init_args": {"samples_per_problem": 2}}})
    with pytest.raises(Exception, match="has no attribute 'Nope'"):
        build({"budget": {"class_path": "hs_star_pl.core.budget.Nope"}})
    with pytest.raises(Exception, match="difficulty.mode"):
        build({"budget": {"class_path": "hs_star_pl.core.budget.UniformBudget"}, "difficulty": {"mode": "vibes"}})


def test_problem_field_mapping_reaches_the_pool_from_the_cli(tmp_path, monkeypatch):
    """``self_training.problem_fields`` maps a pool whose rows use other names (``q``, ``a``,
    ``uid``) through the real CLI; without the mapping the same file fails at its first line."""
    import json

    from hs_star_pl.training.self_training import SelfTrainingCallback
    from hs_star_pl.cli import HSStarCLI
    from hs_star_pl.core.problems import ProblemFileError
    from tests.helpers.tiny_setup import REPO

    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["hs-star"])  # the CLI reads only ``args``
    pool_file = tmp_path / "pool.jsonl"
    pool_file.write_text("".join(json.dumps({"uid": f"u{i}", "q": f"{i} + 1 = ?", "a": f"#### {i + 1}"}) + "\n" for i in range(20)))

    def callback(*extra):
        args = ["-c", "configs/base.yaml", "-c", "configs/debug/tiny_self_training.yaml",
                f"--self_training.problems_file={pool_file}", f"--trainer.default_root_dir={tmp_path}", *extra]
        cli = HSStarCLI(args=args, run=False)
        return next(c for c in cli.trainer.callbacks if isinstance(c, SelfTrainingCallback))

    mapped = callback("--self_training.problem_fields.question_key=q", "--self_training.problem_fields.answer_key=a",
                      "--self_training.problem_fields.id_key=uid")
    pool = mapped.load_pool()
    assert [(p.id, p.question, p.answer) for p in pool.problems[:2]] == [("u0", "0 + 1 = ?", "1"), ("u1", "1 + 1 = ?", "2")]
    assert len(pool.draw(1)) == 10  # problems_per_iteration of the debug config
    with pytest.raises(ProblemFileError, match=r"pool.jsonl:1: no question field"):
        callback().load_pool()


@pytest.mark.parametrize("temperature", [float("nan"), float("inf")])
def test_a_non_finite_temperature_is_refused_by_the_sampling_settings_themselves(temperature):
    """Built in Python, without the CLI's check of every float: ``nan < 0`` is false, and a NaN
    temperature used to pass and make sampling greedy."""
    from hs_star_pl.core.protocols import SamplingParams

    with pytest.raises(ValueError, match=f"sampling.temperature must be a finite number, got {temperature}"):
        SamplingParams(temperature=temperature)
