"""Kill a self-training run, resume it, and judge the result against an uninterrupted run.

Shared by ``tests/test_kill_resume.py`` (kills at named fault points) and ``scripts/soak.py``
(kills at random points and times). A run is the two-iteration tiny loop of
``tests/helpers/self_training.py`` (24 problems per iteration, about 13 s on 2 cores).

What is judged, each returning a list of human-readable problems (empty = fine):

* ``half_written_rounds``: a round folder with ``DONE`` must hold every artifact, and every
  JSON/JSONL file in any round folder must parse completely (writes are atomic);
* ``compare_runs``: round artifacts and plots byte for byte, summaries without timings, the
  HF exports byte for byte, the evaluation results without timings, and every metric value the
  run logged equal to the uninterrupted run's at the same step;
* ``redone_work``: from the fault trace (``hs_star_pl.infra.faults``), work reached again after it
  was saved: a round phase, or a checkpoint; a training step or an export after its epoch's
  checkpoint was saved;
* ``leftover_temporaries``: temporary files still present once the run has finished.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hs_star_pl.core.artifacts import DONE, read_jsonl, round_dir
from hs_star_pl.infra.faults import FAULT_ENV, SIGNAL_ENV, TRACE_ENV
from hs_star_pl.infra.preemption import exit_status
from tests.helpers.self_training import env, self_training_args

N_ITERATIONS = 2
ROUND_FILES = ["problems.jsonl", "presample_generated.jsonl", "presample_scored.jsonl", "resample_generated.jsonl",
               "resample_scored.jsonl", "reference_logps.jsonl", "rollouts.jsonl", "difficulty.jsonl", "ledger.json",
               "pairs.jsonl"]
COMPLETE_ROUND = ["problems.jsonl", "rollouts.jsonl", "difficulty.jsonl", "ledger.json", "summary.json"]
ROUND_POINTS = {"presample", "prm", "resample", "reference_logps", "round_write"}
COMPARED_METRICS = ("train/loss_epoch", "train/reward_accuracy_epoch", "train/margin_epoch", "round/n_pairs",
                    "round/n_boundary", "round/samples_total", "round/presample_accuracy")
KILLED = -signal.SIGKILL
STOPPED = exit_status(signal.SIGTERM)
"""A run stopped by SIGTERM at a safe point (128 + 15)."""


def run_args(run: Path, m0: Path, problems: Path, *extra: str) -> list[str]:
    return self_training_args(run, m0, problems, *extra)


def start(args: Sequence[str], cwd: Path, *, fault: str | None = None, trace: Path | None = None,
          send: str | None = None) -> subprocess.Popen:
    """Start ``hs-star`` with an optional ``HS_STAR_FAULT``, ``HS_STAR_SIGNAL`` and ``HS_STAR_TRACE``;
    output to ``cwd/run.log``. It leads its own process group (as a scheduler's job does), so
    a signal to that group reaches it and its helper processes and nothing else."""
    extra = {}
    if fault:
        extra[FAULT_ENV] = fault
    if send:
        extra[SIGNAL_ENV] = send
    if trace:
        extra[TRACE_ENV] = str(trace)
    log = open(cwd / "run.log", "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "hs_star_pl", *args], cwd=cwd, env=env(**extra),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def run(args: Sequence[str], cwd: Path, *, fault: str | None = None, trace: Path | None = None,
        kill_after_s: float | None = None, send: str | None = None, signal_after_s: float | None = None,
        signum: int = signal.SIGTERM, group: bool = False, timeout: float = 900) -> int:
    """Run ``hs-star`` to its end; returns the exit status.

    ``kill_after_s``: SIGKILL it then. ``signal_after_s``: send it ``signum`` then, to the main
    process or with ``group`` to its whole process group (workers and children included).
    ``send``: an ``HS_STAR_SIGNAL`` spec (a signal at a named point). Whatever is left of the
    process group when the main process ends is SIGKILLed (a test must not leak processes).
    """
    proc = start(args, cwd, fault=fault, trace=trace, send=send)
    deadline = time.monotonic() + timeout
    kill_at = time.monotonic() + kill_after_s if kill_after_s is not None else None
    signal_at = time.monotonic() + signal_after_s if signal_after_s is not None else None
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if kill_at is not None and now >= kill_at:
                proc.kill()
            elif signal_at is not None and now >= signal_at:
                signal_at = None
                if group:
                    os.killpg(proc.pid, signum)
                else:
                    proc.send_signal(signum)
            elif now > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"hs-star did not finish within {timeout} s (log: {cwd / 'run.log'})")
            time.sleep(0.02)
    finally:
        left = leftover_group(proc.pid)
        grace = time.monotonic() + 10.0
        while left and time.monotonic() < grace:  # helper processes notice their parent is gone
            time.sleep(0.1)
            left = leftover_group(proc.pid)
        leftover_group(proc.pid, kill=True)
    if left:
        raise AssertionError(f"processes of the run outlived it by 10 s: {left} (log: {cwd / 'run.log'})")
    return proc.returncode


def leftover_group(pgid: int, kill: bool = False) -> list[int]:
    """The processes still in process group ``pgid`` (Linux ``/proc``); SIGKILL them if ``kill``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(stat.parent.name))
    if kill:
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return found


def log_tail(cwd: Path, n: int = 3000) -> str:
    path = cwd / "run.log"
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


# -- judging -----------------------------------------------------------------------------------


def _parses(path: Path) -> str | None:
    try:
        if path.suffix == ".jsonl":
            read_jsonl(path)
        else:
            json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        return f"{path}: does not parse ({err})"
    return None


def half_written_rounds(run_dir: Path) -> list[str]:
    problems = []
    for directory in sorted((run_dir / "rounds").glob("round_*")):
        for path in sorted(directory.iterdir()):
            if path.suffix in (".json", ".jsonl") and not path.name.startswith("."):
                if (why := _parses(path)) is not None:
                    problems.append(why)
        if (directory / DONE).is_file():
            examples = (directory / "pairs.jsonl").is_file() or (directory / "sft.jsonl").is_file()
            missing = [n for n in COMPLETE_ROUND if not (directory / n).is_file()] + ([] if examples else ["pairs.jsonl"])
            if missing:
                problems.append(f"{directory} has {DONE} but lacks {missing}")
    return problems


def metrics_by_step(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every logged value of ``COMPARED_METRICS`` by global step, over all logger versions (later win)."""
    out: dict[str, dict[int, float]] = {}
    versions = sorted((run_dir / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for version in versions:
        path = version / "metrics.csv"
        if not path.is_file():
            continue
        with path.open() as fh:
            for row in csv.DictReader(fh):
                for key in COMPARED_METRICS:
                    if row.get(key):
                        out.setdefault(key, {})[int(row["step"])] = float(row[key])
    return out


def _differs(a: Path, b: Path) -> bool:
    """Whether two files differ (one missing counts); plots are rendered deterministically."""
    return a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes())


def _summary(path: Path) -> dict[str, Any]:
    summary = json.loads(path.read_text())
    return {k: v for k, v in summary.items() if not k.startswith("seconds") and not k.startswith("canary")}


def compare_runs(reference: Path, other: Path, n_iterations: int = N_ITERATIONS) -> list[str]:
    problems = []
    for t in range(n_iterations):
        ref_dir, dir_ = round_dir(reference, t), round_dir(other, t)
        if not (dir_ / DONE).is_file():
            problems.append(f"round {t} is not complete")
            continue
        for name in ROUND_FILES:
            a, b = ref_dir / name, dir_ / name
            if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
                problems.append(f"round {t} {name} differs from the uninterrupted run")
        if _differs(ref_dir / "difficulty.png", dir_ / "difficulty.png"):
            problems.append(f"round {t} difficulty.png differs from the uninterrupted run")
        if _summary(ref_dir / "summary.json") != _summary(dir_ / "summary.json"):
            problems.append(f"round {t} summary.json differs from the uninterrupted run")
        ref_weights = reference / "hf" / f"policy_{t + 1:03d}" / "model.safetensors"
        weights = other / "hf" / f"policy_{t + 1:03d}" / "model.safetensors"
        if not weights.is_file() or weights.read_bytes() != ref_weights.read_bytes():
            problems.append(f"hf/policy_{t + 1:03d} weights differ from the uninterrupted run")
    if eval_results(reference) != eval_results(other):
        problems.append("the evaluation results (eval/) differ from the uninterrupted run's")
    if _differs(reference / "rounds" / "accuracy.png", other / "rounds" / "accuracy.png"):
        problems.append("rounds/accuracy.png differs from the uninterrupted run (every iteration must be plotted)")
    ref_metrics, metrics = metrics_by_step(reference), metrics_by_step(other)
    for key, values in metrics.items():
        for step, value in values.items():
            if ref_metrics.get(key, {}).get(step) != value:
                problems.append(f"{key} at step {step} is {value}, uninterrupted: {ref_metrics.get(key, {}).get(step)}")
    last = max(ref_metrics.get("train/loss_epoch", {None: None}))  # None: no pairs, nothing trained
    if last is not None and last not in metrics.get("train/loss_epoch", {}):
        problems.append("the last epoch's train/loss_epoch was not logged")
    return problems


def eval_results(run_dir: Path) -> dict[str, Any]:
    """Every results file of the run's evaluations (``eval/``), without timings."""
    def untimed(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if k != "seconds"}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    return {str(path.relative_to(run_dir)): untimed(json.loads(path.read_text()))
            for path in sorted((run_dir / "eval").rglob("*.json"))}


def _unit(event: dict[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in event.items() if k not in ("event", "k", "pid", "t")))


def redone_work(events: Sequence[dict[str, Any]]) -> list[str]:
    """Work reached again after it was persisted (see the module docstring), from a trace."""
    saved: set[tuple] = set()
    checkpointed: set[int] = set()
    problems = []
    for e in events:
        point = e["point"]
        if e["event"] == "saved":
            saved.add(_unit(e))
            if point == "checkpoint":
                checkpointed.add(e["epoch"])
            continue
        if (point in ROUND_POINTS or point == "checkpoint") and _unit(e) in saved:
            problems.append(f"{point} {dict(_unit(e))} was done again after it was saved")
        elif point == "training_step" and e["epoch"] in checkpointed:
            problems.append(f"training step {e['batch']} of epoch {e['epoch']} ran again after the epoch's checkpoint")
        elif point == "export" and int(e["name"].rsplit("_", 1)[1]) in checkpointed:
            problems.append(f"export {e['name']} was redone after its epoch's checkpoint was saved")
    return problems


def leftover_temporaries(run_dir: Path) -> list[str]:
    return [str(p) for p in run_dir.rglob("*.tmp")]


def missing_work(reference_events: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]]) -> list[str]:
    """Work the uninterrupted run did (``reach`` events) that no process of this run did."""
    done = {_unit(e) for e in events if e["event"] == "reach"}
    return [f"{e['point']} {dict(_unit(e))} never ran" for e in reference_events
            if e["event"] == "reach" and _unit(e) not in done]
