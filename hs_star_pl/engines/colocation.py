"""Where a colocated ``vllm.LLM`` runs when several training processes share the GPUs.

vLLM's default executor starts the engine in a child process on the first visible GPU, so
with 8 training processes on a node all 8 engines land on ``cuda:0``. Its
``external_launcher`` executor instead runs the engine inside the calling process, on
``cuda:<LOCAL_RANK>``, inside the process group that already exists (the colocated mode of
TRL and verl). That executor reads ``RANK`` and ``LOCAL_RANK`` from the environment
(``vllm/v1/executor/uniproc_executor.py``), which Lightning's DDP launcher and SLURM may leave
unset (``KeyError: 'RANK'``). Here they are derived from the process group and set only while
the engine is built:

- ``RANK``, ``WORLD_SIZE``: the process group's.
- ``LOCAL_RANK``: with CUDA, the index of the trainer's own device (``torch.cuda.current_device()``,
  which Lightning sets per rank; it is also right when each process sees one GPU through
  ``CUDA_VISIBLE_DEVICES``); without CUDA, the process's position among the ranks on its host.

``MASTER_ADDR``/``MASTER_PORT`` are not needed then: vLLM reads them only to create a process
group, and here one exists. A single process without one (one GPU, ``external_launcher`` set
in YAML as configs/paper/hs_star.yaml does) gets ``RANK`` 0, ``WORLD_SIZE`` 1 and, unless set,
``MASTER_ADDR`` 127.0.0.1 and a free ``MASTER_PORT``: vLLM then creates the group itself. Two
ranks of one host on the same physical GPU (nobody called ``torch.cuda.set_device``) are
refused, since their engines would share it.

The engine then lives in the training process for good: shutting an in-process vLLM engine
down destroys the default process group (vLLM 0.32, ``EngineCore.shutdown`` ->
``cleanup_dist_env_and_memory``), i.e. the trainer's. So no restart under the external
launcher: ``sync_mode: restart`` is refused with it (``VLLMEngine.start``).

Imports torch lazily; no vLLM and no Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from hs_star_pl.infra.errors import ConfigError

EXTERNAL_LAUNCHER = "external_launcher"
# What vLLM's external launcher reads from the environment; tests/test_vllm_contract.py checks
# that the installed vLLM reads nothing else.
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def training_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def placement_errors(world_size: int, backend: str | None, tensor_parallel_size: int) -> list[str]:
    """What cannot work when ``world_size`` training processes each colocate an engine.

    Each process samples its own share of a round with its own engine on its own GPU, which
    is what the external launcher gives with ``tensor_parallel_size`` 1.

    >>> placement_errors(1, "mp", 2)
    []
    >>> [e.split(":")[0] for e in placement_errors(8, "mp", 2)]
    ['engine.init_args.distributed_executor_backend', 'engine.init_args.tensor_parallel_size']
    """
    if world_size <= 1:
        return []
    errors = []
    if backend not in (None, EXTERNAL_LAUNCHER):
        errors.append(
            f"engine.init_args.distributed_executor_backend: {backend!r} with {world_size} training processes "
            f"starts every process's engine on the first visible GPU; use {EXTERNAL_LAUNCHER!r} or leave it unset "
            "(the engine then picks it)"
        )
    if tensor_parallel_size > 1:
        errors.append(
            f"engine.init_args.tensor_parallel_size: {tensor_parallel_size} with {world_size} training processes: "
            "each process samples its own share of the prompts with its own engine on its own GPU, while a "
            "tensor-parallel engine under the external launcher spans several processes that must all send the "
            "same prompts; set 1 (a 7B model fits one GPU), or sample in one process"
        )
    return errors


def launcher_env() -> dict[str, str]:
    """``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` of this process, from the process group.

    A collective: every rank calls it (it gathers each rank's host and device). Without a
    process group: this single process's values, and ``MASTER_ADDR``/``MASTER_PORT``.

    Raises:
        ConfigError: two ranks of one host use the same GPU.
    """
    import socket

    import torch
    import torch.distributed as dist

    gpu = None
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        gpu = (index, str(torch.cuda.get_device_properties(index).uuid))
    if not dist.is_available() or not dist.is_initialized():  # one process: vLLM creates the group
        return {"RANK": "0", "LOCAL_RANK": str(gpu[0] if gpu else 0), "WORLD_SIZE": "1",
                "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                "MASTER_PORT": os.environ.get("MASTER_PORT") or str(_free_port())}
    rank, world = dist.get_rank(), dist.get_world_size()
    peers: list = [None] * world
    dist.all_gather_object(peers, (socket.gethostname(), gpu))
    host = peers[rank][0]
    same_host = [r for r, (h, _) in enumerate(peers) if h == host]
    if gpu is None:
        local = same_host.index(rank)
    else:
        sharing = [r for r in same_host if peers[r][1][1] == gpu[1]]
        if len(sharing) > 1:
            raise ConfigError(
                f"ranks {sharing} on {host} all use GPU cuda:{gpu[0]} ({gpu[1]}): each training process needs its own "
                "GPU for its colocated vLLM engine (engine.init_args.distributed_executor_backend: external_launcher). "
                "Lightning sets each rank's device; a process started otherwise must call "
                "torch.cuda.set_device(local_rank) before training"
            )
        local = gpu[0]
    return {"RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(world)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def scoped_env(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block, then restore what was there.

    Lightning's own environment reads ``LOCAL_RANK`` again later, so the engine's values must
    not outlive the engine's construction (vLLM reads them only then).
    """
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
