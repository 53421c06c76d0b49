"""The M_0 stability tool (``python -m hs_star_pl.experiments.m0_stability``) on a real tiny fit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.self_training import env
from tests.helpers.tiny_setup import REPO


@pytest.mark.integration
def test_one_seed_on_both_float_paths_gives_curves_digests_and_a_summary(tmp_path):
    """The demo's M_0 recipe shrunk to a few batches, seed 0, natively and held to AVX2: each run
    leaves a dev curve (random init + 1 epoch), the digest of its exported weights and its time;
    the report compares the two float paths at the same seed."""
    out = tmp_path / "m0"
    args = [
        sys.executable, "-m", "hs_star_pl.experiments.m0_stability", "--seeds", "0", "--isa", "native", "avx2",
        "--dev-limit", "4", f"--out={out}", "--trainer.max_epochs=1",
        "--data.problems_file=configs/data/arith_stepwise.jsonl", "--data.batch_size=8",
        "--model.tiny.hidden_size=64", "--model.tiny.num_hidden_layers=1", "--model.tiny.num_attention_heads=2",
        "--evaluation.max_new_tokens=8",
    ]
    done = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads((out / "m0_stability.json").read_text())
    assert [(r["isa"], r["seed"]) for r in runs] == [("native", 0), ("avx2", 0)]
    for r in runs:
        assert len(r["accuracy"]) == 2 and all(0.0 <= a <= 1.0 for a in r["accuracy"])
        assert len(r["weights_sha256"]) == 64 and r["seconds"] > 0
    table = (out / "m0_stability.md").read_text()
    assert "| native | 0 |" in table and "| avx2 | 0 |" in table and "- seed 0: native" in table
    log = (out / "avx2" / "seed_0" / "m0.log").read_text()
    assert "progress: epoch 1/1" in log  # the recipe prints plain progress lines into the log
    # a second call reuses both finished runs instead of training again
    again = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already") == 2, again.stdout[-2000:]
