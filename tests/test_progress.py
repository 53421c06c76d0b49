"""Plain progress lines (``hs_star_pl.training.progress.ProgressLog``) when output goes to a file."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hs_star_pl.infra.progress import format_seconds
from hs_star_pl.training.progress import ProgressLog
from tests.helpers.self_training import env
from tests.helpers.tiny_setup import REPO

CONFIGS = REPO / "configs"


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (9.4, "9s"), (75, "1m15s"), (600, "10m00s"), (3725, "1h02m05s")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_every_n_seconds_must_be_positive():
    with pytest.raises(ValueError, match="progress.every_n_seconds"):
        ProgressLog(every_n_seconds=0)


def test_shipped_stepwise_init_config_prints_whole_progress_lines_into_a_file(tmp_path):
    """``configs/tiny/stepwise_init.yaml`` (the demo's M_0 recipe, clamped to a few batches of a
    smaller model) with stdout and stderr written to a file: the Lightning bar is off, and the
    file still says how far training is, one whole line at a time."""
    problems = CONFIGS / "data" / "arith_stepwise.jsonl"
    log = tmp_path / "run.log"
    args = [
        sys.executable, "-m", "hs_star_pl", "fit",
        "-c", str(CONFIGS / "base.yaml"), "-c", str(CONFIGS / "tiny" / "stepwise_init.yaml"),
        f"--data.problems_file={problems}", "--data.batch_size=4", "--trainer.max_epochs=2",
        "--model.tiny.hidden_size=64", "--model.tiny.num_hidden_layers=1", "--model.tiny.num_attention_heads=2",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]
    with log.open("w") as out:
        done = subprocess.run(args, cwd=tmp_path, env=env(), stdout=out, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("progress:")]
    n = sum(1 for _ in problems.open()) // 4  # 20 problems, batch 4
    assert f"progress: epoch 1/2: training on {n} batches" in lines
    assert f"progress: epoch 2/2: training on {n} batches" in lines
    # the first batch of each epoch is reported at once, with its loss and speed
    first = [line for line in lines if line.startswith(f"progress: epoch 1/2, batch 1/{n}, loss ")]
    assert len(first) == 1 and "tokens/s" in first[0] and "left in it" in first[0]
    assert any(line.startswith(f"progress: epoch 2/2 done: {n} batches in ") and "mean loss" in line for line in lines)
    assert "\r" not in text.split("progress:", 1)[1]  # no carriage-return bar redraws in the file
