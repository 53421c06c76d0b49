"""Suite-wide hygiene: offline hub, fixed seeds, default dtype restored.

Tests never touch the network (no hub exists here) and write only under ``tmp_path``.
"""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread (read when torch is first imported, below this file): on a shared 2-core
# machine two spinning threads per process made tiny-model generation 100x slower
# (docs/findings.md). Subprocesses get the same through tests/helpers/self_training.env().
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch = __import__("sys").modules.get("torch")
    if torch is not None:
        torch.manual_seed(0)
        dtype = torch.get_default_dtype()
        yield
        torch.set_default_dtype(dtype)
    else:
        yield


@pytest.fixture(scope="session")
def tiny_m0(tmp_path_factory):
    """``(M_0 dir, problems file)``: a step-wise initialised tiny policy, trained once per session."""
    from tests.helpers.self_training import train_m0

    return train_m0(tmp_path_factory.mktemp("m0"))
