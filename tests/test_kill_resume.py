"""SIGKILL the self-training loop at each named fault point, resume with ``--ckpt_path last``.

Each case runs the real CLI in a subprocess with ``HS_STAR_FAULT=<point>@<k>`` (see
``hs_star_pl/infra/faults.py``), checks that the kill landed there and that no round was left
half-written, resumes, and compares everything with one uninterrupted run of the same seeds
(shared by the module): round artifacts and HF exports byte for byte, summaries, logged
metrics. The fault trace shows that nothing saved before the kill was computed again.
About 25 s per case on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from hs_star_pl.core.artifacts import DONE, completed_rounds, round_dir
from hs_star_pl.infra.faults import POINTS, read_trace
from hs_star_pl.infra.preemption import exit_status
from tests.helpers.kill_resume import (
    KILLED,
    STOPPED,
    compare_runs,
    half_written_rounds,
    leftover_temporaries,
    log_tail,
    missing_work,
    redone_work,
    run,
    run_args,
)
from tests.helpers.self_training import env
from tests.helpers.tiny_setup import REPO

# point@k: the k-th time (0-based) the killed process reaches the point; "last" is resolved
# from the uninterrupted run (how many training steps there are depends on the pairs found).
CASES = {
    "presample@1": "round 1's pre-samples generated (iteration 0 trained and checkpointed)",
    "prm@0": "round 0's pre-samples generated and saved, their verdicts and PRM scores not",
    "resample@1": "round 1's re-samples generated",
    "reference_logps@0": "round 0's reference log-probs computed",
    "round_write@1": "round 1's artifacts written, summary and DONE not",
    "training_step@last": "the last optimizer step of iteration 1",
    "checkpoint@0": "iteration 0's checkpoint written to its temporary file",
    "export@1": "iteration 1's HF export written to its temporary folder",
}
DEFAULT_TIER_CASE = "checkpoint@0"
"""The one fault case in the default tier (about a minute); the others are integration tests."""


def test_every_fault_point_is_covered():
    assert {case.split("@")[0] for case in CASES} == set(POINTS)


@pytest.fixture(scope="module")
def reference(tiny_m0, tmp_path_factory):
    m0, problems = tiny_m0
    cwd = tmp_path_factory.mktemp("uninterrupted")
    trace = cwd / "trace.jsonl"
    rc = run(run_args(cwd / "run", m0, problems), cwd, trace=trace)
    assert rc == 0, log_tail(cwd)
    assert completed_rounds(cwd / "run") == [0, 1]
    for t in (0, 1):  # every fault point is reached only if both rounds have pairs to train on
        assert json.loads((round_dir(cwd / "run", t) / "summary.json").read_text())["n_pairs"] > 0
    return cwd / "run", read_trace(trace)


@pytest.mark.parametrize("fault", [
    pytest.param(f, id=f, marks=() if f == DEFAULT_TIER_CASE else pytest.mark.integration) for f in CASES
])
def test_a_run_killed_at_a_fault_point_resumes_to_the_uninterrupted_result(fault, reference, tiny_m0, tmp_path):
    ref_run, ref_trace = reference
    m0, problems = tiny_m0
    run_dir, trace = tmp_path / "run", tmp_path / "trace.jsonl"
    args = run_args(run_dir, m0, problems)
    point, k = fault.split("@")
    if k == "last":
        k = str(sum(e["event"] == "reach" and e["point"] == point for e in ref_trace) - 1)
        fault = f"{point}@{k}"

    assert run(args, tmp_path, fault=fault, trace=trace) == KILLED, log_tail(tmp_path)
    killed = read_trace(trace)
    assert (killed[-1]["event"], killed[-1]["point"], killed[-1]["k"]) == ("reach", point, int(k))
    assert half_written_rounds(run_dir) == []
    finished = {p: p.stat().st_mtime_ns for t in completed_rounds(run_dir) for p in round_dir(run_dir, t).iterdir()}

    assert run([*args, "--ckpt_path=last"], tmp_path, trace=trace) == 0, log_tail(tmp_path)
    assert compare_runs(ref_run, run_dir) == []
    assert {p: p.stat().st_mtime_ns for p in finished} == finished, "a finished round was rewritten"
    events = read_trace(trace)
    assert redone_work(events) == []
    assert missing_work(ref_trace, events) == []
    assert leftover_temporaries(run_dir) == []
    assert all((round_dir(run_dir, t) / DONE).is_file() for t in (0, 1))


@pytest.mark.integration
def test_killed_during_round_1_rollouts_and_again_during_training(reference, tiny_m0, tmp_path):
    """One run SIGKILLed twice: while round 1 samples (its pre-samples generated, not saved),
    then, resumed, in the middle of iteration 1's training; resumed again, it ends with the
    uninterrupted run's round artifacts, exports and metrics, and nothing saved was redone."""
    ref_run, ref_trace = reference
    m0, problems = tiny_m0
    run_dir, trace = tmp_path / "run", tmp_path / "trace.jsonl"
    args = run_args(run_dir, m0, problems)
    steps_1 = sum(e["event"] == "reach" and e["point"] == "training_step" and e["epoch"] == 1 for e in ref_trace)
    assert steps_1 >= 2, "iteration 1 needs two training steps to be killed between them"

    assert run(args, tmp_path, fault="presample@1", trace=trace) == KILLED, log_tail(tmp_path)
    assert (read_trace(trace)[-1]["point"], read_trace(trace)[-1]["iteration"]) == ("presample", 1)
    assert not (round_dir(run_dir, 1) / "presample_generated.jsonl").exists()
    # the resumed process counts from 0 again: its training steps are all iteration 1's
    second = f"training_step@{steps_1 // 2}"
    assert run([*args, "--ckpt_path=last"], tmp_path, fault=second, trace=trace) == KILLED, log_tail(tmp_path)
    last = read_trace(trace)[-1]
    assert (last["point"], last["epoch"]) == ("training_step", 1)
    assert completed_rounds(run_dir) == [0, 1] and not (run_dir / "hf" / "policy_002").exists()

    assert run([*args, "--ckpt_path=last"], tmp_path, trace=trace) == 0, log_tail(tmp_path)
    assert compare_runs(ref_run, run_dir) == []
    events = read_trace(trace)
    assert redone_work(events) == []
    assert missing_work(ref_trace, events) == []
    assert leftover_temporaries(run_dir) == []
    assert half_written_rounds(run_dir) == []


def test_resuming_a_finished_run_changes_nothing(reference, tiny_m0, tmp_path):
    """A kill after the last checkpoint (during teardown) leaves a finished run; resuming it
    must neither redo work nor log a round's metrics a second time (the soak found that)."""
    ref_run, ref_trace = reference
    m0, problems = tiny_m0
    run_dir, trace = tmp_path / "run", tmp_path / "trace.jsonl"
    shutil.copytree(ref_run, run_dir)
    assert run([*run_args(run_dir, m0, problems), "--ckpt_path=last"], tmp_path, trace=trace) == 0, log_tail(tmp_path)
    assert compare_runs(ref_run, run_dir) == []
    assert not trace.exists(), "the resumed run reached a fault point: it did work again"


# -- stop signals: SIGTERM (to the main process or its whole group) and SLURM's requeue signal ------

# point@k:SIGNAL[:group] (HS_STAR_SIGNAL): the signal is sent when the run reaches the point;
# ":group" sends it to the whole process group, as SLURM, Kubernetes and docker stop do.
SIGNAL_CASES = {
    "resample@0:SIGTERM:group": "round 0's re-samples generated: the round stops there, unsaved",
    "prm@2:SIGTERM": "round 1's pre-samples scored (only the main process is signalled)",
    "training_step@0:SIGTERM:group": "the first optimizer step of iteration 0, not the last of its epoch",
    "checkpoint@0:SIGTERM": "iteration 0's checkpoint being written: it finishes, round 1 never starts",
}


def _stops_at(trace, point: str, k: int) -> None:
    """The stopped process reached ``point`` for the k-th time and then began no other unit of work."""
    events = read_trace(trace)
    reached = [e for e in events if e["event"] == "reach"]
    assert (reached[-1]["point"], reached[-1]["k"]) == (point, k), f"work went on after the stop signal: {reached[-1]}"


@pytest.mark.integration
@pytest.mark.parametrize("case", list(SIGNAL_CASES), ids=list(SIGNAL_CASES))
def test_a_stop_signal_stops_the_run_at_once_and_it_resumes_to_the_uninterrupted_result(case, reference, tiny_m0, tmp_path):
    """SIGTERM is a stop, not a suggestion: the run ends at the next safe point with exit status
    143 (before: sampling ran to the end of the round, then a training step, then exit 0), leaves
    nothing half-written and no process behind, and resumes byte for byte."""
    ref_run, ref_trace = reference
    m0, problems = tiny_m0
    run_dir, trace = tmp_path / "run", tmp_path / "trace.jsonl"
    args = run_args(run_dir, m0, problems)
    point, k = case.split(":")[0].split("@")

    assert run(args, tmp_path, send=case, trace=trace) == STOPPED, log_tail(tmp_path)
    _stops_at(trace, point, int(k))
    assert "hs-star: stopped by SIGTERM" in log_tail(tmp_path)
    assert half_written_rounds(run_dir) == []
    assert not (run_dir / "hs-star.lock").exists()

    assert run([*args, "--ckpt_path=last"], tmp_path, trace=trace) == 0, log_tail(tmp_path)
    assert compare_runs(ref_run, run_dir) == []
    events = read_trace(trace)
    assert redone_work(events) == []
    assert missing_work(ref_trace, events) == []
    assert leftover_temporaries(run_dir) == []


MATH_VERIFY = ["--self_training.verifier.class_path=hs_star_pl.verifiers.MathVerifyVerifier",
               "--self_training.verifier.init_args.n_workers=1"]


@pytest.fixture(scope="module")
def reference_math_verify(tiny_m0, tmp_path_factory):
    m0, problems = tiny_m0
    cwd = tmp_path_factory.mktemp("uninterrupted_math_verify")
    assert run(run_args(cwd / "run", m0, problems, *MATH_VERIFY), cwd) == 0, log_tail(cwd)
    return cwd / "run"


@pytest.mark.integration
@pytest.mark.parametrize("check", [3, 60])
def test_sigterm_to_the_group_mid_answer_check_is_not_a_verdict(check, reference_math_verify, tiny_m0, tmp_path):
    """SIGTERM to the process group kills the math-verify worker in the middle of a check. That
    check used to be stored as *ungradeable* and the round went on and was saved, so the resumed
    run's scores, difficulty and ``round/presample_accuracy`` differed from an uninterrupted run.
    A check cut short by a stop is not a verdict: the run stops, and the resumed run grades it."""
    m0, problems = tiny_m0
    run_dir = tmp_path / "run"
    args = run_args(run_dir, m0, problems, *MATH_VERIFY)
    assert run(args, tmp_path, send=f"worker_task@{check}:SIGTERM:group") == STOPPED, log_tail(tmp_path)
    assert half_written_rounds(run_dir) == []
    assert run([*args, "--ckpt_path=last"], tmp_path) == 0, log_tail(tmp_path)
    assert compare_runs(reference_math_verify, run_dir) == []


@pytest.mark.integration
@pytest.mark.vllm
def test_sigterm_to_the_group_stops_the_vllm_engine_process_with_the_run(tiny_m0, tmp_path):
    """vLLM's engine core is a process of its own: a SIGTERM to the group reaches it too. The run
    still stops as stopped (143, not an engine error), no process outlives it (``run`` checks),
    and the resumed run reuses round 0's finished pre-samples and completes."""
    pytest.importorskip("vllm")
    m0, problems = tiny_m0
    run_dir, trace = tmp_path / "run", tmp_path / "trace.jsonl"
    args = run_args(run_dir, m0, problems, "-c", str(REPO / "configs" / "engine" / "vllm.yaml"),
                    "--self_training.engine.init_args.dtype=float32",
                    "--self_training.engine.init_args.enable_sleep_mode=false")
    assert run(args, tmp_path, send="resample@0:SIGTERM:group", trace=trace) == STOPPED, log_tail(tmp_path)
    _stops_at(trace, "resample", 0)
    presamples = round_dir(run_dir, 0) / "presample_scored.jsonl"
    before = presamples.stat().st_mtime_ns
    assert run([*args, "--ckpt_path=last"], tmp_path, trace=trace) == 0, log_tail(tmp_path)
    assert completed_rounds(run_dir) == [0, 1] and presamples.stat().st_mtime_ns == before


SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "hs-star-test",
             "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "localhost"}


@pytest.mark.integration
@pytest.mark.parametrize("case", ["resample@0:SIGUSR1", "training_step@0:SIGUSR1"])
def test_slurm_requeue_signal_stops_requeues_and_resumes(case, reference, tiny_m0, tmp_path, monkeypatch):
    """Under SLURM (Lightning's ``SLURMEnvironment``, ``auto_requeue`` on by default) SIGUSR1 is
    Lightning's requeue signal. The run stops at its next safe point (not mid-round from inside the
    handler, as Lightning's own handler saves an "hpc" checkpoint), exits 138, runs
    ``scontrol requeue <job>``, and the requeued job resumes to the uninterrupted result."""
    ref_run, _ = reference
    m0, problems = tiny_m0
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run_dir, trace = tmp_path / "run", tmp_path / "trace.jsonl"
    args = run_args(run_dir, m0, problems)

    assert run(args, tmp_path, send=case, trace=trace) == exit_status(signal.SIGUSR1), log_tail(tmp_path)
    point, k = case.split(":")[0].split("@")
    _stops_at(trace, point, int(k))
    assert calls.read_text().split() == ["requeue", "4242"]
    assert not list(run_dir.rglob("hpc_ckpt_*.ckpt"))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert run([*args, "--ckpt_path=last"], tmp_path, trace=trace) == 0, log_tail(tmp_path)
    assert compare_runs(ref_run, run_dir) == []
    assert calls.read_text().split() == ["requeue", "4242"]  # a finished run is not requeued


@pytest.mark.integration
def test_sigusr1_outside_slurm_stops_at_a_safe_point_and_resumes(reference, tiny_m0, tmp_path):
    """Outside SLURM, SIGUSR1's default action ended the run with no message; it is a stop
    request like SIGTERM (exit status 138, no requeue), and the run resumes to the uninterrupted result."""
    ref_run, _ = reference
    m0, problems = tiny_m0
    run_dir, trace = tmp_path / "run", tmp_path / "trace.jsonl"
    args = run_args(run_dir, m0, problems)
    assert run(args, tmp_path, send="resample@0:SIGUSR1", trace=trace) == exit_status(signal.SIGUSR1), log_tail(tmp_path)
    _stops_at(trace, "resample", 0)
    log = (tmp_path / "run.log").read_text(errors="replace")
    assert "hs-star: received SIGUSR1; stopping at the next safe point" in log
    assert "hs-star: stopped by SIGUSR1 during " in log and "Traceback" not in log
    assert run([*args, "--ckpt_path=last"], tmp_path, trace=trace) == 0, log_tail(tmp_path)
    assert compare_runs(ref_run, run_dir) == []


def test_the_soak_script_starts():
    """``scripts/soak.py`` (random kills, many trials; its output is in docs/reliability.md)."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "soak.py"), "--help"], env=env(), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--trials" in out.stdout and "--max-kills" in out.stdout
