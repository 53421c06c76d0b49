"""How the self-training loop hands the policy to its engine before a round (``EngineLifecycle``).

The loop's side of the engine contract: ``SelfTrainingCallback._prepare_engine`` wakes an engine,
then binds it (in-process), reloads M_0's folder (``sync_from: export``) or streams every weight,
and leaves an engine that declares no lifecycle alone. The engines' own behaviour is in
``test_engines.py``.
"""

from __future__ import annotations

import pytest

from hs_star_pl.core.protocols import EngineLifecycle
from hs_star_pl.engines import HFEngine
from hs_star_pl.tensors.tiny import build_byte_tokenizer, build_tiny_causal_lm


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture()
def model(tokenizer):
    return build_tiny_causal_lm(tokenizer, seed=0, hidden_size=32, num_hidden_layers=2)


class _Recording(EngineLifecycle):
    """An engine with its own copy of the policy that records what the loop asks of it."""

    def __init__(self, sync_from="weights", in_process=False):
        self.sync_from, self.in_process, self.calls = sync_from, in_process, []

    def bind(self, model, tokenizer):
        self.calls.append(("bind", model, tokenizer))

    def load_from_dir(self, path, reference_model=None):
        self.calls.append(("load_from_dir", str(path), reference_model))
        return "report"

    def sync_weights(self, model, *, weights=None, tokenizer=None):
        self.calls.append(("sync_weights", model, sorted(name for name, _ in weights), tokenizer))
        return "report"

    def wake_up(self):
        self.calls.append(("wake_up",))

    def generate(self, requests, params):
        return {}


def test_the_loop_hands_the_policy_over_as_the_lifecycle_declares(tmp_path, model, tokenizer):
    """``SelfTrainingCallback._prepare_engine`` follows ``EngineLifecycle``: wake up, then bind
    (in-process), reload M_0's folder (``sync_from: export``), or stream every weight; an
    engine that declares no lifecycle is left alone."""
    from types import SimpleNamespace

    from hs_star_pl.training.self_training import SelfTrainingCallback

    module = SimpleNamespace(model=model, tokenizer=tokenizer, model_path=str(tmp_path), model_dir=str(tmp_path))
    callback = SelfTrainingCallback()
    names = sorted(model.state_dict())

    def prepare(engine):
        callback.engine = engine
        return callback._prepare_engine(trainer=None, module=module, iteration=0)

    bound = _Recording(in_process=True)
    assert prepare(bound) is None and bound.calls == [("wake_up",), ("bind", model, tokenizer)]
    streamed = _Recording()
    assert prepare(streamed) == "report" and streamed.calls == [("wake_up",), ("sync_weights", model, names, tokenizer)]
    reloaded = _Recording(sync_from="export")
    assert prepare(reloaded) == "report" and reloaded.calls == [("wake_up",), ("load_from_dir", str(tmp_path), model)]
    module.model_path = module.model_dir = None  # M_0 built from model.tiny: no folder to reload, so the weights are streamed
    fallback = _Recording(sync_from="export")
    assert prepare(fallback) == "report" and fallback.calls[1][0] == "sync_weights"

    class GenerateOnly:
        def generate(self, requests, params):
            return {}

    assert prepare(GenerateOnly()) is None
    hf = HFEngine(progress=False)
    assert prepare(hf) is None and hf.model is model and hf.tokenizer is tokenizer
