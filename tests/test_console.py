"""What a user sees on the console: one line per round, time-based progress lines in every
phase, and none of the library noise they cannot act on (a real ``hs-star`` process)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hs_star_pl.infra.progress import TimedLines, progress, set_progress_lines
from hs_star_pl.training.self_training import round_line
from tests.helpers.tiny_setup import REPO

# Printed by Lightning, DeepSpeed and torch on every run, with nothing for a user to change.
NOISE = ["💡 Tip", "LeafSpec", "Total length of `list` across ranks is zero", "transfer_batch_to_device",
         "Setting accelerator to CPU", "Lightning Trainer"]

FAST_PROGRESS = """\
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, save_top_k: 0}
    - class_path: hs_star_pl.training.progress.ProgressLog
      init_args: {every_n_seconds: 0.01}
"""


def _hs_star(*args: str, cwd) -> str:
    out = subprocess.run([sys.executable, "-m", "hs_star_pl", *args], capture_output=True, text=True, cwd=cwd,
                         timeout=900, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_timed_lines_print_at_most_every_n_seconds():
    lines = []
    bar = TimedLines(10, "sampling", "sequence", every=3600.0, emit=lines.append)
    bar.update(5)
    assert lines == []  # work shorter than the interval prints nothing
    bar.every = 1e-9
    bar.update(2)
    assert re.fullmatch(r"progress: sampling: 7/10 sequences, \d+s, about \d+s left", lines[0]), lines
    set_progress_lines(None)
    assert not isinstance(progress(10, "x", "y", shown=False), TimedLines)  # no run asked: silent
    set_progress_lines(5.0, lines.append)
    try:
        assert isinstance(progress(10, "x", "y", shown=False), TimedLines)
        assert not isinstance(progress(10, "x", "y", shown=True), TimedLines)  # the bar itself
    finally:
        set_progress_lines(None)


def test_round_line_is_one_human_line(tmp_path):
    summary = {"iteration": 2, "n_problems": 300, "n_dropped_ungradeable": 0, "n_inlier": 3, "n_boundary": 120,
               "n_outlier": 177, "samples_total": 2400, "n_pairs": 381, "n_sft_examples": 0,
               "presample_accuracy": 0.2411111111111111}
    assert round_line(summary, 75.4, tmp_path) == (
        "round 2: 300 problems, 3 inlier / 120 boundary / 177 outlier; 2400 samples; 381 pairs; pre-sample accuracy "
        f"24.1%; 1m15s (all numbers: {tmp_path / 'summary.json'})")


def test_the_demo_script_runs_the_demo_with_human_lines_and_no_library_noise(tmp_path):
    """The README's first command, ``bash scripts/demo.sh``, without its install step (this
    environment has the package; tests/test_demo_install.py runs the install), on one short
    iteration: what its console shows."""
    (tmp_path / "fast.yaml").write_text(FAST_PROGRESS)
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh"), "--no-install", "-c", str(tmp_path / "fast.yaml"),
         "--self_training.n_iterations=1", "--self_training.problems_per_iteration=12", "--evaluation.max_problems=6",
         f"--trainer.default_root_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
        env={"PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "== the demo: hs-star fit -c configs/tiny/hs_star.yaml" in text and "== torch" not in text
    results = (tmp_path / "run" / "results.md").read_text()
    assert "| M_0 |" in results and "| M_1 |" in results and (tmp_path / "run" / "results.png").is_file()
    for noise in NOISE:
        assert noise not in text, noise
    lines = text.splitlines()
    (line,) = [x for x in lines if x.startswith("round 0: 12 problems")]
    summary = json.loads((tmp_path / "run" / "rounds" / "round_000" / "summary.json").read_text())
    assert line.startswith(
        f"round 0: 12 problems, {summary['n_inlier']} inlier / {summary['n_boundary']} boundary / "
        f"{summary['n_outlier']} outlier; {summary['samples_total']} samples; {summary['n_pairs']} pairs; "
        f"pre-sample accuracy {100 * summary['presample_accuracy']:.1f}%; ")
    assert not any(x.startswith("round 0: {") for x in lines)  # the raw dump stays in summary.json
    # time-based lines in every phase: the round's sampling, the evaluation, training
    sampling = [i for i, x in enumerate(lines) if x.startswith("progress: HFEngine sampling: ")]
    assert sampling and sampling[0] < lines.index(line)
    assert any(x.startswith("progress: eval M_0 test: ") for x in lines)
    assert any(x.startswith("progress: epoch 1/1, batch ") for x in lines)


def test_hs_star_test_prints_one_table_row_per_benchmark(tmp_path):
    text = _hs_star("test", "-c", "configs/base.yaml", "-c", "configs/eval/tiny.yaml", "--model.model_path=data/tiny/m0",
                    "--evaluation.max_problems=4", f"--trainer.default_root_dir={tmp_path}", cwd=REPO)
    for noise in NOISE:
        assert noise not in text, noise
    assert "DataLoader" not in text and "┃" not in text  # Lightning's table: --verbose true
    assert re.search(r"^\| m0 \| tiny_test \| 4 \| 1 \| acc \| \d+\.\d \|", text, flags=re.M), text[-2000:]
    assert re.search(r"^\| m0 \| tiny_test_sampled \| 4 \| 4 \| avg@4 \| \d+\.\d \| pass@1 \d+\.\d, pass@4 \d+\.\d", text, flags=re.M)


@pytest.mark.vllm
def test_vllm_logs_warnings_only_unless_asked(tmp_path):
    pytest.importorskip("vllm")
    # the logging config an LLM and its engine-core process apply, from the environment
    code = ("from hs_star_pl.engines.vllm import _import_vllm; _import_vllm(); "
            "from vllm.config.logging import LoggingConfig; from vllm.logger import configure_logging, init_logger; "
            "configure_logging(LoggingConfig()); "
            "log = init_logger('vllm.hs_star_test'); log.info('INFO-LINE'); log.warning('WARNING-LINE')")
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "WARNING-LINE" in quiet.stdout + quiet.stderr and "INFO-LINE" not in quiet.stdout + quiet.stderr
    asked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**env, "VLLM_LOGGING_LEVEL": "INFO"})
    assert "INFO-LINE" in asked.stdout + asked.stderr
