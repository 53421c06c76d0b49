"""Compare self-training methods over seeds, from one M_0, at equal sampling budget.

    python -m hs_star_pl.experiments.compare                      # the main comparison, 5 seeds
    python -m hs_star_pl.experiments.compare --study pilot        # the pilot study's splits
    python -m hs_star_pl.experiments.compare --seeds 0 1 2 --methods hs_star uniform
    python -m hs_star_pl.experiments.compare --report-only        # tables from finished runs
    python -m hs_star_pl.experiments.compare --seeds 0 --self_training.problems_per_iteration=100
    python -m hs_star_pl.experiments.compare --methods uniform hs_star --match-examples-to uniform   # same steps
    python -m hs_star_pl.experiments.compare --rebuild results/tiny   # every kept table, from kept summaries

Arguments of the form ``--dotted.key=value`` that are not the comparison's own go to every
``hs-star fit`` (after the method's overlay, so they win).

Each *method* is a config overlay (``configs/tiny/methods/<name>.yaml``) applied on top of
the base config (``configs/tiny/hs_star.yaml``); ``hs_star`` is the base itself. Every
(method, seed) pair is one ``hs-star fit`` in its own process, into
``<out>/<method>/seed_<s>/``, with ``seed_everything`` and ``self_training.seed`` set to the
seed. All runs share the base config's ``model.model_path`` (M_0 is trained once by the first
run if missing). A run whose last evaluation is on disk is not run again, so a killed
comparison resumes where it stopped (an unfinished run continues from ``--ckpt_path last``).

M_0 is one model evaluated greedily, so its evaluation is the same in every run: a new run
starts with a copy of the first finished M_0 result under ``--out``
(``eval/<name>/policy_000.json``, which the evaluation reads instead of evaluating again),
unless its method's overlay sets ``model``, ``data`` or ``evaluation``, or
``--evaluate-m0-every-run`` is given. (Like the finished runs it reuses, this assumes one
``--out`` holds one comparison's settings.)

Studies (``--study``), each against HS-STaR (the base config, the boundary split) at equal
budget:

* ``main``: the paper's main table: uniform K per problem, accuracy-only and reward-only
  difficulty, and proportional allocation;
* ``pilot``: the paper's pilot study: re-sample and train on one difficulty split at a time
  (inlier, outlier, and the unions of two; HS-STaR is the boundary split);
* ``departures``: the demo's departures from the paper's recipe (``paper_pairs``,
  ``paper_dpo``);
* ``mislabelling``: does HS-STaR lose to uniform because ``n_p`` pre-samples mislabel
  problems? HS-STaR with classes from 8 extra, uncounted samples (``oracle_classes``) and
  with ``n_p`` = 2 and 5 at the same K, beside uniform.

``--match-examples-to METHOD`` makes a comparison step-matched: on each seed METHOD runs
first, and every other method trains on a seeded subsample of its own pairs of METHOD's size
(``self_training.selection.max_examples``), so every run takes the same optimizer steps.
``--keep DIR`` also writes each run's small summary (``DIR/<method>/seed_<s>/run.json``: the
accuracies, pairs and samples per round, the classes and pair counts per problem; no model)
and the study's settings (``DIR/study.json``), small enough for the repository;
``--rebuild ROOT`` re-makes every kept study's ``comparison.md`` under ROOT from those files.

Written to ``<out>/comparison_<study>`` (``comparison_custom`` with ``--methods``): ``.md`` (accuracy per iteration, mean and standard
deviation over seeds; each method's final accuracy minus HS-STaR's on the same seeds with a
95% paired t interval over seeds; DPO pairs per 1000 rollouts; the share of samples spent on
each difficulty class; where the pairs came from and the final accuracy split by a problem
field, ``--group-by``; which problems each method trained on in the first round, by HS-STaR's
pre-sample class), ``.json`` (every number behind it, per run) and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hs_star_pl.core.artifacts import read_jsonl
from hs_star_pl.core.problems import load_problems

BASE_CONFIG = Path("configs/tiny/hs_star.yaml")
METHODS_DIR = Path("configs/tiny/methods")
CLASSES = ("inlier", "boundary", "outlier")
BASELINE = "hs_star"
GROUP_FIELD = "n_steps"
STUDIES: dict[str, tuple[str, ...]] = {
    "main": (BASELINE, "uniform", "accuracy_only", "reward_only", "proportional"),
    "pilot": (BASELINE, "split_inlier", "split_outlier", "split_inlier_boundary", "split_boundary_outlier", "split_inlier_outlier"),
    "departures": (BASELINE, "paper_pairs", "paper_dpo"),
    "mislabelling": (BASELINE, "uniform", "oracle_classes", "n_presample_2", "n_presample_5"),
}


@dataclass
class RunResult:
    """What one (method, seed) run left on disk."""

    method: str
    seed: int
    accuracy: list[float]  # M_0..M_T on the evaluation set
    pairs: list[int]  # DPO pairs (or SFT examples) per round
    samples: list[int]  # rollouts spent per round
    samples_per_class: dict[str, int] = field(default_factory=dict)  # summed over rounds
    seconds: float | None = None
    pairs_per_class: dict[str, int] = field(default_factory=dict)  # by the problem's class, summed over rounds
    problems_with_pairs: list[int] = field(default_factory=list)  # per round
    final_by_group: dict[str, list[int]] = field(default_factory=dict)  # final policy: {group: [correct, total]}
    selected: list[int] = field(default_factory=list)  # per round: examples made before selection.max_examples
    classes: list[dict[str, str]] = field(default_factory=list)  # per round: {problem_id: its class}
    paired: list[dict[str, int]] = field(default_factory=list)  # per round: {problem_id: its pairs trained on}

    @property
    def pairs_per_1000(self) -> float:
        return 1000.0 * sum(self.pairs) / max(sum(self.samples), 1)


def method_paths(methods_dir: Path, names: Sequence[str] | None) -> dict[str, Path | None]:
    """``{name: overlay}`` (``None`` for ``hs_star``, the base config itself)."""
    available = {p.stem: p for p in sorted(methods_dir.glob("*.yaml"))}
    if names is None:
        return {"hs_star": None, **{n: p for n, p in available.items() if n != "hs_star"}}
    unknown = [n for n in names if n != "hs_star" and n not in available]
    if unknown:
        raise SystemExit(
            f"--methods: unknown {unknown}; available: {['hs_star', *sorted(available)]} (files in {methods_dir})"
        )
    return {n: available.get(n) for n in names}


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / method / f"seed_{seed}"


def n_iterations(configs: Sequence[Path], fit_args: Sequence[str]) -> int:
    """Iterations per run: the last ``--self_training.n_iterations=`` in ``fit_args``, else the last base config's that sets it."""
    for arg in reversed(fit_args):
        if arg.startswith("--self_training.n_iterations="):
            return int(arg.split("=", 1)[1])
    for config in reversed(configs):
        with open(config) as f:
            cfg = yaml.safe_load(f) or {}
        value = (cfg.get("self_training") or {}).get("n_iterations") if isinstance(cfg, dict) else None
        if value is not None:
            return int(value)
    raise SystemExit(f"{', '.join(map(str, configs))}: self_training.n_iterations is required for a comparison")


def collect(directory: Path, method: str, seed: int, group_by: str = GROUP_FIELD) -> RunResult | None:
    """Read a finished or partial run; ``None`` when it has no evaluation yet.

    ``group_by``: the problems' metadata field the final policy's accuracy is split by. A
    folder without evaluations but with a kept summary (``KEPT_FILE``, see ``keep``) is read
    from that summary, so a kept study re-tabulates like the runs it came from.
    """
    evals = sorted(directory.glob("eval/*/policy_*.json"))
    if not evals:
        kept = directory / KEPT_FILE
        return load_kept(kept) if kept.is_file() else None
    names = sorted({p.parent.name for p in evals})
    if len(names) > 1:
        raise SystemExit(f"{directory}/eval holds several evaluation sets {names}; compare needs one")
    accuracy = [json.loads(p.read_text())["summary"]["accuracy"] for p in evals]
    pairs, samples, per_class = [], [], dict.fromkeys(CLASSES, 0)
    pairs_per_class, with_pairs, selected, classes, paired = dict.fromkeys(CLASSES, 0), [], [], [], []
    for summary_path in sorted(directory.glob("rounds/round_*/summary.json")):
        s = json.loads(summary_path.read_text())
        n_examples = int(s["n_pairs"]) + int(s.get("n_sft_examples") or 0)
        pairs.append(n_examples)
        selected.append(int(s.get("n_examples_selected", n_examples)))
        samples.append(int(s["samples_total"]))
        for c in CLASSES:
            per_class[c] += int(s["samples_per_class"].get(c, 0))
        class_of = {row["problem_id"]: row["difficulty"] for row in read_jsonl(summary_path.with_name("difficulty.jsonl"))}
        counts: dict[str, int] = {}
        for row in read_jsonl(summary_path.with_name("pairs.jsonl")):
            counts[row["problem_id"]] = counts.get(row["problem_id"], 0) + 1
        for problem_id, n in counts.items():
            pairs_per_class[class_of[problem_id]] += n
        with_pairs.append(len(counts))
        classes.append(dict(sorted(class_of.items())))
        paired.append(dict(sorted(counts.items())))
    timing = directory / "compare_seconds.txt"
    seconds = float(timing.read_text()) if timing.exists() else None
    return RunResult(method, seed, accuracy, pairs, samples, per_class, seconds, pairs_per_class, with_pairs,
                     accuracy_by_group(evals[-1], group_by), selected, classes, paired)


KEPT_FILE = "run.json"
KEPT_VERSION = 1


def keep(result: RunResult, directory: Path) -> Path:
    """Write ``result`` as ``<directory>/run.json``: every number the tables need, no model.

    A few tens of KB per run (the per-problem classes and pair counts of each round), small
    enough to keep in the repository so that anyone can rebuild a table and check a claim.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / KEPT_FILE
    path.write_text(json.dumps({"version": KEPT_VERSION, **result.__dict__}, indent=1, sort_keys=True) + "\n")
    return path


def load_kept(path: Path) -> RunResult:
    """The ``RunResult`` that ``keep`` wrote to ``path``."""
    data = json.loads(path.read_text())
    if data.pop("version", None) != KEPT_VERSION:
        raise SystemExit(f"{path}: not a kept run summary of version {KEPT_VERSION}")
    try:
        return RunResult(**data)
    except TypeError as err:
        raise SystemExit(f"{path}: not a kept run summary ({err})") from None


def accuracy_by_group(result: Path, field_name: str = GROUP_FIELD) -> dict[str, list[int]]:
    """``{value: [correct, total]}`` of one evaluation, grouped by a metadata field of its problems.

    Empty when the evaluated problem file is gone or its problems lack the field.
    """
    data = json.loads(result.read_text())
    source = Path(data.get("problems_file") or "")
    if not source.is_file():
        return {}
    group = {p.id: p.metadata.get(field_name) for p in load_problems(source)}
    out: dict[str, list[int]] = {}
    for row in data["rows"]:
        value = group.get(row["problem_id"])
        if value is None:
            return {}
        counts = out.setdefault(str(value), [0, 0])
        counts[0] += int(row["n_correct"])
        counts[1] += len(row["correct"])
    return dict(sorted(out.items(), key=lambda kv: (len(kv[0]), kv[0])))


def fit_command(
    base: Sequence[Path], overlay: Path | None, seed: int, directory: Path, resume: bool, fit_args: Sequence[str] = ()
) -> list[str]:
    cmd = [sys.executable, "-m", "hs_star_pl", "fit"]
    for config in base:
        cmd += ["-c", str(config)]
    if overlay is not None:
        cmd += ["-c", str(overlay)]
    cmd += [
        f"--seed_everything={seed}",
        f"--self_training.seed={seed}",
        f"--trainer.default_root_dir={directory}",
        *fit_args,
    ]
    if resume:
        cmd.append("--ckpt_path=last")
    return cmd


def changes_m0_evaluation(overlay: Path | None) -> str | None:
    """What in a method's overlay makes its M_0 evaluation differ from the base config's.

    ``None`` when nothing does. ``--dotted.key`` arguments go to every run of a comparison
    alike, so only the overlay can set one run apart.
    """
    if overlay is not None:
        with open(overlay) as f:
            keys = set(yaml.safe_load(f) or {})
        touched = sorted(keys & {"model", "evaluation", "data"})
        if touched:
            return f"{overlay} sets {touched}"
    return None


def share_m0_evaluation(out: Path, directory: Path) -> Path | None:
    """Copy a finished M_0 result of another run under ``out`` into the fresh run ``directory``.

    Returns the copied file's new path, or ``None`` when ``directory`` already has an
    evaluation or no other run has finished one.
    """
    if any(directory.glob("eval/*/policy_000.json")):
        return None
    for source in sorted(out.glob("*/seed_*/eval/*/policy_000.json")):
        if source.parents[2] == directory:
            continue
        target = directory / "eval" / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        return target
    return None


def run_one(
    base: Sequence[Path], overlay: Path | None, seed: int, directory: Path, expected: int, method: str, fit_args: Sequence[str] = (),
    share_m0_from: Path | None = None, group_by: str = GROUP_FIELD,
) -> RunResult:
    done = collect(directory, method, seed, group_by)
    if done is not None and len(done.accuracy) == expected + 1:
        print(f"[compare] {method} seed {seed}: done already ({directory})", flush=True)
        return done
    resume = (directory / "checkpoints" / "last.ckpt").exists()
    if share_m0_from is not None and not resume:
        copied = share_m0_evaluation(share_m0_from, directory)
        if copied is not None:
            print(f"[compare] {method} seed {seed}: M_0's evaluation copied to {copied}", flush=True)
    cmd = fit_command(base, overlay, seed, directory, resume, fit_args)
    directory.mkdir(parents=True, exist_ok=True)
    print(f"[compare] {method} seed {seed}: {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    with open(directory / "compare.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(
            f"[compare] {method} seed {seed} failed (exit {proc.returncode}); its output is in {directory / 'compare.log'}. "
            "Re-running the same command resumes it."
        )
    if not resume:
        (directory / "compare_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    result = collect(directory, method, seed, group_by)
    if result is None or len(result.accuracy) != expected + 1:
        raise SystemExit(f"[compare] {method} seed {seed} finished without {expected + 1} evaluations in {directory}/eval")
    return result


def group_by_method(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """``{method: its runs}`` in the order the methods first appear."""
    by_method: dict[str, list[RunResult]] = {}
    for r in results:
        by_method.setdefault(r.method, []).append(r)
    return by_method


def paired_t_interval(differences: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """``(mean, low, high)``: the paired t interval for the mean of per-seed differences.

    ``None`` with fewer than two differences (no spread to estimate). With n seeds the
    half-width is ``t_{(1+level)/2, n-1} * sd / sqrt(n)``.
    """
    n = len(differences)
    if n < 2:
        return None
    try:
        from scipy.stats import t as student_t
    except ImportError as err:  # pragma: no cover - scipy is in the dev and experiments extras
        raise ImportError("the comparison's confidence intervals need scipy: pip install 'hs-star-pl[experiments]'") from err
    mean = statistics.fmean(differences)
    half = float(student_t.ppf((1 + level) / 2, n - 1)) * statistics.stdev(differences) / n**0.5
    return mean, mean - half, mean + half


def _interval(differences: Sequence[float]) -> str:
    ci = paired_t_interval(differences)
    if ci is None:
        return f"{differences[0]:+.3f} (1 seed)" if differences else ""
    mean, low, high = ci
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def _mean_sd(values: Sequence[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(results: Sequence[RunResult], expected: int, baseline: str = BASELINE) -> str:
    """The markdown comparison (one row per method; mean ± sd over seeds).

    The last column is each method's final accuracy minus ``baseline``'s on the same seeds
    (a seed fixes the problems drawn each iteration, so the difference is paired): the mean
    difference and its 95% paired t interval over seeds.
    """
    by_method = group_by_method(results)
    final = {
        (r.method, r.seed): r.accuracy[-1] for r in results if len(r.accuracy) == expected + 1
    }
    head = ["method", "seeds", *[f"M_{t}" for t in range(expected + 1)], "gain M_0→M_T", "pairs / 1000 rollouts"]
    head += [f"% samples {c}" for c in CLASSES]
    head.append(f"M_T − {baseline}, same seeds: mean [95% paired t CI]")
    lines = ["| " + " | ".join(head) + " |", "| --- | ---: |" + " ---: |" * (len(head) - 2)]
    for method, runs in by_method.items():
        row = [method, ",".join(str(r.seed) for r in runs)]
        for t in range(expected + 1):
            row.append(_mean_sd([r.accuracy[t] for r in runs if len(r.accuracy) > t]))
        full = [r for r in runs if len(r.accuracy) == expected + 1]
        row.append(_mean_sd([r.accuracy[-1] - r.accuracy[0] for r in full]))
        row.append(f"{statistics.fmean(r.pairs_per_1000 for r in runs):.1f}")
        total = sum(sum(r.samples_per_class.values()) for r in runs) or 1
        for c in CLASSES:
            row.append(f"{100.0 * sum(r.samples_per_class[c] for r in runs) / total:.1f}")
        paired = [
            final[(method, r.seed)] - final[(baseline, r.seed)]
            for r in runs
            if method != baseline and (method, r.seed) in final and (baseline, r.seed) in final
        ]
        row.append(_interval(paired))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def details(results: Sequence[RunResult], group_by: str = GROUP_FIELD) -> str:
    """Where each method's training signal came from, and where its final policy gained.

    Means over seeds: problems with at least one pair per round, pairs per such problem,
    the share of pairs by the problem's difficulty class, and the final policy's accuracy
    per ``group_by`` value of the evaluation problems (chain length on the tiny task).
    """
    by_method = group_by_method(results)
    groups = sorted({g for r in results for g in r.final_by_group}, key=lambda g: (len(g), g))
    head = ["method", "problems with a pair / round", "pairs per such problem"]
    head += [f"% pairs from {c}" for c in CLASSES]
    head += [f"final acc., {group_by}={g}" for g in groups]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for method, runs in by_method.items():
        rounds = [n for r in runs for n in r.problems_with_pairs]
        n_pairs = sum(sum(r.pairs_per_class.values()) for r in runs)
        row = [method, f"{statistics.fmean(rounds):.1f}" if rounds else "",
               f"{n_pairs / max(sum(rounds), 1):.2f}"]
        row += [f"{100.0 * sum(r.pairs_per_class.get(c, 0) for r in runs) / max(n_pairs, 1):.1f}" for c in CLASSES]
        for g in groups:
            accs = [r.final_by_group[g][0] / r.final_by_group[g][1] for r in runs if g in r.final_by_group]
            row.append(_mean_sd(accs))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def first_round_overlap(results: Sequence[RunResult], baseline: str = BASELINE) -> str:
    """Which problems each method trained on in its first round, by the class ``baseline`` gave them.

    In round 0 every method of a seed draws the same problems and samples from the same M_0,
    so the baseline's pre-sample classes (its round 0's ``difficulty.jsonl``) label every
    method's problems: per class, the problems with at least one pair in the method's
    round 0 out of the problems in that class, means over the seeds that both ran. This is
    where a uniform budget finds pairs on problems that the baseline's first stage set
    aside. Problems the baseline did not draw are left out (none when only the allocation
    differs). Empty when the baseline has no first round.
    """
    members: dict[int, dict[str, list[str]]] = {}  # seed -> class -> the baseline's problems in it
    for r in results:
        if r.method == baseline and r.classes:
            members[r.seed] = {c: [] for c in CLASSES}
            for problem_id, c in r.classes[0].items():
                members[r.seed][c].append(problem_id)
    if not members:
        return ""
    head = ["method", "seeds", *[f"{c}: with a pair / in class" for c in CLASSES]]
    lines = ["| " + " | ".join(head) + " |", "| --- | ---: |" + " ---: |" * len(CLASSES)]
    for method, runs in group_by_method(results).items():
        with_pair = {c: [] for c in CLASSES}
        in_class = {c: [] for c in CLASSES}
        used = []
        for r in runs:
            if r.seed not in members or not r.paired:
                continue
            paired = r.paired[0]
            used.append(r.seed)
            for c in CLASSES:
                in_class[c].append(len(members[r.seed][c]))
                with_pair[c].append(sum(pid in paired for pid in members[r.seed][c]))
        if not used:
            continue
        row = [method, ",".join(map(str, used))]
        row += [f"{statistics.fmean(with_pair[c]):.1f} / {statistics.fmean(in_class[c]):.1f}" for c in CLASSES]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def per_seed(results: Sequence[RunResult], expected: int, baseline: str = BASELINE) -> str:
    """Every run's final accuracy, pairs trained (and made, when ``max_examples`` cut them) and
    its difference from ``baseline`` on the same seed: the numbers behind each mean and interval."""
    final = {(r.method, r.seed): r.accuracy[-1] for r in results if len(r.accuracy) == expected + 1}
    head = ["method", "seed", f"M_{expected}", f"M_{expected} − {baseline}", "pairs trained per round",
            "pairs made per round"]
    lines = ["| " + " | ".join(head) + " |", "| --- | ---: |" + " ---: |" * (len(head) - 2)]
    for r in results:
        if (r.method, r.seed) not in final:
            continue
        diff = "" if r.method == baseline or (baseline, r.seed) not in final else \
            f"{final[(r.method, r.seed)] - final[(baseline, r.seed)]:+.3f}"
        made = r.selected or r.pairs
        lines.append(f"| {r.method} | {r.seed} | {final[(r.method, r.seed)]:.3f} | {diff} | "
                     f"{', '.join(map(str, r.pairs))} | {', '.join(map(str, made))} |")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[RunResult], expected: int, path: Path) -> bool:
    """Accuracy per iteration (mean and range over seeds), pairs per 1000 rollouts, samples per class."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[compare] matplotlib is not installed: no PNG (pip install 'hs-star-pl[plots]')", flush=True)
        return False
    by_method = group_by_method(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    xs = list(range(expected + 1))
    for method, runs in by_method.items():
        full = [r for r in runs if len(r.accuracy) == expected + 1]
        if not full:
            continue
        mean = [statistics.fmean(r.accuracy[t] for r in full) for t in xs]
        low = [min(r.accuracy[t] for r in full) for t in xs]
        high = [max(r.accuracy[t] for r in full) for t in xs]
        (line,) = axes[0].plot(xs, mean, marker="o", label=method)
        axes[0].fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
    axes[0].set(xlabel="iteration (policy M_t)", ylabel="test accuracy", title="Held-out accuracy (mean, min-max over seeds)")
    axes[0].set_xticks(xs)
    axes[0].legend(fontsize=8)
    names = list(by_method)
    axes[1].bar(names, [statistics.fmean(r.pairs_per_1000 for r in by_method[n]) for n in names])
    axes[1].set(title="Training pairs per 1000 rollouts", ylabel="pairs")
    bottom = [0.0] * len(names)
    for c in CLASSES:
        shares = []
        for n in names:
            total = sum(sum(r.samples_per_class.values()) for r in by_method[n]) or 1
            shares.append(100.0 * sum(r.samples_per_class[c] for r in by_method[n]) / total)
        axes[2].bar(names, shares, bottom=bottom, label=c)
        bottom = [b + s for b, s in zip(bottom, shares)]
    axes[2].set(title="Samples spent per difficulty class", ylabel="% of samples")
    axes[2].legend(fontsize=8)
    for ax in axes[1:]:
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def check_yaml_files(paths: Sequence[Path]) -> None:
    """A YAML file that does not parse: one line naming its file and line, exit status 2 (as ``hs-star fit``)."""
    from hs_star_pl.cli import check_config_files
    from hs_star_pl.infra.errors import HSStarError

    try:
        check_config_files([arg for path in paths for arg in ("-c", str(path))])
    except HSStarError as err:
        print(f"compare: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None


def paired_table(results: Sequence[RunResult], expected: int, baseline: str) -> str:
    """Each method's final accuracy minus ``baseline``'s on the same seeds: mean [95% paired t
    CI] and the per-seed differences. Empty when ``baseline`` has no finished run."""
    final = {(r.method, r.seed): r.accuracy[-1] for r in results if len(r.accuracy) == expected + 1}
    if not any(m == baseline for m, _ in final):
        return ""
    lines = [f"| method | seeds | M_T − {baseline}: mean [95% paired t CI] | per seed |", "| --- | ---: | ---: | ---: |"]
    for method, runs in group_by_method(results).items():
        seeds = [r.seed for r in runs if method != baseline and (method, r.seed) in final and (baseline, r.seed) in final]
        if not seeds:
            continue
        diffs = [final[(method, s)] - final[(baseline, s)] for s in seeds]
        lines.append(f"| {method} | {','.join(map(str, seeds))} | {_interval(diffs)} | "
                     f"{' / '.join(f'{d:+.3f}' for d in diffs)} |")
    return "\n".join(lines) + "\n"


def tabulate(results: Sequence[RunResult], expected: int, baseline: str = BASELINE, group_by: str = GROUP_FIELD,
             also_pair_with: Sequence[str] = ()) -> str:
    """Every table of a comparison, as markdown: the summary, where the pairs came from, the
    first round by ``baseline``'s classes, the per-seed values, and each method paired with
    every method of ``also_pair_with`` (with the first round by its classes)."""
    table = report(results, expected, baseline) + "\n" + details(results, group_by)
    overlap = first_round_overlap(results, baseline)
    if overlap:
        table += f"\nProblems with a pair in the first round, by {baseline}'s pre-sample class:\n\n" + overlap
    table += "\nPer seed:\n\n" + per_seed(results, expected, baseline)
    for other in also_pair_with:
        paired = paired_table(results, expected, other)
        if paired:
            table += f"\nPaired with {other}:\n\n" + paired
        overlap = first_round_overlap(results, other)
        if overlap:
            table += f"\nProblems with a pair in the first round, by {other}'s pre-sample class:\n\n" + overlap
    return table


def renamed(result: RunResult, names: Mapping[str, str]) -> RunResult:
    """``result`` under the name ``names`` gives its method (unchanged when it gives none)."""
    return dataclasses.replace(result, method=names.get(result.method, result.method))


STUDY_FILE = "study.json"


def write_study(directory: Path, methods: Sequence[str], expected: int, baseline: str, group_by: str,
                command: Sequence[str], also_pair_with: Sequence[str] = ()) -> None:
    """``<directory>/study.json``: what ``rebuild`` needs to tabulate the kept runs beside it.

    A study already there with the same iterations, baseline and grouping gains the new
    methods (and commands): two comparisons from different ``--out`` folders (e.g. the same
    method with and without a setting, ``--keep-as``) make one kept study.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STUDY_FILE
    spec = {"methods": list(methods), "n_iterations": expected, "baseline": baseline, "group_by": group_by,
            "also_pair_with": list(also_pair_with), "commands": [" ".join(command)]}
    if path.is_file():
        old = json.loads(path.read_text())
        same = all(old.get(k) == spec[k] for k in ("n_iterations", "baseline", "group_by"))
        if not same:
            raise SystemExit(f"{path} holds a study with other settings ({old.get('n_iterations')} iterations, baseline "
                             f"{old.get('baseline')}, by {old.get('group_by')}); keep this one in another folder")
        spec["methods"] = list(dict.fromkeys([*old["methods"], *spec["methods"]]))
        spec["also_pair_with"] = list(dict.fromkeys([*old.get("also_pair_with", []), *spec["also_pair_with"]]))
        spec["commands"] = list(dict.fromkeys([*old.get("commands", []), *spec["commands"]]))
    path.write_text(json.dumps(spec, indent=1) + "\n")


def rebuild(root: Path) -> list[Path]:
    """Re-tabulate every kept study under ``root`` (each folder with a ``study.json``) into its
    ``comparison.md``, from the kept run summaries alone. Returns the files written."""
    written = []
    for study in sorted(root.rglob(STUDY_FILE)):
        folder = study.parent
        spec = json.loads(study.read_text())
        results = []
        for method in spec["methods"]:
            for kept in sorted((folder / method).glob(f"seed_*/{KEPT_FILE}"), key=lambda p: int(p.parent.name[5:])):
                results.append(load_kept(kept))
        if not results:
            raise SystemExit(f"{study}: no kept runs beside it")
        out = folder / "comparison.md"
        made_by = "".join(f"<!-- made by: {c} -->\n" for c in spec.get("commands") or [spec.get("command", "?")])
        out.write_text(f"<!-- rebuilt from the kept runs: python -m hs_star_pl.experiments.compare --rebuild {root} -->\n"
                       f"{made_by}\n"
                       + tabulate(results, int(spec["n_iterations"]), spec["baseline"], spec["group_by"],
                                  spec.get("also_pair_with", ())))
        written.append(out)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, nargs="+", default=[BASE_CONFIG],
                        help="the base run config, or several applied in order (e.g. the demo config and a "
                             "study's overlay); each method's overlay comes after them (default: %(default)s)")
    parser.add_argument("--methods-dir", type=Path, default=METHODS_DIR, help="overlay folder (default: %(default)s)")
    parser.add_argument("--study", choices=sorted(STUDIES), default="main",
                        help="which methods to run: main (the paper's main table), pilot (the difficulty splits), "
                             "departures (the demo's departures from the paper) or mislabelling (oracle classes, "
                             "n_p 2 and 5); default: %(default)s")
    parser.add_argument("--methods", nargs="+", default=None, help="names to run instead of a study's (hs_star is the base config)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("checkpoints/tiny/compare"))
    parser.add_argument("--report-only", action="store_true", help="only tabulate runs already on disk")
    parser.add_argument("--group-by", default=GROUP_FIELD,
                        help="problem metadata field the final accuracy is split by (default: %(default)s; "
                             "the study task's files also have 'family')")
    parser.add_argument("--evaluate-m0-every-run", action="store_true",
                        help="evaluate M_0 in every run instead of copying the first run's M_0 result")
    parser.add_argument("--baseline", default=BASELINE,
                        help="the method every other is paired against (default: %(default)s)")
    parser.add_argument("--also-pair-with", nargs="+", default=[], metavar="METHOD",
                        help="also pair every method with these (a table of final-accuracy differences each)")
    parser.add_argument("--keep-as", nargs="+", default=[], metavar="METHOD=NAME",
                        help="with --keep: keep METHOD's runs under NAME (e.g. hs_star=hs_star_same_steps), so "
                             "runs of one method under different settings can sit in one kept study")
    parser.add_argument("--keep", type=Path, default=None,
                        help="also write each run's small summary (<keep>/<method>/seed_<s>/run.json) and the "
                             "study's settings (study.json) there, for the repository; --rebuild tabulates them")
    parser.add_argument("--match-examples-to", default=None, metavar="METHOD",
                        help="step-matched comparison: on each seed, METHOD runs first and every other method "
                             "trains on a seeded subsample of its own pairs of the same size "
                             "(self_training.selection.max_examples), so all take the same optimizer steps; "
                             "one iteration per run")
    parser.add_argument("--rebuild", type=Path, default=None, metavar="ROOT",
                        help="only re-tabulate every kept study under ROOT (folders with a study.json) into "
                             "its comparison.md, from the kept summaries; runs nothing")
    args, fit_args = parser.parse_known_args(argv)
    if args.rebuild is not None:
        for path in rebuild(args.rebuild):
            print(f"[compare] wrote {path}", flush=True)
        return
    bad = [a for a in fit_args if not (a.startswith("--") and "=" in a)]
    if bad:
        parser.error(f"unrecognized arguments {bad}: options for hs-star fit are passed as --dotted.key=value")

    missing = [str(p) for p in args.base if not p.exists()]
    if missing:
        raise SystemExit(f"--base: {', '.join(missing)} does not exist")
    methods = method_paths(args.methods_dir, args.methods or list(STUDIES[args.study]))
    check_yaml_files([*args.base, *(p for p in methods.values() if p is not None)])
    if args.baseline not in methods:
        raise SystemExit(f"--baseline {args.baseline} is not among the methods {list(methods)}")
    bad_names = [a for a in args.keep_as if "=" not in a or a.split("=", 1)[0] not in methods]
    if bad_names:
        raise SystemExit(f"--keep-as {bad_names}: each must be METHOD=NAME with METHOD among {list(methods)}")
    keep_names = dict(a.split("=", 1) for a in args.keep_as)
    expected = n_iterations(args.base, fit_args)
    match = args.match_examples_to
    if match is not None:
        if match not in methods:
            raise SystemExit(f"--match-examples-to {match} is not among the methods {list(methods)}")
        if expected != 1:
            raise SystemExit(f"--match-examples-to needs one iteration per run (--self_training.n_iterations=1), "
                             f"not {expected}: later rounds draw from policies that differ")
        if any(a.startswith("--self_training.selection.max_examples=") for a in fit_args):
            raise SystemExit("--match-examples-to sets self_training.selection.max_examples itself; do not pass it")
        methods = {match: methods[match], **{m: o for m, o in methods.items() if m != match}}
    own_m0 = {method: "--evaluate-m0-every-run" if args.evaluate_m0_every_run else changes_m0_evaluation(overlay)
              for method, overlay in methods.items()}
    for method, why in own_m0.items():
        if why and not args.report_only:
            print(f"[compare] {method}: every run evaluates M_0 itself ({why})", flush=True)
    results: list[RunResult] = []
    for seed in args.seeds:  # seed-major: a partial comparison already covers every method
        reference: RunResult | None = None
        for method, overlay in methods.items():
            directory = run_dir(args.out, method, seed)
            if args.report_only:
                found = collect(directory, method, seed, args.group_by)
                if found is not None:
                    results.append(found)
                    if args.keep is not None:
                        keep(renamed(found, keep_names), run_dir(args.keep, keep_names.get(method, method), seed))
                continue
            extra = list(fit_args)
            if match is not None and method != match:
                extra.append(f"--self_training.selection.max_examples={reference.pairs[0]}")
            result = run_one(args.base, overlay, seed, directory, expected, method, extra,
                             share_m0_from=None if own_m0[method] else args.out, group_by=args.group_by)
            if method == match:
                reference = result
            elif match is not None and result.pairs != reference.pairs:
                print(f"[compare] {method} seed {seed}: made {result.selected or result.pairs} pairs, fewer than {match}'s "
                      f"{reference.pairs}: the steps are not matched on this seed", flush=True)
            results.append(result)
            if args.keep is not None:
                keep(renamed(result, keep_names), run_dir(args.keep, keep_names.get(method, method), seed))
    order = list(methods)
    results.sort(key=lambda r: (order.index(r.method), r.seed))
    if not results:
        raise SystemExit(f"no finished runs under {args.out}")
    if args.keep is not None:  # each run was kept as it finished (or was found), so a failed run loses none
        write_study(args.keep, [keep_names.get(m, m) for m in order], expected, keep_names.get(args.baseline, args.baseline),
                    args.group_by, ["python -m hs_star_pl.experiments.compare", *(argv if argv is not None else sys.argv[1:])],
                    [keep_names.get(m, m) for m in args.also_pair_with])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"comparison_{'custom' if args.methods else args.study}"
    table = tabulate(results, expected, args.baseline, args.group_by, args.also_pair_with)
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(
        json.dumps([{**r.__dict__, "pairs_per_1000": r.pairs_per_1000} for r in results], indent=2) + "\n"
    )
    plotted = plot(results, expected, stem.with_suffix(".png"))
    print(table, flush=True)
    print(f"[compare] wrote {stem}.md, .json" + (", .png" if plotted else ""), flush=True)


if __name__ == "__main__":
    main()
