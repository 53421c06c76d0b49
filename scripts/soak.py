"""Soak test: SIGKILL the tiny self-training loop at random points and times, resume, compare.

Run from the repository root (about 20 s per trial on 2 cores)::

    python scripts/soak.py --trials 30 [--seed 0] [--max-kills 3] [--work /tmp/hs-star-soak]

Each trial starts a fresh run of the two-iteration tiny loop (``tests/helpers/kill_resume.py``)
and kills it, then kills each resumed process again with probability 1/2, up to
``--max-kills`` times, before letting it finish with ``--ckpt_path last``. A kill is either at
a random named fault point and occurrence (``HS_STAR_FAULT``) or a plain SIGKILL after a random
delay between the uninterrupted run's first fault point (start-up is over) and its end. After
every kill no round may be half-written; at the end the run must equal an uninterrupted run of
the same seeds (round artifacts, HF exports, logged metrics), no saved work may have been
redone, and no temporary file may be left. M_0 is trained once into ``<work>/m0`` (about a
minute) unless ``--m0`` and ``--problems`` are given. The last line counts runs (processes),
kills and mismatches; the exit status is 1 when there is any mismatch.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hs_star_pl.faults import POINTS, read_trace  # noqa: E402
from tests.helpers.kill_resume import (  # noqa: E402
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


def trial(index: int, rng: random.Random, work: Path, m0: Path, problems: Path, reference: Path,
          reference_events: list, ceiling: Counter, window: tuple[float, float], max_kills: int) -> tuple[int, int, list[str], list[str]]:
    """One killed-and-resumed run; returns (processes, kills, where the kills landed, problems)."""
    cwd = work / f"trial_{index:03d}"
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir(parents=True)
    trace = cwd / "trace.jsonl"
    args = run_args(cwd / "run", m0, problems)
    processes, kills, where, problems_found = 0, 0, [], []
    while True:
        fault, kill_after = None, None
        if kills < max_kills and (kills == 0 or rng.random() < 0.5):
            if rng.random() < 0.5:
                point = rng.choice(sorted(POINTS))
                fault = f"{point}@{rng.randrange(ceiling[point])}"
            else:
                kill_after = rng.uniform(*window)
        n_events = len(read_trace(trace)) if trace.is_file() else 0
        rc = run(args if processes == 0 else [*args, "--ckpt_path=last"], cwd, fault=fault, trace=trace,
                 kill_after_s=kill_after)
        processes += 1
        if rc == 0:
            break
        if rc != KILLED:
            problems_found.append(f"process {processes} failed with exit status {rc}: {log_tail(cwd, 800)}")
            return processes, kills, where, problems_found
        kills += 1
        where.append(f"{fault or f'SIGKILL after {kill_after:.1f} s'} -> {landed(trace, n_events)}")
        problems_found += [f"after kill {kills}: {p}" for p in half_written_rounds(cwd / "run")]
    events = read_trace(trace)
    problems_found += compare_runs(reference, cwd / "run")
    problems_found += redone_work(events) + missing_work(reference_events, events)
    problems_found += [f"left behind: {p}" for p in leftover_temporaries(cwd / "run")]
    return processes, kills, where, problems_found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-kills", type=int, default=3, help="kills per trial at most")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hs-star-soak"))
    parser.add_argument("--m0", type=Path, help="a step-wise initialised tiny M_0 (HF folder)")
    parser.add_argument("--problems", type=Path, help="the problem pool that goes with --m0")
    opts = parser.parse_args()
    opts.work.mkdir(parents=True, exist_ok=True)
    if opts.m0 is None or opts.problems is None:
        m0_root = opts.work / "m0"
        m0_dir, problems = m0_root / "m0" / "hf" / "iteration_024", m0_root / "data" / "train.jsonl"
        if not (m0_dir / "config.json").is_file():
            print("training M_0 once (tests/helpers/self_training.train_m0) ...", flush=True)
            m0_dir, problems = train_m0(m0_root)
    else:
        m0_dir, problems = opts.m0, opts.problems

    ref_cwd = opts.work / "uninterrupted"
    shutil.rmtree(ref_cwd, ignore_errors=True)
    ref_cwd.mkdir()
    started, wall_start = time.monotonic(), time.time()
    rc = run(run_args(ref_cwd / "run", m0_dir, problems), ref_cwd, trace=ref_cwd / "trace.jsonl")
    duration = time.monotonic() - started
    if rc != 0:
        print(f"the uninterrupted run failed (exit status {rc}):\n{log_tail(ref_cwd)}")
        return 1
    reference_events = read_trace(ref_cwd / "trace.jsonl")
    ceiling = Counter(e["point"] for e in reference_events if e["event"] == "reach")
    # timed kills fall between the first fault point (imports and model loading are over) and the end
    window = (min(e["t"] for e in reference_events) - wall_start, duration)
    print(f"uninterrupted run: {duration:.1f} s, first fault point after {window[0]:.1f} s; fault points "
          f"reached: {dict(sorted(ceiling.items()))}", flush=True)

    rng = random.Random(opts.seed)
    totals = Counter()
    for i in range(opts.trials):
        t0 = time.monotonic()
        processes, kills, where, problems_found = trial(i, rng, opts.work, m0_dir, problems, ref_cwd / "run",
                                                        reference_events, ceiling, window, opts.max_kills)
        totals.update(runs=processes, kills=kills, mismatches=len(problems_found), bad_trials=bool(problems_found))
        status = "OK" if not problems_found else "MISMATCH"
        print(f"trial {i:3d}: {status:8s} {processes} runs, {kills} kills, {time.monotonic() - t0:5.1f} s", flush=True)
        for w in where:
            print(f"    kill: {w}", flush=True)
        for p in problems_found:
            print(f"    !! {p}", flush=True)
    print(f"soak: {opts.trials} trials, runs: {totals['runs']}, kills: {totals['kills']}, "
          f"mismatches: {totals['mismatches']} (in {totals['bad_trials']} trials)", flush=True)
    return 1 if totals["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
