"""SIGKILL the self-training loop at each named fault point, resume with ``--ckpt_path last``.

Each case runs the real CLI in a subprocess with ``HS_STAR_FAULT=<point>@<k>`` (see
``hs_star_pl/faults.py``), checks that the kill landed there and that no round was left
half-written, resumes, and compares everything with one uninterrupted run of the same seeds
(shared by the module): round artifacts and HF exports byte for byte, summaries, logged
metrics. The fault trace shows that nothing saved before the kill was computed again.
About 25 s per case on 2 cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from hs_star_pl.artifacts import DONE, completed_rounds, round_dir
from hs_star_pl.faults import POINTS, read_trace
from tests.helpers.kill_resume import (
    KILLED,
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


@pytest.mark.parametrize("fault", list(CASES), ids=list(CASES))
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
    assert completed_rounds(run_dir) == [0, 1] and not (run_dir / "hf" / "iteration_001").exists()

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


def test_the_soak_script_starts():
    """``scripts/soak.py`` (random kills, many trials; its output is in docs/reliability.md)."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "soak.py"), "--help"], env=env(), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--trials" in out.stdout and "--max-kills" in out.stdout
