"""The experiment trackers see the run: TensorBoard and W&B (offline), read back from what they wrote.

One tiny self-training round through the real CLI (``SolutionEngine`` answers every problem
right and wrong, so the round has pairs; one DPO epoch; the evaluation of M_0 and M_1 on 3
problems), logged to the loggers a YAML file names. TensorBoard's event files are read with
its own ``EventAccumulator``; the W&B run file with wandb's protobuf classes
(``tests/helpers/wandb_offline.py``) and its media files. No network: W&B runs offline.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math

import pytest
import yaml

from hs_star_pl.cli import HSStarCLI
from hs_star_pl.core.artifacts import read_jsonl, round_dir
from hs_star_pl.training.tracking import excerpt, markdown_table, pair_rows
from tests.helpers.tiny_setup import REPO, STEPWISE_FILE

CONFIGS = REPO / "configs"
CSV = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "logs"}}
TENSORBOARD = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"name": "tb"}}
WANDB = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"offline": True, "project": "hs-star-test"}}


def _round_args(run, *extra: str) -> list[str]:
    """One iteration on the 10 shipped step-format problems, a width-32 policy: seconds."""
    return ["fit", "-c", str(CONFIGS / "base.yaml"), "-c", str(CONFIGS / "debug" / "tiny_self_training.yaml"),
            "--model.tiny.hidden_size=32", "--data.max_length=512", "--data.batch_size=64",
            f"--self_training.problems_file={STEPWISE_FILE}", "--self_training.n_iterations=1",
            "--self_training.engine=tests.helpers.solution_engine.SolutionEngine",
            f"--self_training.engine.init_args.problems_file={STEPWISE_FILE}", "--export.enabled=false",
            f"--evaluation.problems_file={STEPWISE_FILE}", "--evaluation.max_problems=3",
            "--evaluation.max_new_tokens=4", f"--trainer.default_root_dir={run}", *extra]


def _loggers_file(path, *loggers) -> str:
    path.write_text(yaml.safe_dump({"trainer": {"logger": list(loggers)}}))
    return str(path)


# -- the pieces -------------------------------------------------------------------------------


def test_excerpts_keep_both_ends_of_a_long_response_on_one_line():
    assert excerpt("Step 1: 2 + 3 = 5\n\nThe answer is \\boxed{5}.", 100) == "Step 1: 2 + 3 = 5 The answer is \\boxed{5}."
    cut = excerpt("a" * 50 + " middle " + "z" * 50, 23)
    assert cut == "a" * 10 + " … " + "z" * 10


def test_a_rounds_pairs_table_is_a_spread_of_its_pairs_with_scores():
    from hs_star_pl.core.records import PreferencePair

    pairs = [PreferencePair(f"p{i}", f"prompt {i}", f"right {i}", f"wrong | {i}", f"c{i}", f"r{i}",
                            chosen_score=0.9, rejected_score=None) for i in range(20)]
    rows = pair_rows(pairs, {"p0": "What is 2+3?"}, n=8)
    assert [r["problem_id"] for r in rows] == ["p0", "p2", "p5", "p7", "p10", "p12", "p15", "p17"]
    assert rows[0] == {"problem_id": "p0", "question": "What is 2+3?", "chosen": "right 0", "chosen_score": 0.9,
                       "rejected": "wrong | 0", "rejected_score": None}
    assert rows[1]["question"] == "prompt 2"  # no question known: the prompt
    assert len(pair_rows(pairs[:3], {})) == 3 and pair_rows([], {}) == []
    table = markdown_table(rows[:1]).splitlines()
    assert table[0] == "| problem_id | question | chosen | chosen_score | rejected | rejected_score |"
    assert table[2] == "| p0 | What is 2+3? | right 0 | 0.9 | wrong \\| 0 | - |"


# -- TensorBoard (with the CSV logger beside it) ----------------------------------------------


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    """The round logged to a CSV and a TensorBoard logger (both following the run folder),
    gradients clipped to 1e-6, progress bars on; returns ``(run folder, cli, stderr)``."""
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("tb")
    run = root / "run"
    loggers = _loggers_file(root / "loggers.yaml", CSV, TENSORBOARD)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        cli = HSStarCLI(args=_round_args(run, "-c", loggers, "--trainer.gradient_clip_val=1e-6",
                                         "--trainer.enable_progress_bar=true"))
    return run, cli, stderr.getvalue()


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = (run / "tb").glob("version_*")
    events = EventAccumulator(str(version), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_gets_the_rounds_data_and_evaluation_numbers(tensorboard_run):
    run, cli, _ = tensorboard_run
    assert [type(lg).__name__ for lg in cli.trainer.loggers] == ["CSVLogger", "TensorBoardLogger"]
    assert all(lg.save_dir == str(run) for lg in cli.trainer.loggers)
    events = _events(run)
    scalars = set(events.Tags()["scalars"])
    summary = json.loads((round_dir(run, 0) / "summary.json").read_text())
    for key in ("n_pairs", "n_boundary", "samples_total", "presample_accuracy"):
        (logged,) = events.Scalars(f"round/{key}")
        assert logged.step == 0 and logged.value == pytest.approx(summary[key]), key
    assert {"data/n_examples", "data/n_dropped", "eval/test_accuracy", "eval/average_accuracy", "eval/policy"} <= scalars
    assert [e.value for e in events.Scalars("eval/policy")] == [0.0, 1.0]
    # the same numbers reach the CSV logger: one helper serves every logger
    rows = list(csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv")))))
    assert [float(r["round/n_pairs"]) for r in rows if r.get("round/n_pairs")] == [summary["n_pairs"]]
    assert [float(r["data/n_examples"]) for r in rows if r.get("data/n_examples")] == [summary["n_pairs"]]
    assert len([r for r in rows if r.get("eval/test_accuracy")]) == 2


def test_tensorboard_gets_the_plots_as_images_and_the_pairs_as_text(tensorboard_run):
    from PIL import Image

    run, _, _ = tensorboard_run
    events = _events(run)
    assert {"round/difficulty", "rounds/accuracy", "eval/results"} <= set(events.Tags()["images"])
    assert "](results.png)" in (run / "results.md").read_text()  # results.md shows the picture
    for tag, png in (("round/difficulty", round_dir(run, 0) / "difficulty.png"), ("rounds/accuracy", run / "rounds" / "accuracy.png"),
                     ("eval/results", run / "results.png")):
        image = events.Images(tag)[-1]  # results.png: drawn again after each evaluation (M_0, then M_0 and M_1)
        with Image.open(png) as on_disk:
            assert (image.width, image.height) == on_disk.size, tag
        assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    (text,) = events.Tensors("round/pairs/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    pairs = read_jsonl(round_dir(run, 0) / "pairs.jsonl")
    lines = table.splitlines()
    assert lines[0].startswith("| problem_id | question | chosen | chosen_score |")
    assert len(lines) == 2 + min(8, len(pairs))
    assert pairs[0]["problem_id"] in lines[2] and str(round(pairs[0]["chosen_score"], 4)) in lines[2]
    # a sample of each evaluation's responses, per benchmark and policy, as a table
    texts = events.Tensors("eval/test/samples/text_summary")
    assert [t.step for t in texts] == sorted(t.step for t in texts) and len(texts) == 2  # M_0, M_1
    evaluated = json.loads((run / "eval" / "test" / "policy_001.json").read_text())["rows"]
    lines = texts[-1].tensor_proto.string_val[0].decode().splitlines()
    assert lines[0] == "| problem_id | question | gold | response | answer | correct | accuracy |"
    assert len(lines) == 2 + len(evaluated) and lines[2].startswith(f"| {evaluated[0]['problem_id']} |")


def test_dpo_logs_the_gradient_norm_before_clipping_and_the_policys_log_probs(tensorboard_run):
    run, _, _ = tensorboard_run
    events = _events(run)
    norms = [e.value for e in events.Scalars("train/grad_norm")]
    assert norms and all(math.isfinite(v) and v > 1e-3 for v in norms)  # clipped to 1e-6 after it was logged
    # one batch holds every pair, and at step 0 the policy is its own reference
    pairs = read_jsonl(round_dir(run, 0) / "pairs.jsonl")
    (chosen,) = events.Scalars("train/chosen_logps_step")
    (rejected,) = events.Scalars("train/rejected_logps_step")
    assert chosen.value == pytest.approx(sum(p["ref_chosen_logp"] for p in pairs) / len(pairs), rel=1e-4)
    assert rejected.value == pytest.approx(sum(p["ref_rejected_logp"] for p in pairs) / len(pairs), rel=1e-4)
    assert {"train/chosen_logps_epoch", "train/rejected_logps_epoch"} <= set(events.Tags()["scalars"])


def test_the_reference_pass_and_the_evaluation_show_progress_bars(tensorboard_run):
    _, _, stderr = tensorboard_run
    assert "reference log-probs" in stderr
    assert "eval M_0 test" in stderr and "eval M_1 test" in stderr


# -- W&B, offline -----------------------------------------------------------------------------


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B offline and quiet, its caches, staging and settings under ``tmp_path`` (not the home
    folder); whatever the test left open is finished at the end."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("CACHE", "DATA", "CONFIG", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / "wandb_home" / name.lower()))
    yield wandb
    wandb.teardown()  # finishes a run left open and stops W&B's service, which holds these settings


def test_wandb_offline_gets_the_numbers_the_plots_and_a_pairs_table(offline_wandb, tmp_path):
    from tests.helpers.wandb_offline import history, media, run_dirs

    run = tmp_path / "run"
    cli = HSStarCLI(args=_round_args(run, "-c", _loggers_file(tmp_path / "loggers.yaml", WANDB),
                                     "--trainer.enable_progress_bar=false"))
    assert cli.trainer.logger.save_dir == str(run)  # W&B's default "." follows the run folder
    # What a process exit does (atexit): finish the run and wait until W&B's service has written
    # all of it; run.finish() alone returned before the history was in the run file.
    offline_wandb.teardown()
    (wandb_dir,) = run_dirs(run)
    rows = history(wandb_dir)
    summary = json.loads((round_dir(run, 0) / "summary.json").read_text())
    assert [r["round/n_pairs"] for r in rows if "round/n_pairs" in r] == [summary["n_pairs"]]
    assert [r["data/n_examples"] for r in rows if "data/n_examples" in r] == [summary["n_pairs"]]
    assert [r["eval/policy"] for r in rows if "eval/policy" in r] == [0, 1]
    assert [r for r in rows if "train/grad_norm" in r] and [r for r in rows if "train/chosen_logps_step" in r]
    for key in ("round/difficulty", "rounds/accuracy", "eval/results"):
        row = [r for r in rows if f"{key}/filenames" in r][-1]
        (name,) = row[f"{key}/filenames"]
        assert media(wandb_dir, name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
    samples = [r for r in rows if "eval/test/samples/path" in r]
    assert len(samples) == 2
    table = json.loads(media(wandb_dir, samples[-1]["eval/test/samples/path"]).read_text())
    assert table["columns"] == ["problem_id", "question", "gold", "response", "answer", "correct", "accuracy"]
    assert len(table["data"]) == 3  # evaluation.max_problems
    (row,) = [r for r in rows if "round/pairs/path" in r]
    table = json.loads(media(wandb_dir, row["round/pairs/path"]).read_text())
    pairs = read_jsonl(round_dir(run, 0) / "pairs.jsonl")
    assert table["columns"] == ["problem_id", "question", "chosen", "chosen_score", "rejected", "rejected_score"]
    assert len(table["data"]) == min(8, len(pairs)) and table["data"][0][0] == pairs[0]["problem_id"]


# -- the run folder with several loggers, or none ---------------------------------------------


def test_a_list_of_loggers_follows_the_run_folder_unless_one_sets_its_own(offline_wandb, tmp_path):
    run, mine = tmp_path / "run", tmp_path / "mine"
    loggers = _loggers_file(tmp_path / "loggers.yaml", TENSORBOARD, WANDB,
                            {**CSV, "init_args": {"name": "logs", "save_dir": str(mine)}},
                            {**WANDB, "init_args": {**WANDB["init_args"], "save_dir": str(mine / "wb")}},
                            {**WANDB, "init_args": {**WANDB["init_args"], "dir": str(mine / "wb_dir")}})
    cli = HSStarCLI(args=_round_args(run, "-c", loggers)[1:], run=False)  # no subcommand: built, not run
    assert [lg.save_dir for lg in cli.trainer.loggers] == [str(run), str(run), str(mine), str(mine / "wb"), str(mine / "wb_dir")]


def test_no_logger_at_all_still_trains_into_the_run_folder(tmp_path, capsys):
    """``trainer.logger: false``: nothing is logged, the base config's learning-rate monitor
    (which refuses a trainer without a logger) is left out, and the run folder is still the one key."""
    run = tmp_path / "run"
    cli = HSStarCLI(args=_round_args(run, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                                     "--evaluation.problems_file=null"))
    assert cli.trainer.loggers == []
    assert (run / "checkpoints" / "last.ckpt").is_file() and (round_dir(run, 0) / "summary.json").is_file()
    assert not (run / "logs").exists() and not (run / "lightning_logs").exists()


def test_a_config_without_a_logger_logs_csv_even_with_tensorboard_installed(tmp_path):
    """Lightning's own default would be TensorBoard once the trackers extra is installed; ours
    stays CSV, under the run folder, for a config that does not name a logger (the tiny demo's)."""
    pytest.importorskip("tensorboard")
    cli = HSStarCLI(args=["-c", str(REPO / "configs" / "debug" / "tiny_cpu.yaml"),
                          f"--trainer.default_root_dir={tmp_path / 'run'}"], run=False)
    assert [(type(l).__name__, l.log_dir) for l in cli.trainer.loggers] == [("CSVLogger", str(tmp_path / "run" / "logs" / "version_0"))]


# -- the plots themselves ---------------------------------------------------------------------


def test_results_png_draws_the_runs_own_policies_only(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from hs_star_pl.training.plots import plot_results, point_area

    def entry(policy, kind="iteration", **accuracies):
        return {"label": f"policy_{policy:03d}" if policy is not None else "m0", "policy": policy, "kind": kind,
                "benchmarks": {n: {"accuracy": a, "metric": "acc"} for n, a in accuracies.items()},
                "average": sum(accuracies.values()) / len(accuracies), "n_pairs": None if not policy else 100 * policy}

    png = tmp_path / "results.png"
    assert not plot_results(png, [entry(None, kind="test", gsm8k=0.5)]) and not png.exists()  # hs-star test alone
    assert plot_results(png, [entry(1, gsm8k=0.3, math=0.2), entry(0, gsm8k=0.25, math=0.1), entry(None, kind="test", gsm8k=0.9)])
    with Image.open(png) as image:
        assert image.size == (1000, 400)
    # a point standing for many problems is bigger, but not without bound
    assert point_area(1) == 12 and point_area(1) < point_area(5) < point_area(168) < 12 * 168
