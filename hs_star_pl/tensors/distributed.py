"""Collectives the callbacks share (no-ops on one process)."""

from __future__ import annotations

from typing import Any

import torch


def all_gather_objects(world_size: int, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out
