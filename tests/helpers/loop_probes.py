"""Probes for the self-training loop, plugged in through the CLI like any component.

* ``ServedExamples``: a callback that records, at each ``on_train_epoch_start``, which pairs
  the DataModule serves that epoch (proves round t's data exist before epoch t starts).
* ``CopyEngine``: a rollout engine that holds its *own* copy of the policy, like vLLM, so the
  callback must move M_t into it every iteration (``sync_weights``, or ``load_from_dir`` with
  ``sync_from: export``). It samples with a real ``HFEngine`` on that copy, so a run with it
  must give the same rounds as one with ``HFEngine`` on the policy itself. It records every
  call the callback makes, and whether the weights it received were the trainer's at that
  moment.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch

from hs_star_pl.core.protocols import Completion, EngineLifecycle, GenerationRequest, SamplingParams
from hs_star_pl.engines import HFEngine


class ServedExamples(L.Callback):
    """``self.served[epoch]``: ``(chosen_key, rejected_key)`` of every pair served that epoch."""

    def __init__(self) -> None:
        self.served: dict[int, list[tuple[str, str]]] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        examples = trainer.datamodule.train_examples
        self.served[trainer.current_epoch] = [(p.chosen_key, p.rejected_key) for p in examples]


class CopyEngine(EngineLifecycle):
    """An engine with its own copy of the policy (see the module docstring).

    Args:
        sync_from: ``weights`` (the callback streams the state dict) or ``export`` (it points
            the engine at the HF export of M_t).
        batch_size: the inner ``HFEngine``'s batch size.
        starts_empty: hold no weights until the first sync (``started`` is false until then),
            as ``VLLMEngine`` without ``model_path``.
    """

    def __init__(self, sync_from: Literal["weights", "export"] = "weights", batch_size: int = 64,
                 starts_empty: bool = False) -> None:
        self.sync_from = sync_from
        self.starts_empty = starts_empty
        self.events: list[tuple[Any, ...]] = []
        self._copy: torch.nn.Module | None = None
        self._inner = HFEngine(batch_size=batch_size, progress=False)

    @property
    def started(self) -> bool:
        return self._copy is not None or not self.starts_empty

    def wake_up(self) -> None:
        self.events.append(("wake_up",))

    def sleep(self) -> None:
        self.events.append(("sleep",))

    def sync_weights(self, model: Any, weights: Any = None, tokenizer: Any = None, **_: Any) -> None:
        received = dict(weights if weights is not None else model.state_dict().items())
        current = model.state_dict()
        # tied weights (lm_head = embed_tokens) may come once; every tensor sent must be the trainer's now
        same = set(received) <= set(current) and all(torch.equal(received[k], current[k]) for k in received)
        if self._copy is None:
            self._copy = copy.deepcopy(model)
        self._copy.load_state_dict(received, strict=False)
        self._inner.bind(self._copy, tokenizer)
        self.events.append(("sync_weights", same))

    def load_from_dir(self, path: str, reference_model: Any = None) -> None:
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        self._copy = AutoModelForCausalLM.from_pretrained(path)
        self._inner.bind(self._copy, PreTrainedTokenizerFast.from_pretrained(path))
        reference = reference_model.state_dict() if reference_model is not None else {}
        same = bool(reference) and all(torch.equal(v, reference[k]) for k, v in self._copy.state_dict().items())
        self.events.append(("load_from_dir", str(path), same))

    def generate(self, requests: Sequence[GenerationRequest], params: SamplingParams) -> dict[str, list[Completion]]:
        self.events.append(("generate", sum(r.n for r in requests)))
        return self._inner.generate(requests, params)
