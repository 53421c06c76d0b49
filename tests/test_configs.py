"""Every shipped YAML parses and instantiates through the real CLI, and opens with its purpose and command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from hs_star_pl.cli import HSStarCLI
from tests.helpers.tiny_setup import REPO

CONFIGS = REPO / "configs"
YAMLS = sorted(CONFIGS.rglob("*.yaml"))
BASE = CONFIGS / "base.yaml"
# Configs whose M_0 is trained on first use: parsed with the session's tiny M_0 instead.
NEEDS_M0 = {"tiny/hs_star.yaml", "tiny/lora.yaml", "tiny/spread/m0_stage2.yaml", *(f"tiny/methods/{p.name}" for p in (CONFIGS / "tiny" / "methods").glob("*.yaml"))}
# Fragments that only add a component: parsed on top of these (most specific key wins).
FRAGMENT_BASE = {
    "engine": [CONFIGS / "debug" / "tiny_cpu.yaml"],
    "strategy": [CONFIGS / "debug" / "tiny_cpu.yaml"],
    # evaluation configs take the model from the command line (--model.model_path or --ckpt_path)
    "eval": [CONFIGS / "debug" / "tiny_cpu.yaml"],
    "logger": [CONFIGS / "debug" / "tiny_cpu.yaml"],  # extra loggers (TensorBoard, W&B)
    "tiny/methods": [CONFIGS / "tiny" / "hs_star.yaml"],  # baseline and ablation overlays
    "tiny/lora.yaml": [CONFIGS / "tiny" / "hs_star.yaml"],
    "tiny/spread/study.yaml": [CONFIGS / "tiny" / "hs_star.yaml"],  # the study task, on the demo
    "tiny/spread/u_pool.yaml": [CONFIGS / "tiny" / "hs_star.yaml", CONFIGS / "tiny" / "spread" / "study.yaml"],
    "tiny/spread/m0_stage2.yaml": [CONFIGS / "tiny" / "stepwise_init.yaml"],  # its M_0's second stage
    "strategy/deepspeed_offload.yaml": [CONFIGS / "debug" / "tiny_cpu.yaml", CONFIGS / "strategy" / "deepspeed_zero2_cpu.yaml"],
    "paper": [CONFIGS / "strategy" / "deepspeed_zero2.yaml"],
    "paper/prm": [CONFIGS / "strategy" / "deepspeed_zero2.yaml", CONFIGS / "paper" / "hs_star.yaml"],
    "paper/baselines": [CONFIGS / "strategy" / "deepspeed_zero2.yaml", CONFIGS / "paper" / "hs_star.yaml"],
    "paper/ablations": [CONFIGS / "strategy" / "deepspeed_zero2.yaml", CONFIGS / "paper" / "hs_star.yaml"],
    "paper/pools": [CONFIGS / "strategy" / "deepspeed_zero2.yaml", CONFIGS / "paper" / "hs_star.yaml"],
    "paper/lora.yaml": [CONFIGS / "strategy" / "deepspeed_zero2.yaml", CONFIGS / "paper" / "hs_star.yaml"],
    "debug/paper_on_cpu.yaml": [CONFIGS / "strategy" / "deepspeed_zero2.yaml", CONFIGS / "paper" / "hs_star.yaml"],
}
# Paper-scale configs name local 7B models that do not exist here: parsed with a tiny random
# policy and tiny random PRMs in the same layouts (hs_star_pl.prm.hf.build_tiny_prm_dir).
USER_MODELS = {"paper", "debug/paper_on_cpu.yaml"}


def fragment_base(rel: str) -> list[Path]:
    parts = rel.split("/")
    for n in range(len(parts), 0, -1):
        key = "/".join(parts[:n])
        if key in FRAGMENT_BASE:
            return FRAGMENT_BASE[key]
    return []


def merged(files: list[Path]) -> dict:
    """The keys the YAML files set, later files winning (enough to read a few of them)."""

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    result: dict = {}
    for f in files:
        result = merge(result, yaml.safe_load(f.read_text()) or {})
    return result


def needs_deepspeed(files: list[Path]) -> bool:
    return any("deepspeed" in f.read_text() for f in files)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    from hs_star_pl.tensors.tiny import build_byte_tokenizer, build_tiny_causal_lm, save_checkpoint_dir

    tokenizer = build_byte_tokenizer()
    model = build_tiny_causal_lm(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    return save_checkpoint_dir(tmp_path_factory.mktemp("policy"), model, tokenizer)


@pytest.fixture(scope="session")
def tiny_prm_dirs(tmp_path_factory):
    from hs_star_pl.prm.hf import build_tiny_prm_dir

    root = tmp_path_factory.mktemp("prm")
    return {"SkyworkPRM": build_tiny_prm_dir(root / "skywork", "skywork"), "QwenMathPRM": build_tiny_prm_dir(root / "qwen", "qwen")}


def cli_param(path: Path):
    return pytest.param(path, id=path.relative_to(CONFIGS).as_posix())


def test_there_are_configs():
    assert {p.relative_to(CONFIGS).as_posix() for p in YAMLS} >= {
        "base.yaml", "debug/tiny_cpu.yaml", "sft/stepwise_init.yaml", "dpo/from_pairs.yaml"
    }


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_yaml_opens_with_purpose_and_command(path: Path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 2, f"{path} must open with a comment saying what it is for"
    commands = [line for line in header for verb in ("fit", "test") if f"hs-star {verb} " in line]
    assert commands, f"{path}: no command"
    own = f"configs/{path.relative_to(CONFIGS).as_posix()}"
    # the exact command: it names this very file (a fragment's command also names what it goes on top of)
    assert any(f"-c {own}" in line for line in commands), f"{path}: no command with -c {own}"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_files_a_yaml_names_exist(path: Path):
    """A shipped YAML that points the reader to another config (in a command or a comment)
    points to one that exists."""
    named = set(re.findall(r"configs/[\w./-]+?\.yaml", path.read_text()))
    missing = sorted(name for name in named if not (REPO / name).is_file())
    assert not missing, f"{path} names config files that do not exist: {missing}"


@pytest.mark.parametrize("path", [cli_param(p) for p in YAMLS])
def test_yaml_parses_through_the_cli(path: Path, tmp_path, monkeypatch, request):
    monkeypatch.chdir(REPO)  # data paths in the configs are repo-relative, as in their commands
    rel = path.relative_to(CONFIGS).as_posix()
    files = [BASE, *fragment_base(rel)] + ([path] if path != BASE else [])
    if needs_deepspeed(files):
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (extra [deepspeed])")
    for logger, package in (("TensorBoardLogger", "tensorboard"), ("WandbLogger", "wandb")):
        if any(logger in f.read_text() for f in files):
            pytest.importorskip(package, reason=f"{package} is not installed (extra [trackers])")
    args = [a for f in files for a in ("-c", str(f))]
    if path == BASE:
        args += ["--model.tiny.hidden_size=32", f"--data.train_file={CONFIGS / 'data' / 'arith_pairs.jsonl'}"]
    if rel in NEEDS_M0:
        m0, _ = request.getfixturevalue("tiny_m0")
        args += ["--stepwise_init=null", f"--model.model_path={m0}"]
    if rel.split("/")[0] in USER_MODELS or rel in USER_MODELS:
        args += [f"--model.model_path={request.getfixturevalue('tiny_policy_dir')}"]
        prm = (merged(files).get("self_training") or {}).get("prm")
        if prm:
            prm_dir = request.getfixturevalue("tiny_prm_dirs")[prm["class_path"].rsplit(".", 1)[-1]]
            args += [f"--self_training.prm.init_args.model_path={prm_dir}"]
    if merged(files).get("trainer", {}).get("accelerator") == "gpu" and not torch.cuda.is_available():
        args += ["--trainer.accelerator=cpu", "--trainer.devices=1"]
    args += [f"--trainer.default_root_dir={tmp_path}"]
    cli = HSStarCLI(args=args, run=False)
    assert cli.trainer.reload_dataloaders_every_n_epochs == 1
    st = cli.config["self_training"]
    if st["problems_file"] is not None:  # every self-training config trains its iterations' epochs exactly
        assert cli.trainer.max_epochs == st["n_iterations"] * st["epochs_per_iteration"], rel
    assert cli.model.objective in ("dpo", "sft")


def test_paper_configs_hold_the_papers_settings():
    """The numbers the paper-scale recipe promises (docs/scale.md, the configs' headers) are the ones set."""
    paper = CONFIGS / "paper"
    strategy = CONFIGS / "strategy" / "deepspeed_zero2.yaml"
    sft = merged([BASE, strategy, paper / "stepwise_init.yaml"])
    assert sft["model"]["optimizer"]["init_args"]["lr"] == 1e-6 and sft["model"]["objective"] == "sft"
    assert (sft["data"]["global_batch_size"], sft["data"]["max_length"], sft["trainer"]["max_epochs"]) == (256, 4096, 1)
    run = merged([BASE, strategy, paper / "hs_star.yaml"])
    st = run["self_training"]
    assert (st["n_iterations"], st["problems_per_iteration"]) == (3, 7500)
    assert "max_epochs" not in run["trainer"]  # derived: 3 iterations x 1 epoch (test_yaml_parses_through_the_cli)
    assert st["budget"]["init_args"] == {"samples_per_problem": 8, "n_presample": 3}
    assert (st["sampling"]["temperature"], st["sampling"]["top_p"], st["sampling"]["max_new_tokens"]) == (0.7, 0.95, 2048)
    assert run["model"]["optimizer"]["init_args"]["lr"] == 5e-7 and run["data"]["global_batch_size"] == 256
    assert run["model"]["lr_scheduler"]["init_args"]["warmup_ratio"] == 0.03
    assert run["trainer"]["strategy"]["init_args"]["stage"] == 2
    # from docs/scale.md's memory table: with chunked log-probs 16 reference pairs fit beside the resident PRM
    assert run["data"]["ref_batch_size"] == 16 and st["prm"]["init_args"]["offload"] == "none"
    thresholds = {
        "skywork_o1_7b.yaml": ("SkyworkPRM", 0.15, 0.65),
        "skywork_o1_1.5b.yaml": ("SkyworkPRM", 0.25, 0.5),
        "qwen25_math_prm_7b.yaml": ("QwenMathPRM", 0.55, 0.99),
    }
    for name, (cls, low, high) in thresholds.items():
        st = merged([BASE, strategy, paper / "hs_star.yaml", paper / "prm" / name])["self_training"]
        assert (st["prm"]["class_path"].rsplit(".", 1)[-1], st["difficulty"]["tau_low"], st["difficulty"]["tau_high"]) == (cls, low, high), name
    assert (st["difficulty"]["tau_low"], st["difficulty"]["tau_high"]) == (0.55, 0.99)


SPLITS = {"inlier": ("inlier",), "boundary": ("boundary",), "outlier": ("outlier",), "inlier_boundary": ("inlier", "boundary"),
          "boundary_outlier": ("boundary", "outlier"), "inlier_outlier": ("inlier", "outlier")}


@pytest.mark.parametrize("base, folder", [("tiny/hs_star.yaml", "tiny/methods"), ("paper/hs_star.yaml", "paper/ablations")], ids=["tiny", "paper"])
def test_pilot_study_overlays_spend_exactly_k_times_n_on_their_split(base, folder):
    """One overlay per class and per union of two; each, composed over its base config,
    re-samples its split only and spends exactly K * N on a round holding every class."""
    import importlib

    from hs_star_pl.core.records import Difficulty, ProblemDifficulty

    d = {f"p{i}": ProblemDifficulty(f"p{i}", None, None, c, 3, 3) for i, c in enumerate([*Difficulty] * 5)}
    for name, split in SPLITS.items():
        path = CONFIGS / folder / f"split_{name}.yaml"
        st = merged([BASE, CONFIGS / base, path])["self_training"]
        assert tuple(st["selection"]["train_classes"]) == split, path
        module, cls = st["budget"]["class_path"].rsplit(".", 1)
        allocator = getattr(importlib.import_module(module), cls)(**st["budget"].get("init_args", {}))
        ledger = allocator.allocate(d, seed=0, classes=split)
        assert ledger.total == ledger.budget_total == allocator.samples_per_problem * len(d), path
        assert {ledger.classes[pid] for pid, n in ledger.resample.items() if n > 0} == set(split), path
