"""A stop during the training-time evaluation: honoured within one chunk, nothing graded is lost.

The two-iteration tiny loop (``tests/helpers/kill_resume.py``) with a held-out evaluation of 40
problems in chunks of 8 (five chunks per policy) runs the real CLI in a subprocess; SIGTERM is
sent to its process group when a chunk begins (``HS_STAR_SIGNAL=evaluating@k``, see
``hs_star_pl/infra/faults.py``) or while the export before the evaluation is written. The run
must exit with 143 without beginning another chunk, keep the chunks it finished, write the
epoch's checkpoint, and resume (``--ckpt_path last``) to the same results files as an
uninterrupted run, reusing the kept chunks instead of generating them again. About a minute
and a half per case on 2 busy cores.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hs_star_pl.infra.faults import read_trace
from tests.helpers.kill_resume import STOPPED, eval_results, leftover_temporaries, log_tail, run, run_args

EVAL_CHUNKS = 5
"""Chunks per evaluated policy: 40 problems, 8 per chunk."""

STOP_WITHIN_S = 30.0
"""Seconds from the signal to the process's end (SLURM's and Kubernetes' grace period); on these
loaded 2-core machines the interpreter's own exit takes about 5 of them."""


def eval_args(test_file: Path) -> list[str]:
    return [f"--evaluation.problems_file={test_file}", "--evaluation.max_new_tokens=64", "--evaluation.batch_size=8",
            "--evaluation.max_problems=40", "--evaluation.verifier.class_path=hs_star_pl.verifiers.ExactMatchVerifier"]


def held_out_of(problems: Path) -> Path:
    return problems.parent / "test.jsonl"


@pytest.fixture(scope="module")
def reference(tiny_m0, tmp_path_factory):
    m0, problems = tiny_m0
    cwd = tmp_path_factory.mktemp("uninterrupted_eval")
    assert run(run_args(cwd / "run", m0, problems, *eval_args(held_out_of(problems))), cwd,
               trace=cwd / "trace.jsonl") == 0, log_tail(cwd)
    return cwd / "run"


def _chunks_begun(trace: Path) -> list[tuple[int, int, int]]:
    """(process id, policy, chunk) of every evaluation chunk begun, in order."""
    return [(e["pid"], e["policy"], e["chunk"]) for e in read_trace(trace)
            if e["event"] == "begin" and e["point"] == "evaluating"]


def _stop_and_resume(case: str, tiny_m0, tmp_path: Path) -> tuple[Path, Path, list, float, list[str]]:
    """Stop the run with ``case`` (an ``HS_STAR_SIGNAL`` spec), resume it; returns its folder, the
    trace, the stopped process's events, seconds from the signal to its end, and the results
    files written when it stopped."""
    m0, problems = tiny_m0
    run_dir, trace = tmp_path / "run", tmp_path / "trace.jsonl"
    args = run_args(run_dir, m0, problems, *eval_args(held_out_of(problems)))
    assert run(args, tmp_path, send=case, trace=trace) == STOPPED, log_tail(tmp_path)
    ended = time.time()
    point, k = case.split(":")[0].split("@")
    signalled = next(e for e in read_trace(trace) if e["point"] == point and e["k"] == int(k))
    stopped = read_trace(trace)
    evaluated = sorted(str(p.relative_to(run_dir / "eval")) for p in (run_dir / "eval").rglob("policy_*.json"))
    assert "hs-star: stopped by SIGTERM" in log_tail(tmp_path)
    assert not (run_dir / "hs-star.lock").exists()
    assert run([*args, "--ckpt_path=last"], tmp_path, trace=trace) == 0, log_tail(tmp_path)
    return run_dir, trace, stopped, ended - signalled["t"], evaluated


def test_sigterm_mid_evaluation_stops_within_a_chunk_and_resumes_from_the_kept_chunks(reference, tiny_m0, tmp_path):
    """SIGTERM to the group as M_1's third chunk begins (iteration 0's end). Before, the run
    finished the whole evaluation, then the checkpoint, then exited; a resumed run that had
    lost the evaluation generated all of it again."""
    run_dir, trace, stopped, seconds, evaluated = _stop_and_resume(f"evaluating@{EVAL_CHUNKS + 2}:SIGTERM:group",
                                                                   tiny_m0, tmp_path)
    assert evaluated == ["test/policy_000.json"]
    assert seconds < STOP_WITHIN_S, f"stopped {seconds:.1f} s after the signal"
    begun = [e for e in stopped if e["event"] == "begin"]
    assert (begun[-2]["point"], begun[-2]["chunk"]) == ("evaluating", 2), "another chunk began after the signal"
    assert begun[-1]["point"] == "checkpointing" and begun[-1]["epoch"] == 0, "the epoch's checkpoint was not written"

    chunks = _chunks_begun(trace)
    first, resumed = chunks[0][0], [c[1:] for c in chunks if c[0] != chunks[0][0]]
    assert [c[1:] for c in chunks if c[0] == first][-3:] == [(1, 0), (1, 1), (1, 2)]
    # the resumed process generates M_1's unfinished chunks only, then M_2's
    assert resumed == [(1, 2), (1, 3), (1, 4)] + [(2, c) for c in range(EVAL_CHUNKS)]
    assert eval_results(run_dir) == eval_results(reference)
    assert not list((run_dir / "eval").rglob("*.chunks")), "the kept chunks outlived the finished evaluation"
    assert leftover_temporaries(run_dir) == []


@pytest.mark.integration
def test_sigterm_in_the_last_evaluation_is_finished_by_the_resumed_run(reference, tiny_m0, tmp_path):
    """The stop comes while the last policy (M_2) is evaluated: its checkpoint ends the training,
    so the resumed fit has no epoch to train and finishes the evaluation when it ends."""
    run_dir, trace, stopped, seconds, evaluated = _stop_and_resume(f"evaluating@{3 * EVAL_CHUNKS - 2}:SIGTERM",
                                                                   tiny_m0, tmp_path)
    assert evaluated == ["test/policy_000.json", "test/policy_001.json"]
    assert seconds < STOP_WITHIN_S, f"stopped {seconds:.1f} s after the signal"
    chunks = _chunks_begun(trace)
    resumed = [c[1:] for c in chunks if c[0] != chunks[0][0]]
    assert resumed == [(2, 3), (2, 4)]
    assert eval_results(run_dir) == eval_results(reference)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.integration
def test_sigterm_while_exporting_skips_the_evaluation_and_writes_the_checkpoint(reference, tiny_m0, tmp_path):
    """SIGTERM while iteration 0's export is written (before M_1's evaluation): the export and the
    checkpoint finish, the evaluation does not begin (before, all of it ran first), and the
    resumed run evaluates M_1 when its training starts."""
    run_dir, trace, stopped, seconds, evaluated = _stop_and_resume("export@0:SIGTERM", tiny_m0, tmp_path)
    assert evaluated == ["test/policy_000.json"], "M_1 was evaluated after the stop"
    assert seconds < STOP_WITHIN_S, f"stopped {seconds:.1f} s after the signal"
    assert [e["policy"] for e in stopped if e["point"] == "evaluating"] == [0] * EVAL_CHUNKS
    assert any(e["point"] == "checkpoint" and e["event"] == "saved" for e in stopped)
    assert eval_results(run_dir) == eval_results(reference)
