"""``Policy``: what the rest of the shell uses of the policy being trained.

The data module takes its tokenizer and objective, the reference pass its log-probs of a batch,
the evaluation its generations, the set-up checks its context length. ``HSStarModule`` is the
one implementation; naming the contract here lets those callers depend on it instead of on the
module (which sits above them) or on attribute probes, and a check at their boundary says in
one message what is missing.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from hs_star_pl.core.protocols import Completion
    from hs_star_pl.evaluation.protocol import EvalBatch


@runtime_checkable
class Policy(Protocol):
    """The policy's contract (``HSStarModule`` implements it).

    Attributes:
        tokenizer: its tokenizer (pad token set).
        model: the Hugging Face causal LM (possibly peft-wrapped, possibly ZeRO-3 partitioned).
        objective: ``"dpo"`` or ``"sft"``, or ``None`` when not fixed.
        model_path: ``model.model_path`` as configured (a folder or a hub id), ``None`` for
            ``model.tiny``.
        model_dir: the local folder ``model_path`` resolved to (a hub id's snapshot), ``None``
            for ``model.tiny``.
    """

    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module
    objective: str | None
    model_path: str | None
    model_dir: str | Path | None

    @property
    def device(self) -> torch.device: ...

    def response_logps(self, batch: dict[str, torch.Tensor], n_pairs: int | None = None) -> torch.Tensor:
        """The summed response log-probs ``(B,)`` of a ``collate`` batch (chosen rows first for ``n_pairs`` pairs)."""
        ...

    def precision_context(self) -> AbstractContextManager[Any]:
        """The trainer's precision context for a forward pass outside a training step (none unattached)."""
        ...

    def model_source_tag(self) -> str:
        """A short id of where the initial weights came from."""
        ...

    def generate_for_eval(self, batch: EvalBatch) -> dict[str, list[Completion]]:
        """Responses to one chunk of a benchmark."""
        ...


def context_length(policy: Policy) -> int | None:
    """The policy model's context (``max_position_embeddings``), or ``None`` when its config has none."""
    value = getattr(policy.model.config, "max_position_embeddings", None)
    return value if isinstance(value, int) else None


def initial_weights_folder(policy: Policy) -> Path | None:
    """The folder M_0's weights were loaded from (a hub id's snapshot), or ``None`` when the
    policy was built from ``model.tiny`` or the folder is gone.

    >>> from types import SimpleNamespace
    >>> initial_weights_folder(SimpleNamespace(model_dir=None)) is None
    True
    """
    folder = policy.model_dir
    return Path(folder) if folder is not None and Path(folder).is_dir() else None


def require_policy(module: object, who: str) -> Policy:
    """``module`` as a ``Policy``, or a ``TypeError`` saying ``who`` needs one."""
    if not isinstance(module, Policy):
        raise TypeError(f"{who} needs the policy module (HSStarModule, the model.* group), got {type(module).__name__}")
    return module

