"""The tiny demo's shipped M_0 (``data/tiny/m0``): the files its README describes, the shape its
recipe (``configs/tiny/stepwise_init.yaml``) trains, and a trained model's behaviour."""

from __future__ import annotations

import hashlib
import re

import pytest
import yaml

from hs_star_pl.core.problems import load_problems
from hs_star_pl.core.templates import render_prompt
from hs_star_pl.verifiers import ExactMatchVerifier
from tests.helpers.tiny_setup import REPO

M0 = REPO / "data" / "tiny" / "m0"


def test_the_weights_are_the_ones_the_readme_records():
    recorded = re.search(r"sha256 ([0-9a-f]{64})  model\.safetensors", (M0 / "README.md").read_text())
    assert recorded, "data/tiny/m0/README.md must record the weights' sha256"
    assert hashlib.sha256((M0 / "model.safetensors").read_bytes()).hexdigest() == recorded.group(1)


def test_the_demo_starts_from_it_and_its_shape_is_the_recipes():
    demo = yaml.safe_load((REPO / "configs" / "tiny" / "hs_star.yaml").read_text())
    assert demo["model"]["model_path"] == "data/tiny/m0"
    recipe = yaml.safe_load((REPO / "configs" / "tiny" / "stepwise_init.yaml").read_text())["model"]["tiny"]
    from transformers import AutoConfig

    from hs_star_pl.tensors.tiny import load_tokenizer

    config = AutoConfig.from_pretrained(M0)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        recipe["hidden_size"], recipe["num_hidden_layers"], recipe["num_attention_heads"])
    assert config.vocab_size == len(load_tokenizer(M0))


@pytest.mark.parametrize("n", [40])
def test_it_writes_one_step_per_block_and_solves_dev_chains(n):
    """A trained M_0, not a random one: greedy answers to the first dev chains are written
    step by step and many are right (a random init of this shape solves none)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hs_star_pl.tensors.tiny import load_tokenizer

    problems = load_problems(REPO / "data" / "tiny" / "dev.jsonl")[:n]
    tokenizer = load_tokenizer(M0)
    model = AutoModelForCausalLM.from_pretrained(M0).eval()
    tokenizer.padding_side = "left"
    prompts = [render_prompt("plain", p.question) for p in problems]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=200, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    well_formed = [t.startswith("Step 1: ") and "\n\nStep 2: " in t and "\\boxed{" in t for t in texts]
    assert sum(well_formed) >= 0.9 * n, texts[:3]
    verdicts = ExactMatchVerifier().verify(texts, [p.answer for p in problems])
    assert sum(bool(v) for v in verdicts) >= n // 5, texts[:5]
