"""Runs inside vLLM's worker processes (``LLM(worker_extension_cls=...)``): weight loading.

vLLM's ``collective_rpc`` sends its arguments through msgpack, which turns tensors into
nested lists; so the trainer packs the state dict into safetensors bytes and the worker
unpacks it here and calls the worker's own in-place ``reload_weights`` (the path vLLM's RL
integrations use; it runs the model's ``load_weights``, so checkpoint names and fused QKV /
gate-up layouts are handled by vLLM).

Imported by the vLLM worker, not by the trainer: keep it free of project imports.
"""

from __future__ import annotations


class WeightSyncExtension:
    """Mixed into vLLM's worker class; methods are called with ``llm.collective_rpc(name, ...)``."""

    def hs_star_load_safetensors(self, payload: bytes) -> int:
        """Load the weights in ``payload`` (``safetensors.torch.save`` bytes); return how many."""
        from safetensors.torch import load

        weights = load(payload)
        self.reload_weights(weights_iterator=iter(weights.items()))  # type: ignore[attr-defined]
        return len(weights)

    def hs_star_param_sums(self) -> dict[str, float]:
        """Sum of every parameter of the served model: a cheap diagnostic for sync bugs."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return {name: float(p.detach().float().sum()) for name, p in model.named_parameters()}
