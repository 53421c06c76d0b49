"""LoRA policies with ``peft``: the ``model.peft`` settings, applying them, and the merged weights.

``HSStarModule`` applies ``LoraSettings`` with peft's ``get_peft_model`` and keeps, as
``module.model``, the transformers model that peft adapted in place (``get_base_model()``):
the LoRA layers live inside it, so its forward pass, ``generate`` and ``generation_config``
are the policy's, and every consumer that takes an HF causal LM (``HFEngine``, the canary,
the evaluation) takes it unchanged. The ``PeftModel`` wrapper is kept beside it
(``module.peft_model``) for what only peft does: saving the adapter alone.

What is not the plain HF format is the state dict: the base weights sit under
``<layer>.base_layer.weight`` with ``lora_A``/``lora_B`` beside them. Whoever hands the
weights to something that expects a plain model (the HF export, vLLM's weight sync) takes
``policy_state_dict``/``iter_policy_weights`` instead: the merged weights ``W + delta`` under
the plain names, computed layer by layer into new tensors. The training state is never
touched (no in-place merge and unmerge, which in bf16 would not give the base weights back
bit for bit), and beyond the output only one layer's delta exists at a time, so a 7B policy
needs no second copy of itself on the device.

``peft`` is imported only when LoRA is in use (the ``peft`` extra).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

ADAPTER = "default"
"""The name peft gives the one adapter ``get_peft_model`` adds."""

ADAPTER_DIRNAME = "adapter"
"""Sub-folder of an HF export that holds the adapter alone (``HFExportCallback(adapter=True)``)."""


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("model.peft needs the peft package: `pip install hs-star-pl[peft]`") from err
    return peft


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters on the policy (``model.peft``); the base weights are frozen.

    Attributes:
        r: rank of each adapter.
        alpha: scaling numerator (peft's ``lora_alpha``): updates are scaled by ``alpha / r``.
        dropout: dropout on the adapters' input while training (peft's ``lora_dropout``).
        target_modules: the modules that get adapters: a list of module names (a name
            matches a module whose dotted path ends with it, e.g. ``q_proj``), ``all-linear``
            (every linear layer but the output head), or one regular expression matched
            against the whole dotted path.
        modules_to_save: modules trained in full beside the adapters (peft keeps a trainable
            copy of each, e.g. ``[lm_head]`` when new tokens need their own rows); ``null``
            for none.
        seed: seed of the adapters' initialisation (``lora_A`` is random, ``lora_B`` starts
            at zero, so the adapted policy starts equal to the base); the global random state
            is left as it was.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"model.peft.r must be an integer > 0, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ValueError(f"model.peft.alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise ValueError(f"model.peft.dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets.strip():
                raise ValueError("model.peft.target_modules must name modules (a list, a regex or all-linear), got ''")
        elif not targets or not all(isinstance(t, str) and t.strip() for t in targets):
            raise ValueError(f"model.peft.target_modules must be a non-empty list of module names, got {targets!r}")
        if self.modules_to_save is not None and not all(isinstance(m, str) and m.strip() for m in self.modules_to_save):
            raise ValueError(f"model.peft.modules_to_save must be a list of module names or null, got {self.modules_to_save!r}")

    def to_peft(self) -> Any:
        """peft's ``LoraConfig`` for a causal LM."""
        peft = _import_peft()
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=float(self.dropout),
            target_modules=targets,
            modules_to_save=list(self.modules_to_save) if self.modules_to_save else None,
            task_type="CAUSAL_LM",
        )


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> Any:
    """Wrap ``model`` with LoRA adapters (``get_peft_model``); returns the ``PeftModel``.

    ``model`` is adapted in place (``result.get_base_model() is model``): its targeted layers
    become LoRA layers, and only the adapters (and ``modules_to_save``) require grad.

    Raises:
        ValueError: a target or a module to save that ``model`` does not have, naming the key.
    """
    peft = _import_peft()
    if settings.modules_to_save:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
        missing = [m for m in settings.modules_to_save if m not in names]
        if missing:
            raise ValueError(f"model.peft.modules_to_save: the model has no module named {missing}")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            wrapped = peft.get_peft_model(model, settings.to_peft())
    except ValueError as err:  # peft: "Target modules {...} not found in the base model ..."
        raise ValueError(f"model.peft.target_modules={settings.target_modules!r}: {err}") from None
    if not any(p.requires_grad for p in wrapped.parameters()):
        raise ValueError(f"model.peft.target_modules={settings.target_modules!r} matched no layer of the model")
    return wrapped


def has_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds peft LoRA layers (so its state dict is not in the plain HF format)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return any(isinstance(m, LoraLayer) for m in model.modules())


def iter_policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(plain HF name, CPU tensor)`` of the policy's weights, LoRA merged; as a merged model's ``state_dict()``.

    For a model without LoRA layers this is ``hs_star_pl.tensors.zero.iter_full_state_dict`` (ZeRO-3
    partitions are gathered one at a time). With LoRA, each adapted layer's weight is
    ``base + get_delta_weight()`` in the base weight's dtype, as peft's ``merge`` computes
    it, made in a new tensor (the model is not modified); adapter tensors and peft's copies of
    ``modules_to_save`` are dropped, the trained copy taking the module's plain name. Tied
    parameters are yielded under each name as the same tensor.
    """
    from hs_star_pl.tensors.zero import is_zero3_partitioned, iter_full_state_dict

    if not has_lora(model):
        yield from iter_full_state_dict(model)
        return
    if is_zero3_partitioned(model):
        raise NotImplementedError("merged LoRA weights of a ZeRO-3 partitioned model (use ZeRO-2 or DDP with model.peft)")
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    lora_layers: dict[str, Any] = {}
    wrappers: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            lora_layers[name] = module
        elif isinstance(module, ModulesToSaveWrapper):
            wrappers[name] = module
    entries = []  # (tensor, plain name, LoRA layer to merge) of what a merged model has
    for key, value in model.state_dict(keep_vars=True).items():
        plain, merged_from = _plain_name(key, lora_layers, wrappers)
        if plain is not None:
            entries.append((value, plain, merged_from))
    names_left = Counter(id(value) for value, _, _ in entries)
    shared: dict[int, torch.Tensor] = {}  # tied tensors kept until their last name (as zero.iter_full_state_dict)
    with torch.no_grad():
        for value, plain, merged_from in entries:
            names_left[id(value)] -= 1
            if id(value) in shared:
                tensor = shared.pop(id(value))
            elif merged_from is not None:
                delta = merged_from.get_delta_weight(ADAPTER)
                tensor = (value.detach() + delta.to(value.dtype)).to("cpu")
                del delta
            else:
                tensor = value.detach().to("cpu", copy=True)
            if names_left[id(value)] > 0:
                shared[id(value)] = tensor
            yield plain, tensor
            del tensor


def _plain_name(key: str, lora_layers: dict[str, Any], wrappers: dict[str, Any]) -> tuple[str | None, Any]:
    """The plain HF name of a state-dict ``key`` of a peft-adapted model, and the LoRA layer to merge into it.

    ``None`` for entries a merged model does not have (adapter tensors, the frozen originals
    of ``modules_to_save``).
    """
    # walk up: the owning LoRA layer or wrapper is the longest module prefix that is one
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        rest = ".".join(parts[i:])
        if prefix in lora_layers:
            if not rest.startswith("base_layer."):
                return None, None  # lora_A / lora_B / ... : the adapter itself
            inner = rest[len("base_layer."):]
            layer = lora_layers[prefix]
            return f"{prefix}.{inner}", layer if inner == "weight" and ADAPTER in layer.lora_A else None
        if prefix in wrappers:
            trained = f"modules_to_save.{ADAPTER}."
            return (f"{prefix}.{rest[len(trained):]}", None) if rest.startswith(trained) else (None, None)
    return key, None


def policy_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``iter_policy_weights`` as a dict (what ``save_pretrained(state_dict=...)`` takes)."""
    return dict(iter_policy_weights(model))
