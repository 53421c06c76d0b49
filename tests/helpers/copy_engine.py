"""``CopyEngine``: a rollout engine with its own copy of the policy's weights, like vLLM.

It takes the weights the way ``VLLMEngine`` does (``load_from_dir`` reads an HF folder,
``sync_weights`` builds a fresh model from the streamed state dict) and samples from that copy
with ``HFEngine``, so a test can check what reaches an out-of-process engine, and when,
without vLLM. Every life-cycle call is recorded in ``calls``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hs_star_pl.core.protocols import Completion, EngineLifecycle, GenerationRequest, SamplingParams
from hs_star_pl.engines import HFEngine


class CopyEngine(EngineLifecycle):
    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size
        self.copy: torch.nn.Module | None = None
        self.tokenizer = None
        self.calls: list[str] = []

    def load_from_dir(self, path, reference_model=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.calls.append("load_from_dir")
        self.copy = AutoModelForCausalLM.from_pretrained(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        return None

    def sync_weights(self, model, *, weights=None, tokenizer=None):
        from transformers import AutoModelForCausalLM

        self.calls.append("sync_weights")
        state = {name: tensor.clone() for name, tensor in weights}
        self.copy = AutoModelForCausalLM.from_config(model.config).eval()
        self.copy.load_state_dict(state)
        self.tokenizer = tokenizer
        return None

    def wake_up(self) -> None:
        self.calls.append("wake_up")

    def sleep(self) -> None:
        self.calls.append("sleep")

    def generate(self, requests: Sequence[GenerationRequest], params: SamplingParams) -> dict[str, list[Completion]]:
        if self.copy is None:
            raise RuntimeError("CopyEngine.generate before it was given weights")
        engine = HFEngine(batch_size=self.batch_size, progress=False, seed_scope="request")
        engine.bind(self.copy, self.tokenizer)
        return engine.generate(requests, params)
