"""Process reward models: one score in [0, 1] per step of a response.

All implement ``hs_star_pl.core.protocols.ProcessRewardModel`` and are chosen in YAML by
``class_path``:

* ``hs_star_pl.prm.ArithmeticPRM``: exact rule-based checker for the synthetic task;
* ``hs_star_pl.prm.OutcomePRM``: the answer check as the only signal (accuracy-only ablation);
* ``hs_star_pl.prm.SkyworkPRM``: Skywork-o1-Open-PRM format (Qwen2 + scalar value head);
* ``hs_star_pl.prm.QwenMathPRM``: Qwen2.5-Math-PRM format (Qwen2 + 2-class head at ``<extra_0>``).

The first two are stdlib only. The HF ones import torch and transformers when first
accessed (never lightning), so ``import hs_star_pl.prm`` stays light.

Sharding across ranks is the caller's: ``score`` is stateless and order-preserving, so each
rank scores ``requests[rank::world_size]`` (see :func:`shard`) and the results are gathered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from hs_star_pl.prm.rules import ArithmeticPRM, OutcomePRM, parse_operations

__all__ = ["ArithmeticPRM", "OutcomePRM", "QwenMathPRM", "SkyworkPRM", "parse_operations", "shard"]

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's strided share of ``items`` (``items[rank::world_size]``)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(items[rank::world_size])


def __getattr__(name: str):
    if name in ("SkyworkPRM", "QwenMathPRM"):
        from hs_star_pl.prm import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'hs_star_pl.prm' has no attribute {name!r}")
