"""The real ``hs-star`` entry point, in-process, on the tiny CPU config."""

from __future__ import annotations

import csv
import inspect
import math
import re
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from hs_star_pl.callback import SelfTrainingCallback
from hs_star_pl.cli import HSStarCLI
from hs_star_pl.data import MathDataModule
from hs_star_pl.eval_callback import EvaluationCallback
from hs_star_pl.export import HFExportCallback
from hs_star_pl.module import HSStarModule
from hs_star_pl.templates import render_prompt
from tests.helpers.tiny_setup import REPO

BASE = str(REPO / "configs" / "base.yaml")
TINY = str(REPO / "configs" / "debug" / "tiny_cpu.yaml")


def _run_args(tmp_path) -> list[str]:
    return [
        "-c", BASE, "-c", TINY,
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--data.train_file={REPO / 'configs' / 'data' / 'arith_pairs.jsonl'}",
        "--trainer.enable_progress_bar=false",
    ]


def test_fit_trains_saves_config_and_exports_each_iteration(tmp_path):
    pairs = REPO / "configs" / "data" / "arith_pairs.jsonl"
    cli = HSStarCLI(args=["fit", *_run_args(tmp_path), f"--data.val_file={pairs}"])
    assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 10  # 2 epochs x 20 pairs / 4

    saved = yaml.safe_load((tmp_path / "logs" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["objective"] == "dpo" and saved["data"]["template"] == "plain"
    assert saved["trainer"]["reload_dataloaders_every_n_epochs"] == 1

    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as fh:
        columns = set(next(csv.reader(fh)))
    for key in ("train/loss_step", "train/reward_accuracy_epoch", "train/margin_epoch", "train/chosen_reward_epoch",
                "train/rejected_reward_epoch", "train/tokens_per_s"):
        assert key in columns

    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as fh:
        val_losses = [float(r["val/loss"]) for r in csv.DictReader(fh) if r.get("val/loss")]
    # val pairs are the train pairs, scored against the iteration-start reference: after an
    # epoch of DPO they are below log 2 (a reference taken after training would give log 2)
    assert len(val_losses) == 2 and val_losses[-1] < math.log(2) - 1e-3

    for iteration in (0, 1):
        assert (tmp_path / "hf" / f"iteration_{iteration:03d}" / "config.json").is_file()
    export = tmp_path / "hf" / "iteration_001"
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = torch.tensor([tok.encode(render_prompt("plain", "Start with 4. Add 5. What is the result?"))])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    # the export is the trained policy, not the initial one
    torch.testing.assert_close(model(ids).logits, cli.model.model(ids).logits)

    # the same command again into the same folder works (config overwrite) and reuses the reference cache
    assert len(list((tmp_path / "reference_logps").glob("*.json"))) == 1
    HSStarCLI(args=["fit", *_run_args(tmp_path), "--trainer.max_epochs=1"])
    assert len(list((tmp_path / "reference_logps").glob("*.json"))) == 1


def test_help_lists_every_option_with_its_docstring(capsys):
    with pytest.raises(SystemExit) as exit_info:
        HSStarCLI(args=["fit", "--help"])
    assert exit_info.value.code == 0
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    linked = {"export.epochs_per_iteration", "evaluation.epochs_per_iteration"}  # follow self_training's
    groups = (("model", HSStarModule), ("data", MathDataModule), ("export", HFExportCallback),
              ("self_training", SelfTrainingCallback), ("evaluation", EvaluationCallback))
    for group, cls in groups:
        for name in inspect.signature(cls.__init__).parameters:
            if name == "self" or f"{group}.{name}" in linked:
                continue
            assert f"--{group}.{name}" in text, f"--{group}.{name} missing from --help"
    # docstring text (Args: blocks) reaches the help
    assert "DPO KL strength (IPO's tau)." in text
    assert "prompt template name (``hs_star_pl.templates``) used to render questions." in text
    assert "training epochs per iteration (paper: 1)." in text
    assert "--stepwise_init" in text and "M_0 is trained once, then reused" in text
    assert "the problem pool (JSONL, ``problems.load_problems`` format)." in text


def test_bad_value_is_reported_with_its_key(tmp_path):
    with pytest.raises(ValueError, match=r"model.objective must be one of \['dpo', 'sft'\], got 'ppo'"):
        HSStarCLI(args=[*_run_args(tmp_path), "--model.objective=ppo"], run=False)


def test_python_dash_m_entry_point_prints_config(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "hs_star_pl", "fit", "-c", BASE, "-c", TINY, "--print_config"],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    config = yaml.safe_load(out.stdout)
    assert config["model"]["tiny"]["hidden_size"] == 32
    assert config["self_training"]["epochs_per_iteration"] == 1
    assert config["self_training"]["problems_file"] is None  # inactive unless configured


def test_resume_from_last_ckpt_continues_without_recomputing_references(tmp_path):
    HSStarCLI(args=["fit", *_run_args(tmp_path), "--trainer.max_epochs=1"])
    (cache,) = (tmp_path / "reference_logps").glob("*.json")
    cached = cache.read_text()
    # one folder per run, not per logger version: `last` must resolve in the next run
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    cache.write_text(cached.replace("-", "-1000", 1))  # poison one value: a reread shows up in the loss
    cli = HSStarCLI(args=["fit", *_run_args(tmp_path), "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert cli.trainer.global_step == 10  # 5 restored + 5 new optimizer steps
    assert cli.datamodule.train_examples[0].ref_chosen_logp < -900  # read from the cache, not recomputed
    assert (tmp_path / "hf" / "iteration_001" / "config.json").is_file()


def test_validate_scores_a_checkpoint_against_the_configured_model(tmp_path):
    """``hs-star validate --ckpt_path``: the val pairs' reference is the model ``model.*`` names
    (taken before the checkpoint's weights replace it), so validating the trained checkpoint
    gives exactly the val loss the fit logged for it. Without a checkpoint the policy is its own
    reference: log 2, with a warning saying why."""
    pairs = str(REPO / "configs" / "data" / "arith_pairs.jsonl")
    fit = HSStarCLI(args=["fit", *_run_args(tmp_path), "--data.val_file", pairs])
    fit_val = float(fit.trainer.callback_metrics["val/loss"])
    assert fit_val < math.log(2) - 1e-3
    # space-separated "--key value" as well as "--key=value"
    checked = HSStarCLI(args=["validate", *_run_args(tmp_path), "--data.val_file", pairs,
                              "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt")])
    metrics = checked.trainer.callback_metrics
    assert float(metrics["val/loss"]) == pytest.approx(fit_val, abs=1e-5)
    assert float(metrics["val/reward_accuracy"]) > 0.5 and float(metrics["val/margin"]) > 0
    with pytest.warns(UserWarning, match="no --ckpt_path was given, so the policy is its own reference"):
        untrained = HSStarCLI(args=["validate", *_run_args(tmp_path), "--data.val_file", pairs])
    assert float(untrained.trainer.callback_metrics["val/loss"]) == pytest.approx(math.log(2), abs=1e-6)
