"""The method comparison (``python -m hs_star_pl.experiments.compare``) through real runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hs_star_pl.core.artifacts import read_jsonl
from hs_star_pl.experiments.compare import (
    STUDIES,
    RunResult,
    changes_m0_evaluation,
    collect,
    method_paths,
    paired_t_interval,
    details,
    first_round_overlap,
    fit_command,
    n_iterations,
    report,
    share_m0_evaluation,
)
from tests.helpers.self_training import CONFIGS, env


def compare(args: list[str], cwd) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "hs_star_pl.experiments.compare", *args], cwd=cwd, env=env(),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.mark.integration
def test_two_methods_from_one_m0_at_equal_budget_then_a_rerun_reuses_them(tiny_m0, tmp_path):
    m0, problems = tiny_m0
    out = tmp_path / "cmp"
    args = [
        "--base", str(CONFIGS / "tiny" / "hs_star.yaml"), "--methods-dir", str(CONFIGS / "tiny" / "methods"),
        "--methods", "hs_star", "uniform", "--seeds", "0", "--out", str(out),
        f"--model.model_path={m0}", f"--self_training.problems_file={problems}",
        "--self_training.problems_per_iteration=24", "--self_training.n_iterations=1", "--trainer.max_epochs=1",
        "--self_training.sampling.max_new_tokens=48",
        f"--evaluation.problems_file={problems.with_name('test.jsonl')}", "--evaluation.max_new_tokens=48",
    ]
    first = compare(args, tmp_path)
    runs = {r["method"]: r for r in json.loads((out / "comparison_custom.json").read_text())}
    assert set(runs) == {"hs_star", "uniform"}
    hs, uniform = runs["hs_star"], runs["uniform"]
    # one M_0 and greedy evaluation: both methods start from the same measured accuracy
    assert len(hs["accuracy"]) == len(uniform["accuracy"]) == 2
    assert hs["accuracy"][0] == uniform["accuracy"][0]
    # ... which the second run copied from the first instead of evaluating it again (an
    # evaluation of its own would record its own timing)
    m0_results = [(out / m / "seed_0" / "eval" / "test" / "policy_000.json").read_bytes() for m in ("hs_star", "uniform")]
    assert m0_results[0] == m0_results[1]
    assert "uniform seed 0: M_0's evaluation copied" in first.stdout
    # equal budget, K * N samples each; hierarchical spends only n_p = 3 on non-boundary problems
    assert hs["samples"] == uniform["samples"] == [24 * 8]
    per_class = hs["samples_per_class"]
    assert sum(per_class.values()) == 24 * 8
    round0 = json.loads((out / "hs_star" / "seed_0" / "rounds" / "round_000" / "summary.json").read_text())
    assert per_class["inlier"] == 3 * round0["n_inlier"] and per_class["outlier"] == 3 * round0["n_outlier"]
    assert hs["pairs_per_1000"] == pytest.approx(1000 * round0["n_pairs"] / (24 * 8))
    # where the pairs came from: HS-STaR trains on boundary problems only, uniform on any class
    pairs = read_jsonl(out / "hs_star" / "seed_0" / "rounds" / "round_000" / "pairs.jsonl")
    assert sum(hs["pairs_per_class"].values()) == round0["n_pairs"] == len(pairs)
    assert hs["pairs_per_class"]["inlier"] == hs["pairs_per_class"]["outlier"] == 0
    assert hs["problems_with_pairs"] == [len({p["problem_id"] for p in pairs})]
    # the final policy's accuracy by chain length adds up to its accuracy
    by_steps = uniform["final_by_group"]
    n_test = sum(total for _, total in by_steps.values())
    assert n_test == len(read_jsonl(problems.with_name("test.jsonl")))
    assert sum(correct for correct, _ in by_steps.values()) / n_test == pytest.approx(uniform["accuracy"][-1])
    table = (out / "comparison_custom.md").read_text().splitlines()
    assert table[0].startswith("| method | seeds | M_0 | M_1 |")
    assert [row.split("|")[1].strip() for row in table[2:4]] == ["hs_star", "uniform"]
    assert table[5].startswith("| method | problems with a pair / round |")
    assert (out / "comparison_custom.png").stat().st_size > 0

    # the same command again finds both runs finished and only re-tabulates
    logs = {m: (out / m / "seed_0" / "compare.log").stat().st_mtime_ns for m in runs}
    again = compare(args, tmp_path)
    assert again.stdout.count("done already") == 2
    assert {m: (out / m / "seed_0" / "compare.log").stat().st_mtime_ns for m in runs} == logs


def test_unknown_method_and_stray_arguments_are_refused_with_the_choices(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown \['nope'\].*uniform"):
        method_paths(CONFIGS / "tiny" / "methods", ["hs_star", "nope"])
    bad = subprocess.run([sys.executable, "-m", "hs_star_pl.experiments.compare", "stray", "--seeds", "0"],
                         cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "--dotted.key=value" in bad.stderr


@pytest.mark.parametrize("broken", ["base", "overlay"])
def test_a_broken_yaml_is_one_line_naming_file_and_line_exit_2(broken, tmp_path):
    """As ``hs-star fit`` answers it; a broken overlay used to end in a traceback, exit 1."""
    methods = tmp_path / "methods"
    methods.mkdir()
    base, overlay = tmp_path / "base.yaml", methods / "other.yaml"
    base.write_text("self_training:\n  n_iterations: 2\n")
    overlay.write_text("model:\n  beta: 0.2\n")
    (base if broken == "base" else overlay).write_text("model:\n  beta: [0.1\n")
    out = subprocess.run([sys.executable, "-m", "hs_star_pl.experiments.compare", "--base", str(base),
                          "--methods-dir", str(methods), "--methods", "hs_star", "other", "--seeds", "0",
                          "--out", str(tmp_path / "out")], cwd=tmp_path, env=env(), capture_output=True, text=True)
    path = base if broken == "base" else overlay
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"compare: error: {path}:3: invalid YAML: ")
    assert not (tmp_path / "out").exists()


def test_several_base_configs_apply_in_order_and_the_last_to_set_the_iteration_count_wins(tmp_path):
    demo, overlay, silent = tmp_path / "demo.yaml", tmp_path / "study.yaml", tmp_path / "silent.yaml"
    demo.write_text("self_training:\n  n_iterations: 3\n")
    overlay.write_text("self_training:\n  n_iterations: 2\n  problems_file: pool.jsonl\n")
    silent.write_text("model:\n  beta: 0.2\n")
    assert n_iterations([demo], []) == 3
    assert n_iterations([demo, overlay], []) == 2
    assert n_iterations([demo, overlay, silent], []) == 2
    assert n_iterations([demo, overlay], ["--self_training.n_iterations=1"]) == 1
    with pytest.raises(SystemExit, match="n_iterations is required"):
        n_iterations([silent], [])
    cmd = fit_command([demo, overlay], tmp_path / "m.yaml", 4, tmp_path / "run", resume=False)
    configs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-c"]
    assert configs == [str(demo), str(overlay), str(tmp_path / "m.yaml")]
    assert "--seed_everything=4" in cmd


def test_report_gives_mean_and_sd_over_seeds_per_iteration():
    runs = [
        RunResult("a", 0, [0.2, 0.4], [10], [100], {"inlier": 30, "boundary": 60, "outlier": 10}),
        RunResult("a", 1, [0.2, 0.6], [30], [100], {"inlier": 30, "boundary": 60, "outlier": 10}),
    ]
    row = report(runs, 1).splitlines()[2].split("|")
    # M_1: mean 0.5, sample sd 0.1414; gain 0.3 ± 0.1414; (10 + 30) pairs over 2 x 100 rollouts
    assert [c.strip() for c in row[1:-1]] == ["a", "0,1", "0.200 ± 0.000", "0.500 ± 0.141", "0.300 ± 0.141", "200.0",
                                             "30.0", "60.0", "10.0", ""]


def test_report_pairs_each_method_with_the_baseline_on_the_same_seeds():
    """b - hs_star at seeds 0 and 1: 0.5 - 0.4 and 0.45 - 0.5; seed 2 has no hs_star run."""
    def run(method, seed, final):
        return RunResult(method, seed, [0.3, final], [1], [10], {"inlier": 0, "boundary": 10, "outlier": 0})
    runs = [run("hs_star", 0, .4), run("hs_star", 1, .5), run("b", 0, .5), run("b", 1, .45), run("b", 2, .9)]
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in report(runs, 1).splitlines()[2:]}
    # differences 0.1 and -0.05: mean 0.025, sd 0.1061, se 0.075; t(0.975, 1 df) = 12.706
    # gives a half-width of 0.953
    assert rows == {"hs_star": "", "b": "+0.025 [-0.928, +0.978]"}


def test_paired_t_interval_by_hand():
    """Five seeds, differences 0.01, 0.02, 0.03, 0.04, 0.05: mean 0.03, sd 0.01581,
    se 0.007071, t(0.975, 4 df) = 2.7764 -> 0.03 ± 0.01963."""
    mean, low, high = paired_t_interval([0.01, 0.02, 0.03, 0.04, 0.05])
    assert (mean, low, high) == pytest.approx((0.03, 0.01037, 0.04963), abs=1e-5)
    assert paired_t_interval([0.2]) is None


def test_studies_name_existing_overlays():
    for study, names in STUDIES.items():
        assert set(method_paths(CONFIGS / "tiny" / "methods", list(names))) == set(names), study


def test_m0_evaluation_is_shared_only_between_runs_whose_overlay_leaves_m0_and_its_evaluation_alone(tmp_path):
    methods = CONFIGS / "tiny" / "methods"
    assert changes_m0_evaluation(None) is None
    assert changes_m0_evaluation(methods / "uniform.yaml") is None
    assert "['model']" in changes_m0_evaluation(methods / "paper_dpo.yaml")

    out = tmp_path / "cmp"
    first = out / "hs_star" / "seed_0"
    (first / "eval" / "test").mkdir(parents=True)
    (first / "eval" / "test" / "policy_000.json").write_text('{"summary": {"accuracy": 0.25}}')
    assert share_m0_evaluation(out, first) is None  # never onto itself
    fresh = out / "uniform" / "seed_3"
    copied = share_m0_evaluation(out, fresh)
    assert copied == fresh / "eval" / "test" / "policy_000.json"
    assert copied.read_text() == '{"summary": {"accuracy": 0.25}}'
    (copied).write_text('{"summary": {"accuracy": 0.5}}')
    assert share_m0_evaluation(out, fresh) is None  # a run with its own M_0 result keeps it
    assert json.loads(copied.read_text())["summary"]["accuracy"] == 0.5


def test_details_by_hand():
    a = RunResult("hs_star", 0, [0.2, 0.3], [3], [24], pairs_per_class={"inlier": 0, "boundary": 3, "outlier": 0},
                  problems_with_pairs=[2], final_by_group={"2": [3, 4], "3": [1, 4]})
    b = RunResult("hs_star", 1, [0.2, 0.4], [5], [24], pairs_per_class={"inlier": 0, "boundary": 4, "outlier": 1},
                  problems_with_pairs=[4], final_by_group={"2": [4, 4], "3": [2, 4]})
    lines = details([a, b]).splitlines()
    assert lines[0] == ("| method | problems with a pair / round | pairs per such problem | % pairs from inlier | "
                        "% pairs from boundary | % pairs from outlier | final acc., n_steps=2 | final acc., n_steps=3 |")
    # 6 problems over 2 rounds, 8 pairs; 7 of 8 pairs from boundary problems; per-seed group accuracies 0.75/1.0, 0.25/0.5
    assert lines[2] == "| hs_star | 3.0 | 1.33 | 0.0 | 87.5 | 12.5 | 0.875 ± 0.177 | 0.375 ± 0.177 |"


def _run_on_disk(out, method, seed, accuracy, classes, paired, selected=None):
    """A finished one-round run folder as ``hs-star fit`` leaves it (the files compare reads)."""
    root = out / method / f"seed_{seed}"
    (root / "eval" / "test").mkdir(parents=True)
    for t, acc in enumerate(accuracy):
        (root / "eval" / "test" / f"policy_{t:03d}.json").write_text(json.dumps({"summary": {"accuracy": acc}, "rows": []}))
    directory = root / "rounds" / "round_000"
    directory.mkdir(parents=True)
    (directory / "difficulty.jsonl").write_text(
        "".join(json.dumps({"problem_id": p, "difficulty": c}) + "\n" for p, c in classes.items()))
    (directory / "pairs.jsonl").write_text("".join(json.dumps({"problem_id": p}) + "\n" for p in paired))
    summary = {"n_pairs": len(paired), "samples_total": 8 * len(classes),
               "samples_per_class": {"boundary": 8 * len(classes)}}
    if selected is not None:
        summary["n_examples_selected"] = selected
    (directory / "summary.json").write_text(json.dumps(summary))
    return root


def test_first_round_overlap_labels_every_method_with_the_baselines_classes(tmp_path):
    """Per seed, each method's paired problems are counted in the class the baseline gave them."""
    seed0 = {"a": "inlier", "b": "inlier", "c": "boundary", "d": "outlier"}
    seed1 = {"a": "inlier", "b": "boundary", "c": "boundary", "d": "outlier"}
    everything = {"a": "boundary", "b": "boundary", "c": "boundary", "d": "boundary", "x": "boundary"}
    _run_on_disk(tmp_path, "hs_star", 0, [0.1, 0.2], seed0, paired=["c", "c"])
    _run_on_disk(tmp_path, "hs_star", 1, [0.1, 0.2], seed1, paired=["b", "c"])
    _run_on_disk(tmp_path, "uniform", 0, [0.1, 0.2], everything, paired=["a", "c", "d", "x"])  # x: not drawn by the baseline
    _run_on_disk(tmp_path, "uniform", 1, [0.1, 0.2], everything, paired=["a"])
    runs = [collect(tmp_path / m / f"seed_{s}", m, s) for m in ("hs_star", "uniform") for s in (0, 1)]
    lines = first_round_overlap(runs).splitlines()
    assert lines[0] == ("| method | seeds | inlier: with a pair / in class | boundary: with a pair / in class | "
                        "outlier: with a pair / in class |")
    # hs_star: inliers 0/2, 0/1; boundary 1/1, 2/2; outliers 0/1, 0/1
    assert lines[2] == "| hs_star | 0,1 | 0.0 / 1.5 | 1.5 / 1.5 | 0.0 / 1.0 |"
    # uniform: inliers 1/2 and 1/1; boundary 1/1 and 0/2; outliers 1/1 and 0/1
    assert lines[3] == "| uniform | 0,1 | 1.0 / 1.5 | 0.5 / 1.5 | 0.5 / 1.0 |"
    assert first_round_overlap(runs[2:]) == ""  # no baseline run


def test_a_kept_summary_tabulates_like_the_run_folder_it_came_from(tmp_path):
    """``keep`` writes one small run.json per run; ``collect`` reads it where the run folder is
    gone, and ``--rebuild`` re-makes every table of a kept study from those files alone, per-seed
    values and the cut pair counts included."""
    from hs_star_pl.experiments.compare import keep, main

    classes = {"a": "inlier", "b": "boundary", "c": "outlier"}
    runs = tmp_path / "runs"
    _run_on_disk(runs, "uniform", 0, [0.5, 0.625], classes, paired=["a", "b"])
    _run_on_disk(runs, "hs_star", 0, [0.5, 0.5], classes, paired=["b", "b"], selected=5)
    _run_on_disk(runs, "uniform", 1, [0.5, 0.75], classes, paired=["b", "c"])
    _run_on_disk(runs, "hs_star", 1, [0.5, 0.625], classes, paired=["b", "b"], selected=4)
    from_runs = [collect(runs / m / f"seed_{s}", m, s) for m in ("hs_star", "uniform") for s in (0, 1)]
    kept = tmp_path / "kept"
    for r in from_runs:
        keep(r, kept / r.method / f"seed_{r.seed}")
    assert [collect(kept / r.method / f"seed_{r.seed}", r.method, r.seed) for r in from_runs] == from_runs
    assert from_runs[0].selected == [5] and from_runs[0].pairs == [2] and from_runs[2].selected == [2]
    main(["--base", str(CONFIGS / "tiny" / "hs_star.yaml"), "--methods-dir", str(CONFIGS / "tiny" / "methods"),
          "--methods", "hs_star", "uniform", "--seeds", "0", "1", "--out", str(kept), "--report-only",
          "--keep", str(kept), "--self_training.n_iterations=1"])
    spec = json.loads((kept / "study.json").read_text())
    assert (spec["methods"], spec["n_iterations"], spec["baseline"]) == (["hs_star", "uniform"], 1, "hs_star")
    main(["--rebuild", str(tmp_path)])
    table = (kept / "comparison.md").read_text()
    assert table.endswith((kept / "comparison_custom.md").read_text())
    # the per-seed rows: uniform − hs_star is +0.125 on both seeds; hs_star made 5 and 4 pairs and trained on 2
    assert "| hs_star | 0 | 0.500 |  | 2 | 5 |" in table and "| hs_star | 1 | 0.625 |  | 2 | 4 |" in table
    assert "| uniform | 0 | 0.625 | +0.125 | 2 | 2 |" in table and "| uniform | 1 | 0.750 | +0.125 | 2 | 2 |" in table
    (kept / "uniform" / "seed_1" / "run.json").write_text('{"version": 99}')
    with pytest.raises(SystemExit, match="not a kept run summary"):
        main(["--rebuild", str(tmp_path)])


def test_match_examples_to_caps_every_other_method_at_the_reference_runs_pairs(tmp_path, monkeypatch):
    """On each seed the reference runs first and the others get its pair count as
    ``selection.max_examples``; more than one iteration is refused."""
    import hs_star_pl.experiments.compare as cmp

    given = []

    def recording_run_one(base, overlay, seed, directory, expected, method, fit_args, share_m0_from=None, group_by="n_steps"):
        cap = [int(a.split("=")[1]) for a in fit_args if "max_examples" in a]
        given.append((method, seed, [a for a in fit_args if "max_examples" in a]))
        made = {"uniform": 10 + seed, "hs_star": 20}[method]
        return RunResult(method, seed, [0.5, 0.6], [min([made, *cap])], [80], dict.fromkeys(("inlier", "boundary", "outlier"), 1),
                         selected=[made])

    monkeypatch.setattr(cmp, "run_one", recording_run_one)
    base = ["--base", str(CONFIGS / "tiny" / "hs_star.yaml"), "--methods-dir", str(CONFIGS / "tiny" / "methods"),
            "--methods", "hs_star", "uniform", "--out", str(tmp_path / "out")]
    cmp.main([*base, "--seeds", "0", "1", "--match-examples-to", "uniform", "--self_training.n_iterations=1"])
    assert given == [("uniform", 0, []), ("hs_star", 0, ["--self_training.selection.max_examples=10"]),
                     ("uniform", 1, []), ("hs_star", 1, ["--self_training.selection.max_examples=11"])]
    with pytest.raises(SystemExit, match="one iteration"):
        cmp.main([*base, "--match-examples-to", "uniform", "--self_training.n_iterations=3"])
    with pytest.raises(SystemExit, match="not among the methods"):
        cmp.main([*base, "--match-examples-to", "proportional", "--self_training.n_iterations=1"])


def test_group_by_splits_the_final_accuracy_by_a_problem_field_from_the_cli(tmp_path):
    """``--group-by family`` reads each evaluated problem's field from the evaluated file; a
    field the problems lack gives no split."""
    from hs_star_pl.experiments.compare import accuracy_by_group, main

    problems = tmp_path / "test.jsonl"
    families = {"a": "reach", "b": "reach", "c": "beyond"}
    problems.write_text("".join(
        json.dumps({"id": pid, "question": f"q {pid}", "answer": "1", "family": fam}) + "\n" for pid, fam in families.items()))
    run = tmp_path / "out" / "hs_star" / "seed_0" / "eval" / "test"
    run.mkdir(parents=True)
    for t, correct in enumerate(([1, 0, 0], [1, 1, 0])):
        rows = [{"problem_id": pid, "n_correct": c, "correct": [bool(c)]} for pid, c in zip(families, correct)]
        (run / f"policy_{t:03d}.json").write_text(json.dumps(
            {"summary": {"accuracy": sum(correct) / 3}, "rows": rows, "problems_file": str(problems)}))
    assert accuracy_by_group(run / "policy_001.json", "family") == {"reach": [2, 2], "beyond": [0, 1]}
    assert accuracy_by_group(run / "policy_001.json", "n_steps") == {}  # not a field of these problems
    main(["--base", str(CONFIGS / "tiny" / "hs_star.yaml"), "--methods-dir", str(CONFIGS / "tiny" / "methods"),
          "--methods", "hs_star", "--seeds", "0",
          "--out", str(tmp_path / "out"), "--report-only", "--group-by", "family", "--self_training.n_iterations=1"])
    table = (tmp_path / "out" / "comparison_custom.md").read_text()
    assert "final acc., family=reach | final acc., family=beyond |" in table
    assert "| hs_star | " in table and " | 1.000 | 0.000 |" in table


def test_two_comparisons_keep_one_study_under_other_names_and_pair_by_hand(tmp_path):
    """The same method with and without a setting, from two ``--out`` folders, kept as one
    study (``--keep-as``), paired with each other (``--also-pair-with``) seed by seed."""
    from hs_star_pl.experiments.compare import main, paired_table

    classes = {"a": "boundary"}
    capped, free, kept = tmp_path / "capped", tmp_path / "free", tmp_path / "kept"
    for seed, (u, h_cap, h_free) in enumerate([(0.7, 0.68, 0.66), (0.72, 0.71, 0.69), (0.69, 0.69, 0.70)]):
        _run_on_disk(capped, "uniform", seed, [0.6, u], classes, paired=["a"])
        _run_on_disk(capped, "hs_star", seed, [0.6, h_cap], classes, paired=["a"], selected=3)
        _run_on_disk(free, "uniform", seed, [0.6, u], classes, paired=["a"])
        _run_on_disk(free, "hs_star", seed, [0.6, h_free], classes, paired=["a", "a", "a"])
    common = ["--base", str(CONFIGS / "tiny" / "hs_star.yaml"), "--methods-dir", str(CONFIGS / "tiny" / "methods"),
              "--seeds", "0", "1", "2", "--report-only", "--keep", str(kept), "--self_training.n_iterations=1"]
    main([*common, "--methods", "hs_star", "uniform", "--out", str(capped), "--keep-as", "hs_star=hs_star_same_steps",
          "--baseline", "uniform", "--also-pair-with", "hs_star"])
    main([*common, "--methods", "hs_star", "uniform", "--out", str(free), "--baseline", "uniform", "--also-pair-with", "hs_star"])
    spec = json.loads((kept / "study.json").read_text())
    assert spec["methods"] == ["hs_star_same_steps", "uniform", "hs_star"] and len(spec["commands"]) == 2
    main(["--rebuild", str(kept)])
    table = (kept / "comparison.md").read_text()
    # hs_star_same_steps − hs_star: +0.02, +0.02, −0.01: mean +0.010, sd 0.01732, t_{0.975,2} = 4.303
    assert "| hs_star_same_steps | 0,1,2 | +0.010 [-0.033, +0.053] | +0.020 / +0.020 / -0.010 |" in table
    from hs_star_pl.experiments.compare import load_kept
    runs = [load_kept(p) for p in sorted(kept.glob("*/seed_*/run.json"))]
    assert {r.method for r in runs} == {"hs_star_same_steps", "uniform", "hs_star"}
    assert paired_table(runs, 1, "nobody") == ""
    with pytest.raises(SystemExit, match="other settings"):
        main([*common, "--methods", "hs_star", "--out", str(free)])  # baseline hs_star: another study
