"""The benchmark scripts run end to end in their ``--quick`` mode (no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("verify_throughput.py", "math-verify, warm cache"),
        ("prm_throughput.py", "QwenMathPRM"),
        # ZeRO-3 steps, lockstep reference log-probs, gathered export reloaded with equal logits
        ("gpu_validation.py", '"max_logit_gap_vs_policy": 0.0'),
    ],
)
def test_benchmark_runs_quick(script, expected, tmp_path):
    extra = []
    if script == "gpu_validation.py":
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (extra [deepspeed])")
        extra = ["--stage", "3", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout
