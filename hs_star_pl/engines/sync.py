"""Pointing an engine at a policy: the one place that knows the engine life cycle's ways in.

The self-training callback (before each round's sampling) and the evaluation callback (before
an evaluation with ``evaluation.engine``) both call :func:`point_engine_at`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hs_star_pl.core.protocols import lifecycle_of
from hs_star_pl.tensors.lora import iter_policy_weights


def point_engine_at(engine: Any, model: Any, tokenizer: Any, export_dir: str | Path | None = None, *,
                    reload_export: bool | None = None) -> Any:
    """Make ``engine`` sample from ``model``; returns the engine's log-prob canary report, if any.

    In-process engines (``bind``) sample from ``model`` itself. An engine with its own copy of
    the weights reloads ``export_dir`` (an HF folder holding exactly ``model``'s weights) when
    it is given and ``reload_export`` is true, or ``None`` and the engine's ``sync_from`` is
    ``export`` (``load_from_dir``: no second copy of the weights is written), else it takes
    the weights streamed from ``model`` (``sync_weights``; under ZeRO-3 every rank must call
    this, the gathers are collective). Either way the engine compares its log-probs with
    ``model``'s afterwards.
    """
    life = lifecycle_of(engine)
    life.wake_up()
    if life.in_process:
        life.bind(model, tokenizer)
        return None
    if reload_export is None:
        reload_export = life.sync_from == "export"
    if export_dir is not None and reload_export:
        return life.load_from_dir(export_dir, reference_model=model)
    # plain HF names, LoRA adapters merged (iter_full_state_dict when there are none)
    return life.sync_weights(model, weights=iter_policy_weights(model), tokenizer=tokenizer)
