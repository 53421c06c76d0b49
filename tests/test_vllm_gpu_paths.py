"""``VLLMEngine``'s GPU-only paths on CPU, against a stand-in for ``vllm.LLM`` on a GPU.

The engine under test is real; only ``vllm.LLM`` is replaced (``tests/helpers/stand_in_vllm.py``:
it serves a tiny model of its own, discards it on a level-2 sleep, and records its arguments,
environment and device). What vLLM itself does with those calls is checked against its source
by ``tests/test_vllm_contract.py``. The two-process runs (one engine per rank, one canary
verdict for all ranks) are in the integration tier.

Run: ``PYTHONPATH=$PWD python -m pytest tests/test_vllm_gpu_paths.py -q`` (no vllm needed);
the integration cases with ``-m integration``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from hs_star_pl.core.protocols import GenerationRequest, SamplingParams
from hs_star_pl.engines import LogprobMismatchError, VLLMEngine
from hs_star_pl.engines.colocation import placement_errors
from hs_star_pl.infra.errors import ConfigError
from hs_star_pl.tensors.tiny import build_byte_tokenizer, build_tiny_causal_lm, save_checkpoint_dir
from tests.helpers import stand_in_vllm
from tests.helpers.stand_in_vllm import StandInLLM
from tests.helpers.tiny_setup import REPO

TINY = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2)
REQUEST = [GenerationRequest("q", "12+7=", 2)]
PARAMS = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=6, seed=0)


@pytest.fixture()
def stand_in(monkeypatch):
    StandInLLM.created.clear()
    stand_in_vllm.install(monkeypatch.setattr)
    yield StandInLLM
    StandInLLM.created.clear()


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def policy(tokenizer):
    return build_tiny_causal_lm(tokenizer, seed=0, **TINY)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, policy, tokenizer):
    return save_checkpoint_dir(tmp_path_factory.mktemp("policy"), policy, tokenizer)


def gpu_engine(**kwargs) -> VLLMEngine:
    return VLLMEngine(**{"dtype": "bfloat16", "enable_sleep_mode": True, "canary_tolerance": 1e-4, "canary_samples": 2,
                         "canary_max_tokens": 4, "progress": False, **kwargs})


def test_generate_after_a_level_2_sleep_needs_a_weight_sync(stand_in, policy, policy_dir):
    """vLLM's level-2 sleep discards the weights and wakes up with whatever the memory holds:
    sampling then must be refused until a sync has put the weights back."""
    with gpu_engine(model_path=str(policy_dir), sleep_level=2) as engine:
        before = engine.generate(REQUEST, PARAMS)
        llm = engine.llm
        engine.sleep()
        engine.wake_up()
        assert ("sleep", 2) in llm.calls
        assert all(float(p.detach().abs().sum()) == 0 for p in llm.model.parameters())  # what the engine would now sample from
        with pytest.raises(RuntimeError, match="level-2 sleep .* sync them first"):
            engine.generate(REQUEST, PARAMS)
        report = engine.sync_weights(policy)  # in place (off CPU), then the canary against the policy
        assert report.ok and report.max_abs_diff < 1e-4
        assert engine.llm is llm and ("reload_weights", len(policy.state_dict()) - 1) in llm.calls  # tied lm_head once
        assert engine.generate(REQUEST, PARAMS) == before


def test_a_reload_from_a_folder_also_restores_sampling_after_a_level_2_sleep(stand_in, policy, policy_dir):
    with gpu_engine(model_path=str(policy_dir), sleep_level=2) as engine:
        engine.start()
        engine.sleep()
        engine.load_from_dir(policy_dir, reference_model=policy)
        assert len(engine.generate(REQUEST, PARAMS)["q"]) == 2


def test_a_level_1_sleep_keeps_the_weights(stand_in, policy_dir):
    with gpu_engine(model_path=str(policy_dir), sleep_level=1) as engine:
        before = engine.generate(REQUEST, PARAMS)
        engine.sleep()
        with pytest.raises(RuntimeError, match="asleep"):
            engine.generate(REQUEST, PARAMS)
        engine.wake_up()
        assert engine.generate(REQUEST, PARAMS) == before


def test_the_canary_catches_a_sync_that_did_nothing(stand_in, tokenizer, policy, tmp_path):
    """A stand-in whose reload silently keeps the old weights (the failure after sleep mode the
    canary exists for): the sync's check raises, naming stale weights."""
    old = save_checkpoint_dir(tmp_path / "old", build_tiny_causal_lm(tokenizer, seed=1, **TINY), tokenizer)
    with gpu_engine(model_path=str(old)) as engine:
        engine.start()
        engine.llm.drop_syncs = True
        with pytest.raises(LogprobMismatchError, match="stale weights"):
            engine.sync_weights(policy)


def test_one_engine_per_process(stand_in, policy_dir):
    """vLLM keeps process-wide state (its parallel groups, the external launcher's process
    group): a second running engine is refused, naming the way to share one."""
    first = gpu_engine(model_path=str(policy_dir)).start()
    second = gpu_engine(model_path=str(policy_dir))
    with pytest.raises(RuntimeError, match="one engine per process.*evaluation.engine: rollout"):
        second.start()
    first.close()
    second.start().close()
    assert len(stand_in.created) == 2


def test_the_external_launcher_in_a_single_process(stand_in, policy_dir, monkeypatch):
    """One GPU with ``distributed_executor_backend: external_launcher`` (configs/paper/hs_star.yaml
    sets it) and no process group: vLLM creates one from RANK 0, WORLD_SIZE 1 and MASTER_*,
    which the engine sets while it builds the engine (and removes again)."""
    for key in stand_in_vllm.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    with gpu_engine(model_path=str(policy_dir), distributed_executor_backend="external_launcher") as engine:
        env = engine.start().llm.env
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert env["MASTER_PORT"].isdigit()
    assert not any(key in os.environ for key in stand_in_vllm.ENV_KEYS)


def test_no_restart_under_the_external_launcher(stand_in, policy_dir):
    """Shutting vLLM's in-process engine down destroys the default process group (the
    trainer's, with several ranks): a sync by restart is refused before the engine starts."""
    engine = gpu_engine(model_path=str(policy_dir), distributed_executor_backend="external_launcher", sync_mode="restart")
    with pytest.raises(ConfigError, match="sync_mode: restart with the external launcher"):
        engine.start()
    assert stand_in.created == []


def test_evaluation_refuses_a_second_vllm_engine_at_setup(tmp_path):
    """``evaluation.engine`` a VLLMEngine of its own next to the self-training one: refused when
    the trainer is set up, not when the first evaluation starts the second engine."""
    from hs_star_pl.training.data import MathDataModule
    from hs_star_pl.training.evaluation import EvaluationCallback

    problems = tmp_path / "p.jsonl"
    problems.write_text('{"question": "1+1", "answer": "2"}\n')
    rollout = VLLMEngine(model_path="m")
    trainer = SimpleNamespace(world_size=1, datamodule=MathDataModule(template="plain"), callbacks=[])
    evaluation = EvaluationCallback(problems_file=str(problems), engine=VLLMEngine(model_path="m"))
    trainer.callbacks = [SimpleNamespace(active=True, engine=rollout), evaluation]
    with pytest.raises(ConfigError, match="evaluation.engine is a second VLLMEngine.*evaluation.engine: rollout"):
        evaluation.setup(trainer, None, "fit")
    shared = EvaluationCallback(problems_file=str(problems), engine=rollout)  # what `rollout` resolves to
    trainer.callbacks = [trainer.callbacks[0], shared]
    shared.setup(trainer, None, "fit")
    idle = EvaluationCallback(problems_file=str(problems), engine=VLLMEngine(model_path="m"), iteration_benchmarks=[])
    trainer.callbacks = [trainer.callbacks[0], idle]
    idle.setup(trainer, None, "fit")  # evaluates nothing during training: its engine never starts then


def test_settings_that_cannot_work_with_several_training_processes_are_refused_at_setup():
    assert placement_errors(1, "mp", 4) == []  # one process: vLLM's own executors, tensor parallelism
    assert placement_errors(8, None, 1) == placement_errors(8, "external_launcher", 1) == []
    with pytest.raises(ConfigError, match="distributed_executor_backend: 'mp' with 8 training processes"):
        VLLMEngine(distributed_executor_backend="mp").check_world(8)
    with pytest.raises(ConfigError, match="tensor_parallel_size: 2 with 2 training processes"):
        VLLMEngine(tensor_parallel_size=2, distributed_executor_backend="external_launcher").check_world(2)


def test_the_self_training_setup_checks_the_engine_against_the_world_size(tmp_path):
    """The self-training callback's setup asks its engine first (here: 2 DDP ranks)."""
    from hs_star_pl.training.self_training import SelfTrainingCallback
    from hs_star_pl.prm import ArithmeticPRM

    callback = SelfTrainingCallback(problems_file=str(tmp_path / "p.jsonl"), prm=ArithmeticPRM(),
                                    engine=VLLMEngine(tensor_parallel_size=2))
    with pytest.raises(ConfigError, match="tensor_parallel_size: 2 with 2 training processes"):
        callback.setup(SimpleNamespace(world_size=2), None, "fit")


# ---------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str, out, world_size: int = 2, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """``tests/helpers/vllm_ranks.py`` on ``world_size`` processes joined by a gloo group, with
    none of ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT`` in their environment
    (SLURM, or Lightning's DDP launcher for ``RANK``)."""
    env = {k: v for k, v in os.environ.items() if k not in stand_in_vllm.ENV_KEYS}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    port = _free_port()
    worker = REPO / "tests" / "helpers" / "vllm_ranks.py"
    procs = [subprocess.Popen([sys.executable, str(worker), scenario, str(rank), str(world_size), str(port), str(out)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(world_size)]
    done = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return done


@pytest.mark.integration
def test_one_engine_per_rank_on_its_own_device(tmp_path):
    """Two ranks whose environment names no rank: each engine gets the external launcher, its
    RANK / LOCAL_RANK / WORLD_SIZE from the process group while it is built (and no longer
    after), and so its own device; a backend that cannot work is refused on both ranks."""
    results = run_ranks("placement", tmp_path)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-3000:] for r in results]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, seen in enumerate(ranks):
        assert seen["kwargs"]["distributed_executor_backend"] == "external_launcher"
        assert seen["env"] == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                               "MASTER_ADDR": None, "MASTER_PORT": None}
        assert seen["env_after"] == {key: None for key in stand_in_vllm.ENV_KEYS}  # set only while it was built
        assert seen["samples"] == 2
        assert "engine.init_args.distributed_executor_backend: 'mp' with 2 training processes" in seen["refused"]
    assert [seen["device"] for seen in ranks] == ["cuda:0", "cuda:1"]


@pytest.mark.integration
def test_a_canary_failing_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1's engine silently keeps stale weights. Every rank stops at the canary with the same
    message, instead of rank 0 going on into the next collective and waiting there (the ranks
    hold their connections open until all have finished, as NCCL ranks do: a peer's exit is
    not noticed until a collective's timeout)."""
    results = run_ranks("canary", tmp_path, timeout=60)
    assert [r.returncode for r in results] == [1, 1], [r.stderr[-2000:] for r in results]
    messages = [json.loads((tmp_path / f"rank{r}.json").read_text())["error"] for r in (0, 1)]
    assert messages[0] == messages[1]
    assert messages[0].startswith("LogprobMismatchError: vLLM token log-probs disagree with the trainer's on 1 of 2 ranks (rank 1: mean")
