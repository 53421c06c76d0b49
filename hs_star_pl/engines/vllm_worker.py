"""Runs inside vLLM's worker processes (``LLM(worker_extension_cls=...)``): weight loading.

vLLM's ``collective_rpc`` sends its arguments through msgpack, which turns tensors into
nested lists; so the trainer packs chunks of the state dict into safetensors bytes and the
worker unpacks them here and calls the worker's own in-place ``reload_weights`` (the path
vLLM's RL integrations use; it runs the model's ``load_weights``, so checkpoint names and
fused QKV / gate-up layouts are handled by vLLM).

Imported by the vLLM worker, not by the trainer: keep it free of project imports.
"""

from __future__ import annotations


class WeightSyncExtension:
    """Mixed into vLLM's worker class; methods are called with ``llm.collective_rpc(name, ...)``.

    A sync arrives in chunks (``hs_star_stage_safetensors``, the trainer gathers and sends a
    few parameters at a time) and is applied once, whole (``hs_star_load_staged``): vLLM's
    in-place reload processes a layer when its weights are complete, and fused layers (QKV,
    gate-up) take several checkpoint tensors, so a reload per chunk could leave a layer
    half-loaded. The staged chunks stay serialised in worker CPU memory until applied.
    """

    def hs_star_stage_safetensors(self, payload: bytes) -> int:
        """Keep one chunk of a sync; return the number of chunks staged so far."""
        staged = self.__dict__.setdefault("_hs_star_staged", [])
        staged.append(payload)
        return len(staged)

    def hs_star_load_staged(self) -> int:
        """Reload the weights of every staged chunk in one pass; return how many tensors."""
        from safetensors.torch import load

        staged = self.__dict__.pop("_hs_star_staged", [])
        count = 0

        def weights():
            nonlocal count
            while staged:
                for item in load(staged.pop(0)).items():  # free each chunk once read
                    count += 1
                    yield item

        self.reload_weights(weights_iterator=weights())  # type: ignore[attr-defined]
        return count

    def hs_star_param_sums(self) -> dict[str, float]:
        """Sum of every parameter of the served model: a cheap diagnostic for sync bugs."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return {name: float(p.detach().float().sum()) for name, p in model.named_parameters()}
