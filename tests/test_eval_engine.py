"""Evaluation through an engine with its own weights (``evaluation.engine``): the engine gets
the evaluated policy's weights before each evaluation and gives the same greedy responses as
the policy in memory, in ``hs-star test`` and during training; ``rollout`` shares the
self-training engine. vLLM itself: tests/test_eval_cli.py (integration)."""

from __future__ import annotations

import json

import pytest

from hs_star_pl.cli import HSStarCLI
from hs_star_pl.training.evaluation import EvaluationCallback
from hs_star_pl.tasks.arithmetic import write_split
from tests.helpers.self_training import CONFIGS, EASY
from tests.test_eval_cli import BASE, PAIRS, TINY, eval_config, result, run_args

SELF_TRAINING = str(CONFIGS / "debug" / "tiny_self_training.yaml")
COPY_ENGINE = {"class_path": "tests.helpers.copy_engine.CopyEngine"}


def greedy_config(path, problems, n, **extra):
    """``eval_config``'s greedy benchmark alone (``easy``, the first ``n`` problems)."""
    config = json.loads(eval_config(path, problems, n, 1, **extra).read_text())
    config["evaluation"]["benchmarks"] = config["evaluation"]["benchmarks"][:1]
    path.write_text(json.dumps(config))
    return path


def greedy_rows(root, label):
    return [(r["problem_id"], r["responses"], r["correct"]) for r in result(root, "easy", label)["rows"]]


def evaluation_callback(cli) -> EvaluationCallback:
    return next(c for c in cli.trainer.callbacks if isinstance(c, EvaluationCallback))


def test_an_engine_with_its_own_weights_evaluates_like_the_policy_in_memory(tiny_m0, tmp_path, monkeypatch):
    """Training with evaluation.engine: the engine is given M_0 and then M_1 (streamed, then
    put to sleep) and their greedy responses equal those of the policy in memory, which
    ``hs-star test`` without an engine gives for the same checkpoint; ``hs-star test`` of an
    HF folder with the engine reloads that folder."""
    m0, _ = tiny_m0
    problems, _ = write_split(tmp_path / "bench", 16, 1, seed=7, config=EASY)
    plain = greedy_config(tmp_path / "plain.json", problems, 16)
    engine = greedy_config(tmp_path / "engine.json", problems, 16, engine=COPY_ENGINE)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    cli = HSStarCLI(args=["fit", "-c", BASE, "-c", TINY, "-c", str(engine), "--model.tiny=null", f"--model.model_path={m0}",
                          f"--data.train_file={PAIRS}", "--trainer.max_epochs=1", "--model.optimizer.init_args.lr=1e-4",
                          *run_args(run)])
    used = evaluation_callback(cli).engine
    assert type(used).__name__ == "CopyEngine"
    assert used.calls == ["wake_up", "sync_weights", "sleep"] * 2  # M_0 at the start, M_1 after the epoch
    HSStarCLI(args=["test", "-c", BASE, "-c", TINY, "-c", str(plain), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                    "--evaluation.label=in_memory", *run_args(run)])
    assert greedy_rows(run, "policy_001") == greedy_rows(run, "in_memory")
    assert greedy_rows(run, "policy_000") != greedy_rows(run, "policy_001")  # the engine did follow the policy
    cli = HSStarCLI(args=["test", "-c", BASE, "-c", TINY, "-c", str(engine), "--model.tiny=null", f"--model.model_path={m0}",
                          "--evaluation.label=m0_engine", *run_args(run)])
    assert evaluation_callback(cli).engine.calls == ["wake_up", "load_from_dir", "sleep"]
    assert greedy_rows(run, "m0_engine") == greedy_rows(run, "policy_000")


def test_rollout_shares_the_self_training_engine(tmp_path):
    """``evaluation.engine: rollout`` is the self-training engine when it has its own weights
    (one vLLM for rounds and evaluations); with the in-process default it is the policy in
    memory, as with no engine."""
    problems, _ = write_split(tmp_path / "bench", 4, 1, seed=7, config=EASY)
    config = greedy_config(tmp_path / "eval.json", problems, 4, engine="rollout")
    args = ["-c", BASE, "-c", SELF_TRAINING, "-c", str(config), *run_args(tmp_path / "run"),
            f"--self_training.problems_file={problems}"]
    cli = HSStarCLI(args=[*args, "--self_training.engine=hs_star_pl.engines.VLLMEngine"], run=False)  # starts lazily
    rollout = next(c.engine for c in cli.trainer.callbacks if type(c).__name__ == "SelfTrainingCallback")
    assert type(rollout).__name__ == "VLLMEngine" and evaluation_callback(cli).engine is rollout
    cli = HSStarCLI(args=args, run=False)
    assert evaluation_callback(cli).engine is None


def test_an_in_process_engine_is_refused_naming_the_key(tmp_path):
    from hs_star_pl.engines import HFEngine

    with pytest.raises(ValueError, match="evaluation.engine: HFEngine samples from the policy in memory"):
        EvaluationCallback(problems_file=str(tmp_path / "p.jsonl"), engine=HFEngine())
