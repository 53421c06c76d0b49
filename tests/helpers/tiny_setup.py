"""Tiny policy and data builders shared by the training-core tests (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import torch

from hs_star_pl.training.module import HSStarModule, TinyModelConfig

REPO = Path(__file__).resolve().parents[2]
PAIRS_FILE = REPO / "configs" / "data" / "arith_pairs.jsonl"
STEPWISE_FILE = REPO / "configs" / "data" / "arith_stepwise.jsonl"


def tiny_module(objective: str = "dpo", lr: float = 1e-3, **kwargs) -> HSStarModule:
    """A 2-layer, width-32 policy with the byte tokenizer and a plain AdamW."""
    return HSStarModule(
        tiny=TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        objective=objective,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
        **kwargs,
    )
