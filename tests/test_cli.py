"""The real ``hs-star`` entry point, in-process, on the tiny CPU config."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import math
import multiprocessing
import re
import subprocess
import shutil
import sys

import docstring_parser
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from hs_star_pl.training.self_training import SelfTrainingCallback
from hs_star_pl.cli import HSStarCLI
from hs_star_pl.core.templates import render_prompt
from hs_star_pl.infra.errors import ConfigError
from hs_star_pl.training.data import MathDataModule
from hs_star_pl.training.evaluation import EvaluationCallback
from hs_star_pl.training.export import HFExportCallback
from hs_star_pl.training.module import HSStarModule, TinyModelConfig
from hs_star_pl.tensors.schedules import WarmupCosineLR
from tests.helpers.tiny_setup import REPO

BASE = str(REPO / "configs" / "base.yaml")
TINY = str(REPO / "configs" / "debug" / "tiny_cpu.yaml")


def _run_args(tmp_path) -> list[str]:
    return [
        "-c", BASE, "-c", TINY,
        f"--trainer.default_root_dir={tmp_path}",
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
        assert (tmp_path / "hf" / f"policy_{iteration + 1:03d}" / "config.json").is_file()
    export = tmp_path / "hf" / "policy_002"
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = torch.tensor([tok.encode(render_prompt("plain", "Start with 4. Add 5. What is the result?"))])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    # the export is the trained policy, not the initial one
    torch.testing.assert_close(model(ids).logits, cli.model.model(ids).logits)

    # the same command again into the same folder is refused while it holds the finished run
    # (docs/reliability.md); with its checkpoints gone it runs (config overwrite) and reuses the
    # reference cache
    assert len(list((tmp_path / "reference_logps").glob("*.jsonl"))) == 1
    with pytest.raises(ConfigError, match="already holds a run .*add --ckpt_path last"):
        HSStarCLI(args=["fit", *_run_args(tmp_path), "--trainer.max_epochs=1"])
    shutil.rmtree(tmp_path / "checkpoints")
    HSStarCLI(args=["fit", *_run_args(tmp_path), "--trainer.max_epochs=1"])
    assert len(list((tmp_path / "reference_logps").glob("*.jsonl"))) == 1


def _help_options(text: str) -> dict[str, str]:
    """``--option`` -> its help text, without the metavar and the ``(type: ..., default: ...)`` tail."""
    options: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^  (--[\w.]+)(?: (?:\{[^}]*\}|\[[^\]]*\]|[A-Z_]+))?(.*)$", line)
        if match:
            current = match.group(1)
            options[current] = match.group(2)
        elif current is not None and line.startswith(" " * 24):
            options[current] += " " + line.strip()
        else:
            current = None
    return {k: re.sub(r"\s*\(type: .*$", "", " ".join(v.split())).strip() for k, v in options.items()}


def _squash(text: str) -> str:
    return " ".join(text.split())


def _shown(doc: str, help_text: str) -> bool:
    """``doc`` appears in ``help_text`` (argparse re-wraps lines, also after hyphens)."""
    return "".join(doc.split()) in "".join(help_text.split())


def _documented(cls) -> dict[str, str]:
    """Each ``Args:``/``Attributes:`` entry of ``cls``'s docstring, as ``--help`` shows it."""
    return {p.arg_name: _squash(p.description or "") for p in docstring_parser.parse(cls.__doc__ or "").params}


def _help(capsys, *args: str) -> tuple[dict[str, str], str]:
    with pytest.raises(SystemExit) as exit_info:
        HSStarCLI(args=["fit", *args])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    return _help_options(text), text


def test_the_run_folder_is_one_key_the_logs_follow(tmp_path):
    """Only ``--trainer.default_root_dir`` is given: the CSV logs (metrics.csv) and the saved
    config land under it. A logger named by class alone, or a list of them, follows it too;
    a ``save_dir`` set on purpose is kept."""
    run = tmp_path / "run"
    args = ["-c", BASE, "-c", TINY, f"--data.train_file={REPO / 'configs' / 'data' / 'arith_pairs.jsonl'}",
            f"--trainer.default_root_dir={run}", "--trainer.enable_progress_bar=false"]
    HSStarCLI(args=["fit", *args, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--export.enabled=false"])
    assert (run / "logs" / "version_0" / "metrics.csv").is_file()
    saved = yaml.safe_load((run / "logs" / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["init_args"]["save_dir"] == str(run)  # the saved config re-runs as it ran

    by_class = HSStarCLI(args=[*args, "--trainer.logger=CSVLogger", "--trainer.logger.init_args.name=other"], run=False)
    assert by_class.trainer.logger.log_dir == str(run / "other" / "version_0")
    two = tmp_path / "two_loggers.yaml"
    two.write_text(yaml.safe_dump({"trainer": {"logger": [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "a"}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "b", "save_dir": str(tmp_path / "mine")}},
    ]}}))
    listed = HSStarCLI(args=[*args, "-c", str(two)], run=False)
    assert [logger.save_dir for logger in listed.trainer.loggers] == [str(run), str(tmp_path / "mine")]


def test_self_training_and_evaluation_share_one_default_verifier(tmp_path):
    """Both callbacks active, no verifier set: one MathVerifyVerifier checks the round's and the
    evaluation's answers, and one worker pool (its n_workers processes) is all that starts.
    A verifier set for one callback stays that callback's."""
    from hs_star_pl.verifiers import ExactMatchVerifier, MathVerifyVerifier

    stepwise = REPO / "configs" / "data" / "arith_stepwise.jsonl"
    args = ["-c", BASE, "-c", str(REPO / "configs" / "debug" / "tiny_self_training.yaml"),
            f"--self_training.problems_file={stepwise}", f"--evaluation.problems_file={stepwise}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false", "--self_training.verifier=null"]
    before = {p.pid for p in multiprocessing.active_children()}
    cli = HSStarCLI(args=["fit", *args, "--self_training.n_iterations=1", "--trainer.max_epochs=1",
                          "--self_training.problems_per_iteration=4", "--self_training.sampling.max_new_tokens=8",
                          "--evaluation.max_problems=4", "--evaluation.max_new_tokens=8", "--export.enabled=false"])
    (st,) = [c for c in cli.trainer.callbacks if isinstance(c, SelfTrainingCallback)]
    (ev,) = [c for c in cli.trainer.callbacks if isinstance(c, EvaluationCallback)]
    assert isinstance(st.verifier, MathVerifyVerifier) and st.verifier is ev.verifier
    assert (tmp_path / "rounds" / "round_000").is_dir() and list((tmp_path / "eval").rglob("*.json"))
    workers = [p for p in multiprocessing.active_children() if p.pid not in before and p.name == "hs-star-worker"]
    assert len(workers) == st.verifier._pool.n_workers  # both callbacks' checks ran on one pool
    st.verifier.close()

    own = HSStarCLI(args=[*args, "--evaluation.verifier=hs_star_pl.verifiers.ExactMatchVerifier"], run=False)
    (st,) = [c for c in own.trainer.callbacks if isinstance(c, SelfTrainingCallback)]
    (ev,) = [c for c in own.trainer.callbacks if isinstance(c, EvaluationCallback)]
    assert isinstance(ev.verifier, ExactMatchVerifier) and st.verifier is None  # the default is built in its setup


def test_max_epochs_is_derived_from_the_iterations_unless_set(tmp_path):
    """``trainer.max_epochs`` unset: n_iterations x epochs_per_iteration with self-training,
    1 without; a value set to match is kept (older configs), one that contradicts is refused
    naming both keys."""
    from hs_star_pl.infra.errors import ConfigError

    st = ["-c", BASE, "-c", str(REPO / "configs" / "debug" / "tiny_self_training.yaml"),
          f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]

    def max_epochs(*args):
        return HSStarCLI(args=list(args), run=False).trainer.max_epochs

    assert max_epochs(*st) == 2  # 2 iterations x 1 epoch
    assert max_epochs(*st, "--self_training.n_iterations=3", "--self_training.epochs_per_iteration=2") == 6
    assert max_epochs(*st, "--trainer.max_epochs=2") == 2
    assert max_epochs(*_run_args(tmp_path)) == 2  # set by tiny_cpu.yaml, no self-training
    assert max_epochs(*_run_args(tmp_path), "--trainer.max_epochs=null") == 1  # base.yaml's former default
    with pytest.raises(ConfigError, match=r"trainer.max_epochs \(5\) must equal self_training.n_iterations \(2\) x "
                                          r"self_training.epochs_per_iteration \(1\) = 2"):
        HSStarCLI(args=["fit", *st, "--trainer.max_epochs=5"])


def test_help_lists_every_option_with_its_docstring(capsys):
    """Every option of ``hs-star fit --help`` (Lightning's included) has a description, and for our
    classes it is the parameter's own docstring entry, nested dataclass groups included."""
    options, text = _help(capsys, "--help")
    assert len(options) > 100
    undocumented = [name for name, text in options.items() if not text]
    assert not undocumented, f"options without help text: {undocumented}"
    linked = {"export.epochs_per_iteration", "evaluation.epochs_per_iteration"}  # follow self_training's
    groups = [("model", HSStarModule), ("data", MathDataModule), ("export", HFExportCallback),
              ("self_training", SelfTrainingCallback), ("evaluation", EvaluationCallback)]
    checked = 0
    while groups:
        group, cls = groups.pop()
        documented = _documented(cls)
        signature = inspect.signature(cls.__init__ if not dataclasses.is_dataclass(cls) else cls)
        for name, param in signature.parameters.items():
            key = f"{group}.{name}"
            if name == "self" or key in linked:
                continue
            assert documented.get(name), f"{cls.__name__}: {name!r} has no docstring entry"
            assert f"--{key}" in options, f"--{key} missing from --help"
            checked += 1
            if dataclasses.is_dataclass(param.default):
                # a nested group: its docstring titles the section, its fields are options too
                # (argparse keeps a long title's own line breaks, so compare without whitespace)
                assert _shown(f"{documented[name].rstrip('.')}:\n  --{key} CONFIG", text), key
                groups.append((key, type(param.default)))
            else:
                assert _shown(documented[name], options[f"--{key}"]), (key, documented[name], options[f"--{key}"])
    assert checked >= 50
    assert "M_0 is trained once, then reused" in options["--stepwise_init"]
    # model.tiny is optional (null by default), so its fields have their own help page
    tiny, _ = _help(capsys, "--model.tiny.help", "TinyModelConfig")
    for name, text in _documented(TinyModelConfig).items():
        assert text and _shown(text, tiny[f"--model.tiny.{name}"]), name


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
    (cache,) = (tmp_path / "reference_logps").glob("*.jsonl")
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    # one folder per run, not per logger version: `last` must resolve in the next run
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    rows[0]["ref_chosen_logp"] -= 1000  # poison one value: a reread shows up in the examples
    cache.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cli = HSStarCLI(args=["fit", *_run_args(tmp_path), "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert cli.trainer.global_step == 10  # 5 restored + 5 new optimizer steps
    assert cli.datamodule.train_examples[0].ref_chosen_logp < -900  # read from the cache, not recomputed
    assert (tmp_path / "hf" / "policy_002" / "config.json").is_file()


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


def test_shipped_stepwise_init_config_trains_m0_with_adamw_and_warmup_cosine(tmp_path):
    """``hs-star fit -c configs/base.yaml -c configs/sft/stepwise_init.yaml`` as shipped: SFT on
    (question, step-by-step solution) rows, AdamW and the warmup + cosine schedule injected from
    YAML (20 problems / batch 4 x 3 epochs = 15 steps, 10% warmup = 2 steps, peak 2e-3), the
    loss falls, and the last export is an M_0 that ``from_pretrained`` loads and generates with."""
    cli = HSStarCLI(args=[
        "fit", "-c", BASE, "-c", str(REPO / "configs" / "sft" / "stepwise_init.yaml"),
        "--data.problems_file", str(REPO / "configs" / "data" / "arith_stepwise.jsonl"),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ])
    assert cli.model.objective == "sft" and cli.trainer.global_step == 15
    (optimizer,) = cli.trainer.optimizers
    (config,) = cli.trainer.lr_scheduler_configs
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["weight_decay"] == 0.0
    assert isinstance(config.scheduler, WarmupCosineLR) and config.interval == "step"
    assert config.scheduler.total_steps == 15  # filled from the trainer, not written in the YAML
    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    lrs = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    peak = 2e-3
    # warmup (s + 1) / 2, then 0.5 * (1 + cos(pi * (s - 2) / 13)) for s = 2..14
    expected = [peak * 0.5, peak] + [peak * 0.5 * (1 + math.cos(math.pi * (s - 2) / 13)) for s in range(2, 15)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    epoch_losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(epoch_losses) == 3 and epoch_losses[-1] < epoch_losses[0] - 0.5
    m0 = tmp_path / "hf" / "policy_003"
    model, tok = AutoModelForCausalLM.from_pretrained(m0), AutoTokenizer.from_pretrained(m0)
    ids = torch.tensor([tok.encode(render_prompt("qwen25-step-cot", "Start with 3. Add 4. What is the result?"))])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
