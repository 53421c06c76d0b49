"""Working with a policy whose parameters ZeRO-3 has partitioned across ranks.

Under DeepSpeed ZeRO-3 every parameter of the policy is a placeholder on each rank; the full
tensor exists only while it is gathered. Two rules follow, and the helpers here implement them
for the code that touches the whole model (export, engine weight sync, reference log-probs,
``HFEngine`` sampling):

- **Gather one parameter at a time.** :func:`iter_full_state_dict` yields the full state dict
  entry by entry, each gathered (``deepspeed.zero.GatheredParameters``), copied to CPU and
  released before the next, so accelerator memory never holds more than one extra
  parameter.
- **Stay in lockstep.** Gathering (and the forward pass of a partitioned model, which gathers
  layer by layer) is a collective: every rank must make the same calls in the same order.
  :func:`max_over_ranks` lets code that runs a data-dependent number of forward passes pad
  its count to the largest one.

Nothing here imports Lightning, and ``deepspeed`` is imported only when partitioned parameters
are present; on a plain model every helper is a cheap no-op.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


def is_zero3_partitioned(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitioned (DeepSpeed tags them ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def distributed_world_size() -> int:
    """Processes in the default ``torch.distributed`` group (1 when not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def needs_lockstep(model: torch.nn.Module) -> bool:
    """A partitioned model on several ranks: forward passes are collectives."""
    return distributed_world_size() > 1 and is_zero3_partitioned(model)


def max_over_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """The largest ``value`` over all ranks (``value`` itself on one process).

    Args:
        value: this rank's count.
        device: where the reduction tensor lives: the model's device (NCCL needs CUDA
            tensors; gloo takes CPU ones).
    """
    if distributed_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


@contextmanager
def gathered(params: Iterable[torch.nn.Parameter | None]) -> Iterator[None]:
    """``params`` whole inside the block: under ZeRO-3 gathered (a collective: every rank must
    enter it) and released at its end; plain parameters as they are. ``None`` entries are skipped.
    The block must not change them (nothing is written back)."""
    params = [p for p in params if p is not None]
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def iter_full_state_dict(model: torch.nn.Module, *, copy: bool = True) -> Iterator[tuple[str, torch.Tensor | None]]:
    """``(name, full CPU tensor)`` for every entry of ``model.state_dict()``, in its order.

    Partitioned parameters are gathered one at a time. On several ranks every rank must
    consume the whole iterator (the gathers are collectives); a rank that does not need the
    values passes ``copy=False`` and gets ``None`` instead of a CPU copy. Tied parameters
    (e.g. ``lm_head.weight`` and ``embed_tokens.weight``) are gathered once and yielded under
    each name as the same tensor, as ``state_dict()`` would share them.

    The iterator holds a copy only until its last name is yielded (a tied tensor until its
    last name, any other at once), so host memory is what the consumer keeps: a consumer that
    sends chunks holds one chunk plus one tensor, not a second full copy of the model (15 GB
    per rank for a 7B policy in bf16).

    Args:
        model: a plain or ZeRO-3 partitioned module.
        copy: return CPU copies (else ``None`` values; the gathering still happens).
    """
    partitioned = is_zero3_partitioned(model)
    if partitioned:
        import deepspeed
    entries = model.state_dict(keep_vars=True)
    names_left = Counter(id(value) for value in entries.values())  # names still to yield, per tensor
    shared: dict[int, torch.Tensor | None] = {}  # tied tensors whose later names are still to come
    for name, value in entries.items():
        key = id(value)
        names_left[key] -= 1
        if key in shared:
            full = shared.pop(key)
        elif partitioned and hasattr(value, "ds_id"):
            with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                full = value.data.detach().to("cpu", copy=True) if copy else None
        else:
            full = value.detach().to("cpu", copy=True) if copy else None
        if names_left[key] > 0:
            shared[key] = full
        yield name, full
        del full  # before the next gather: the consumer's reference is the only one left


def full_state_dict(model: torch.nn.Module, *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU, gathered parameter by parameter (a collective under ZeRO-3).

    Args:
        model: a plain or ZeRO-3 partitioned module.
        rank0_only: only rank 0 keeps copies (the others return ``{}``); every rank still
            takes part in the gathers.
    """
    keep = not rank0_only or distributed_world_size() == 1 or torch.distributed.get_rank() == 0
    out = {name: t for name, t in iter_full_state_dict(model, copy=keep)}
    return out if keep else {}
