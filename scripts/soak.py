"""Soak test: SIGKILL or SIGTERM the tiny self-training loop at random points and times, resume, compare.

Run from the repository root (about a minute per trial on 2 busy cores)::

    OMP_NUM_THREADS=1 python scripts/soak.py --trials 30 [--seed 0] [--max-kills 3] [--work /tmp/hs-star-soak] \
        [--verifier math-verify|exact]

Each trial starts a fresh run of the two-iteration tiny loop (``tests/helpers/kill_resume.py``)
and interrupts it, then interrupts each resumed process again with probability 1/2, up to
``--max-kills`` times, before letting it finish with ``--ckpt_path last``. An interruption is
one of (chosen uniformly):

* SIGKILL at a random named fault point and occurrence (``HS_STAR_FAULT``), or after a random
  delay between the uninterrupted run's first fault point (start-up is over) and 90% of its
  duration;
* SIGTERM at a random fault point (``HS_STAR_SIGNAL``) or after a random delay, sent to the
  main process only or to its whole process group (as SLURM, Kubernetes and ``docker stop``
  do: verifier workers included);
* SIGTERM to the group while a math-verify worker is in the middle of an answer check
  (``worker_task``; with ``--verifier math-verify``, the default).

A SIGKILLed process must end with SIGKILL; a SIGTERMed one must stop with exit status 143
(or 0 if the signal came after its work was done, or die of the signal if it came before
the handler was in place), and within ``--stop-within`` seconds of a timed signal. After every
interruption no round may be half-written and no process of the run may be left; at the end
the run must equal an uninterrupted run of the same seeds (round artifacts, HF exports,
logged metrics), no saved work may have been redone, and no temporary file may be left. M_0
is trained once into ``<work>/m0`` (about a minute) unless ``--m0`` and ``--problems`` are
given. The last line counts runs (processes), interruptions of each kind and mismatches; the
exit status is 1 when there is any mismatch.

``--phases`` times a stop in each phase of a run instead::

    OMP_NUM_THREADS=1 python scripts/soak.py --phases --trials 18 [--seed 0] [--work /tmp/hs-star-soak]

The run then also evaluates a held-out set (40 problems in chunks of 8) after every
iteration. Trial ``i`` takes phase ``i`` of the cycle start-up, sampling, checking,
reference_pass, training, exporting, evaluating, checkpointing, m0_child
(``hs_star_pl.infra.faults.PHASES``), waits for the run to begin that phase (a random
occurrence of its ``begin`` event in the trace; start-up: a random delay before the first
one), sends SIGTERM to the process group at a random moment in the first half of the phase
(its length taken from the uninterrupted run), and measures the time from the signal to the process's end. The
phase the signal landed in is read back from the trace (the last phase the main process had
begun). The run is then resumed to its end and judged as above. The ``m0_child`` trials run
a variant that trains M_0 in a child first (``stepwise_init``, a short SFT of 10 epochs) and
are compared with an uninterrupted run of that variant. The table at the end gives per phase
the signals, how many stopped with 143, and the median and maximum seconds to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATH_VERIFY = ["--self_training.verifier.class_path=hs_star_pl.verifiers.MathVerifyVerifier",
               "--self_training.verifier.init_args.n_workers=1"]
sys.path.insert(0, str(ROOT))

from hs_star_pl.infra.faults import PHASES, POINTS, read_trace  # noqa: E402
from tests.helpers.kill_resume import (  # noqa: E402
    KILLED,
    STOPPED,
    compare_runs,
    half_written_rounds,
    leftover_group,
    leftover_temporaries,
    log_tail,
    missing_work,
    redone_work,
    run,
    run_args,
    start,
)
from tests.helpers.self_training import train_m0  # noqa: E402


def landed(trace: Path, before: int) -> str:
    """Where the last kill landed: the last fault point the killed process reached."""
    events = read_trace(trace)[before:] if trace.is_file() else []
    reached = [e for e in events if e["event"] == "reach"]
    if not reached:
        return "before any fault point"
    last = reached[-1]
    labels = {k: v for k, v in last.items() if k not in ("event", "pid", "point", "k", "t")}
    saved = any(e["event"] == "saved" and e["point"] == last["point"] for e in events[events.index(last):])
    return f"{'after' if saved else 'at'} {last['point']} {labels}"


KINDS = {
    "kill-point": "SIGKILL at a fault point",
    "kill-delay": "SIGKILL after a delay",
    "term-point": "SIGTERM to the main process at a fault point",
    "term-group-point": "SIGTERM to the group at a fault point",
    "term-delay": "SIGTERM to the main process after a delay",
    "term-group-delay": "SIGTERM to the group after a delay",
    "term-group-check": "SIGTERM to the group in the middle of an answer check",
}
WORKER_TASKS = 60
"""``worker_task`` occurrences drawn from (the single math-verify worker's checks; round 0 alone has more)."""


def trial(index: int, rng: random.Random, work: Path, m0: Path, problems: Path, reference: Path,
          reference_events: list, ceiling: Counter, window: tuple[float, float], max_kills: int,
          extra: list[str], kinds: tuple[str, ...], stop_within: float, counts: Counter) -> tuple[int, int, list[str], list[str]]:
    """One interrupted-and-resumed run; returns (processes, interruptions, where they landed, problems)."""
    cwd = work / f"trial_{index:03d}"
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir(parents=True)
    trace = cwd / "trace.jsonl"
    args = run_args(cwd / "run", m0, problems, *extra)
    processes, kills, where, problems_found = 0, 0, [], []
    while True:
        kind, options, label = None, {}, ""
        if kills < max_kills and (kills == 0 or rng.random() < 0.5):
            kind = rng.choice(kinds)
            point = rng.choice(sorted(POINTS))
            at = f"{point}@{rng.randrange(ceiling[point])}"
            delay = rng.uniform(*window)
            group = "group" in kind
            if kind == "kill-point":
                options, label = {"fault": at}, at
            elif kind == "kill-delay":
                options, label = {"kill_after_s": delay}, f"SIGKILL after {delay:.1f} s"
            elif kind.endswith("-point"):
                spec = f"{at}:SIGTERM" + (":group" if group else "")
                options, label = {"send": spec}, spec
            elif kind.endswith("-delay"):
                options = {"signal_after_s": delay, "group": group}
                label = f"SIGTERM to the {'group' if group else 'main process'} after {delay:.1f} s"
            else:
                spec = f"worker_task@{rng.randrange(WORKER_TASKS)}:SIGTERM:group"
                options, label = {"send": spec}, spec
        n_events = len(read_trace(trace)) if trace.is_file() else 0
        started = time.monotonic()
        try:
            rc = run(args if processes == 0 else [*args, "--ckpt_path=last"], cwd, trace=trace, **options)
        except AssertionError as err:  # processes left behind, or no end in sight
            problems_found.append(f"process {processes + 1} ({label or 'no interruption'}): {err}")
            return processes + 1, kills, where, problems_found
        seconds = time.monotonic() - started
        processes += 1
        if rc == 0:
            if kind is not None:  # it ended before the interruption could land: the run is complete
                where.append(f"{label} -> finished first")
            break
        sigkill = kind is not None and kind.startswith("kill")
        expected = {KILLED} if sigkill else {STOPPED, -signal.SIGTERM}
        if kind is None or rc not in expected:
            problems_found.append(f"process {processes} ({label or 'no interruption'}) ended with exit status {rc}: "
                                  f"{log_tail(cwd, 800)}")
            return processes, kills, where, problems_found
        kills += 1
        counts[kind] += 1
        stop = ""
        if "signal_after_s" in options:
            latency = seconds - options["signal_after_s"]
            counts["stop latency max (s)"] = max(counts["stop latency max (s)"], round(latency, 1))
            stop = f", stopped {latency:.1f} s after the signal"
            if latency > stop_within:
                problems_found.append(f"process {processes} stopped {latency:.1f} s after SIGTERM (limit {stop_within} s)")
        where.append(f"{label} -> {landed(trace, n_events)} (exit {rc}{stop})")
        problems_found += [f"after interruption {kills}: {p}" for p in half_written_rounds(cwd / "run")]
    events = read_trace(trace)
    problems_found += compare_runs(reference, cwd / "run")
    problems_found += redone_work(events) + missing_work(reference_events, events)
    problems_found += [f"left behind: {p}" for p in leftover_temporaries(cwd / "run")]
    return processes, kills, where, problems_found


# -- --phases: a timed SIGTERM in each phase ------------------------------------------------------

STARTUP = "start-up"
PHASE_CYCLE = (STARTUP, *PHASES)


def eval_args(problems: Path) -> list[str]:
    """A held-out evaluation after every iteration: 40 problems of the M_0 set's test split, chunks of 8."""
    return [f"--evaluation.problems_file={problems.parent / 'test.jsonl'}", "--evaluation.max_new_tokens=64",
            "--evaluation.batch_size=8", "--evaluation.max_problems=40",
            "--evaluation.verifier.class_path=hs_star_pl.verifiers.ExactMatchVerifier"]


def m0_child_args(run_dir: Path, problems: Path, work: Path, *extra: str) -> list[str]:
    """The run with M_0 trained first in a child ``hs-star fit`` (``stepwise_init``, 10 epochs of SFT)."""
    overlay = work / "m0_child.yaml"
    overlay.write_text(
        "trainer: {max_epochs: 10, enable_progress_bar: false}\n"
        "model: {tiny: {num_attention_heads: 2}}\n"
        f"data: {{problems_file: {problems}, template: plain, max_length: 128, batch_size: 16}}\n"
    )
    configs = [str(ROOT / "configs" / "base.yaml"), str(ROOT / "configs" / "sft" / "stepwise_init.yaml"), str(overlay)]
    return [*run_args(run_dir, run_dir.parent / "m0_bootstrapped", problems, *extra),
            "--stepwise_init=[" + ",".join(configs) + "]"]


def _events(trace: Path, pids: set[int] | None = None) -> list[dict]:
    """The trace's events (of processes ``pids``); read while the run writes it, so a last line
    still being written is left for the next read."""
    events = []
    lines = trace.read_text(encoding="utf-8").split("\n") if trace.is_file() else []
    for line in lines[:-1]:  # the part after the last newline is not a whole line yet
        if line.strip():
            events.append(json.loads(line))
    return [e for e in events if pids is None or e["pid"] in pids]


def phase_lengths(events: list[dict]) -> dict[str, list[float]]:
    """Seconds from each ``begin`` to the main process's next event, by phase."""
    out: dict[str, list[float]] = defaultdict(list)
    for a, b in zip(events, events[1:]):
        if a["event"] == "begin":
            out[a["point"]].append(b["t"] - a["t"])
    return out


def run_stopped_in(args: list[str], cwd: Path, trace: Path, phase: str | None = None, k: int = 0, delay: float = 0.0,
                   timeout: float = 900) -> tuple[int, float | None, float, str, int]:
    """Run ``hs-star`` and SIGTERM its process group ``delay`` s after it begins the k-th ``phase``
    (start-up: ``delay`` s after it starts; ``None``: never). Returns (exit status, wall time of
    the signal or None if none was sent, wall time of its end, the phase the signal landed in,
    the main process's id)."""
    proc = start(args, cwd, trace=trace)
    started, sent, landed_in = time.time(), None, ""
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            now = time.time()
            if sent is None and phase is not None:
                if phase == STARTUP:
                    due = started + delay
                else:
                    hits = [e for e in _events(trace, {proc.pid}) if e["event"] == "begin" and e["point"] == phase]
                    due = hits[k]["t"] + delay if len(hits) > k else None
                if due is not None and now >= due:
                    os.killpg(proc.pid, signal.SIGTERM)
                    sent = time.time()
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"hs-star did not finish within {timeout} s (log: {cwd / 'run.log'})")
            time.sleep(0.01)
        ended = time.time()
    finally:
        left = leftover_group(proc.pid)
        grace = time.monotonic() + 10.0
        while left and time.monotonic() < grace:
            time.sleep(0.1)
            left = leftover_group(proc.pid)
        leftover_group(proc.pid, kill=True)
    if left:
        raise AssertionError(f"processes of the run outlived it by 10 s: {left} (log: {cwd / 'run.log'})")
    if sent is not None:
        begun = [e for e in _events(trace, {proc.pid}) if e["event"] == "begin" and e["t"] <= sent]
        landed_in = begun[-1]["point"] if begun else STARTUP
    return proc.returncode, sent, ended, landed_in, proc.pid


def phases_soak(opts: argparse.Namespace, m0_dir: Path, problems: Path, extra: list[str]) -> int:
    extra = [*extra, *eval_args(problems)]
    references = {}
    for variant in ("plain", "m0_child") if "m0_child" in (opts.only or PHASE_CYCLE) else ("plain",):
        cwd = opts.work / f"uninterrupted_{variant}"
        shutil.rmtree(cwd, ignore_errors=True)
        cwd.mkdir()
        args = (run_args(cwd / "run", m0_dir, problems, *extra) if variant == "plain"
                else m0_child_args(cwd / "run", problems, cwd, *extra))
        began = time.time()
        rc, _, _, _, main_pid = run_stopped_in(args, cwd, cwd / "trace.jsonl")
        if rc != 0:
            print(f"the uninterrupted run ({variant}) failed (exit status {rc}):\n{log_tail(cwd)}")
            return 1
        mine = _events(cwd / "trace.jsonl", {main_pid})
        first = min(e["t"] for e in mine) - began
        lengths = phase_lengths(mine)
        references[variant] = (cwd / "run", mine, Counter(e["point"] for e in mine if e["event"] == "begin"),
                               lengths, first)
        print(f"uninterrupted run ({variant}): {time.time() - began:.1f} s, first phase after {first:.1f} s; phases "
              f"begun: {dict(sorted(references[variant][2].items()))}", flush=True)

    rng = random.Random(opts.seed)
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, Counter] = defaultdict(Counter)
    totals = Counter()
    for i in range(opts.trials):
        t0 = time.monotonic()
        cycle = tuple(opts.only or PHASE_CYCLE)
        phase = cycle[i % len(cycle)]
        variant = "m0_child" if phase == "m0_child" else "plain"
        reference, ref_events, ceiling, lengths, first = references[variant]
        cwd = opts.work / f"trial_{i:03d}"
        shutil.rmtree(cwd, ignore_errors=True)
        cwd.mkdir(parents=True)
        trace = cwd / "trace.jsonl"
        args = (run_args(cwd / "run", m0_dir, problems, *extra) if variant == "plain"
                else m0_child_args(cwd / "run", problems, cwd, *extra))
        # within the first half of the phase's length in the uninterrupted run: the load on a
        # shared machine changes how long a phase takes from one run to the next
        if phase == STARTUP:
            k, delay = 0, rng.uniform(0.5, first / 2)
        else:
            k = rng.randrange(ceiling[phase])
            delay = rng.uniform(0.0, statistics.median(lengths[phase]) / 2)
        found: list[str] = []
        note = ""
        try:
            rc, sent, ended, landed_in, pid = run_stopped_in(args, cwd, trace, phase, k, delay)
            pids = {pid}  # the judges read the main processes' events (an M_0 child's epochs are its own run's)
            if sent is None:
                note = "finished before the signal"
                if rc != 0:
                    found.append(f"ended with {rc} before the signal: {log_tail(cwd, 800)}")
            else:
                seconds = ended - sent
                latencies[landed_in].append(seconds)
                statuses[landed_in][rc] += 1
                note = f"landed in {landed_in}, exit {rc}, {seconds:.1f} s after the signal"
                if rc not in (STOPPED, -signal.SIGTERM, 0):
                    found.append(f"exit status {rc}: {log_tail(cwd, 800)}")
                if seconds > opts.stop_within:
                    found.append(f"stopped {seconds:.1f} s after SIGTERM (limit {opts.stop_within} s)")
                found += half_written_rounds(cwd / "run")
                if rc != 0 and not found:
                    rc2, _, _, _, pid2 = run_stopped_in([*args, "--ckpt_path=last"], cwd, trace)
                    pids.add(pid2)
                    if rc2 != 0:
                        found.append(f"the resumed run ended with {rc2}: {log_tail(cwd, 800)}")
            if not found:
                events = _events(trace, pids)
                found += compare_runs(reference, cwd / "run")
                found += redone_work(events) + missing_work(ref_events, events)
                found += [f"left behind: {p}" for p in leftover_temporaries(cwd / "run")]
        except AssertionError as err:
            found.append(str(err))
            note = "no end"
        totals.update(trials=1, mismatches=len(found), bad_trials=bool(found))
        print(f"trial {i:3d}: {'OK' if not found else 'MISMATCH':8s} SIGTERM to the group in {phase} "
              f"(#{k}, +{delay:.2f} s): {note}; {time.monotonic() - t0:5.1f} s", flush=True)
        for p in found:
            print(f"    !! {p}", flush=True)

    print("\nseconds from SIGTERM to the end of the process, by the phase the signal landed in:")
    print("| phase | signals | exit 143 | median (s) | max (s) |")
    print("| --- | --- | --- | --- | --- |")
    for phase in PHASE_CYCLE:
        got = latencies.get(phase, [])
        if got:
            print(f"| {phase} | {len(got)} | {statuses[phase][STOPPED]} | {statistics.median(got):.1f} | {max(got):.1f} |")
        else:
            print(f"| {phase} | 0 | - | - | - |")
    print(f"soak --phases: {totals['trials']} trials, mismatches: {totals['mismatches']} (in {totals['bad_trials']} trials)",
          flush=True)
    return 1 if totals["mismatches"] else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-kills", type=int, default=3, help="kills per trial at most")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hs-star-soak"))
    parser.add_argument("--m0", type=Path, help="a step-wise initialised tiny M_0 (HF folder)")
    parser.add_argument("--problems", type=Path, help="the problem pool that goes with --m0")
    parser.add_argument("--verifier", choices=("math-verify", "exact"), default="math-verify",
                        help="math-verify (one worker process, so signals to the group meet it) or exact match")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=None,
                        help="interruptions to draw from (default all): " + "; ".join(f"{k}: {v}" for k, v in KINDS.items()))
    parser.add_argument("--stop-within", type=float, default=30.0,
                        help="seconds a timed SIGTERM may take to stop the run (a scheduler's grace period)")
    parser.add_argument("--phases", action="store_true",
                        help="time a SIGTERM to the group in each phase of the run in turn (see above)")
    parser.add_argument("--only", nargs="+", choices=PHASE_CYCLE, default=None,
                        help="with --phases: the phases to cycle through (default all)")
    opts = parser.parse_args()
    extra = MATH_VERIFY if opts.verifier == "math-verify" else []
    kinds = tuple(opts.kinds or KINDS)
    if opts.verifier == "exact":  # no worker processes
        kinds = tuple(k for k in kinds if k != "term-group-check")
    opts.work.mkdir(parents=True, exist_ok=True)
    if opts.m0 is None or opts.problems is None:
        m0_root = opts.work / "m0"
        m0_dir, problems = m0_root / "m0" / "hf" / "policy_025", m0_root / "data" / "train.jsonl"
        if not (m0_dir / "config.json").is_file():
            print("training M_0 once (tests/helpers/self_training.train_m0) ...", flush=True)
            m0_dir, problems = train_m0(m0_root)
    else:
        m0_dir, problems = opts.m0, opts.problems
    if opts.phases:
        return phases_soak(opts, m0_dir, problems, extra)

    ref_cwd = opts.work / "uninterrupted"
    shutil.rmtree(ref_cwd, ignore_errors=True)
    ref_cwd.mkdir()
    started, wall_start = time.monotonic(), time.time()
    rc = run(run_args(ref_cwd / "run", m0_dir, problems, *extra), ref_cwd, trace=ref_cwd / "trace.jsonl")
    duration = time.monotonic() - started
    if rc != 0:
        print(f"the uninterrupted run failed (exit status {rc}):\n{log_tail(ref_cwd)}")
        return 1
    reference_events = read_trace(ref_cwd / "trace.jsonl")
    ceiling = Counter(e["point"] for e in reference_events if e["event"] == "reach")
    # timed interruptions fall between the first fault point (imports and model loading are over)
    # and 90% of the uninterrupted run's time (a resumed process has less to do)
    window = (min(e["t"] for e in reference_events) - wall_start, 0.9 * duration)
    print(f"uninterrupted run ({opts.verifier}): {duration:.1f} s, first fault point after {window[0]:.1f} s; fault "
          f"points reached: {dict(sorted(ceiling.items()))}", flush=True)

    rng = random.Random(opts.seed)
    totals, counts = Counter(), Counter()
    for i in range(opts.trials):
        t0 = time.monotonic()
        processes, kills, where, problems_found = trial(i, rng, opts.work, m0_dir, problems, ref_cwd / "run",
                                                        reference_events, ceiling, window, opts.max_kills,
                                                        extra, kinds, opts.stop_within, counts)
        totals.update(runs=processes, kills=kills, mismatches=len(problems_found), bad_trials=bool(problems_found))
        status = "OK" if not problems_found else "MISMATCH"
        print(f"trial {i:3d}: {status:8s} {processes} runs, {kills} interruptions, {time.monotonic() - t0:5.1f} s",
              flush=True)
        for w in where:
            print(f"    {w}", flush=True)
        for p in problems_found:
            print(f"    !! {p}", flush=True)
    latency = counts.pop("stop latency max (s)", None)
    print(f"soak: {opts.trials} trials, runs: {totals['runs']}, interruptions: {totals['kills']} "
          f"({', '.join(f'{k} {counts[k]}' for k in kinds)}), slowest stop after a timed SIGTERM: {latency} s, "
          f"mismatches: {totals['mismatches']} (in {totals['bad_trials']} trials)", flush=True)
    return 1 if totals["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
