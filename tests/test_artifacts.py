"""Round folders: atomic files, phase store reuse, DONE last, and a faithful read-back."""

from __future__ import annotations

import json
import os

import pytest

from hs_star_pl.core.artifacts import (
    RoundStore,
    atomic_write_text,
    completed_rounds,
    is_complete,
    read_jsonl,
    read_round,
    round_dir,
    write_round,
)
from tests.helpers.round_fakes import run


def test_round_folder_round_trips(tmp_path):
    result = run()
    directory = round_dir(tmp_path, 1)
    assert directory == tmp_path / "rounds" / "round_001"
    write_round(directory, result, extra_summary={"ref_logp_seconds": 1.5})
    assert is_complete(directory) and completed_rounds(tmp_path) == [1]
    again = read_round(directory)
    assert again.examples == result.examples
    assert again.ledger == result.ledger
    assert again.difficulties == result.difficulties
    assert [r.to_dict() for r in again.rollouts] == [r.to_dict() for r in result.rollouts]
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["samples_total"] == summary["budget_total"] == 40
    assert summary["ref_logp_seconds"] == 1.5 and summary["dropped_problem_ids"] == ["bad"]
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_round_store_makes_a_killed_round_resumable(tmp_path):
    directory = round_dir(tmp_path, 1)
    first = run(store=RoundStore(directory))
    assert {p.name for p in directory.iterdir()} == {
        "presample_generated.jsonl", "presample_scored.jsonl", "resample_generated.jsonl", "resample_scored.jsonl",
    }
    assert not is_complete(directory) and completed_rounds(tmp_path) == []

    class Refusing:
        def generate(self, requests, params):
            raise AssertionError("finished phase regenerated")

    (directory / "resample_scored.jsonl").unlink()  # killed while scoring re-samples
    again = run(store=RoundStore(directory), engine=Refusing())
    assert again.examples == first.examples


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_read_round_refuses_incomplete_and_bad_lines_name_the_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no DONE marker"):
        read_round(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n{broken\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2: invalid JSON"):
        read_jsonl(tmp_path / "a.jsonl")
