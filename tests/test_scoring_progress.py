"""Progress bars while a round is scored: the learned PRMs show one over their batches (CPU, seconds).

The rollout engines' bars are tested with the engines (``tests/test_engines.py``,
``tests/test_engines_vllm.py``). Run: ``PYTHONPATH=$PWD python -m pytest tests/test_scoring_progress.py``
"""

from __future__ import annotations

import pytest

from hs_star_pl.core.protocols import StepScoringRequest
from hs_star_pl.prm import QwenMathPRM, SkyworkPRM
from hs_star_pl.prm.hf import build_tiny_prm_dir

REQUESTS = [StepScoringRequest(f"Start with {i}. Add 2.", (f"{i} + 2 = {i + 2}", f"The answer is {i + 2}.")) for i in range(8)]


@pytest.mark.parametrize("cls, kind", [(SkyworkPRM, "skywork"), (QwenMathPRM, "qwen")])
def test_prm_scoring_shows_a_progress_bar_over_batches(cls, kind, tmp_path, capsys):
    """8 batches of one response: the bar names the PRM and counts the batches; ``progress:
    false`` hides it, and a short call (under 8 batches) shows none."""
    directory = build_tiny_prm_dir(tmp_path / kind, kind)
    scores = cls(str(directory), device="cpu", batch_size=1, progress=True).score(REQUESTS)
    assert [len(s) for s in scores] == [2] * 8
    err = capsys.readouterr().err
    assert f"{cls.__name__} scoring" in err and "/8 [" in err and "batch" in err
    cls(str(directory), device="cpu", batch_size=1, progress=False).score(REQUESTS)
    cls(str(directory), device="cpu", batch_size=2, progress=True).score(REQUESTS)  # 4 batches
    assert "scoring" not in capsys.readouterr().err
