"""The locally built tokenizer and model behave like a real checkpoint through every loader."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from hs_star_pl.tensors.tiny import build_byte_tokenizer, build_tiny_causal_lm, save_checkpoint_dir  # noqa: E402

TEXT = "Start with 12. Add 7.\n\nStep 1: 12 + 7 = 19\n\n  The answer is \\boxed{19}.  é ≥ 2<extra_0>"


def test_tokenizer_round_trips_through_every_loader(tmp_path):
    tok = build_byte_tokenizer(["<extra_0>"])
    ids = tok(TEXT)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert tok.convert_tokens_to_ids("<extra_0>") in ids  # the special token stays atomic
    save_checkpoint_dir(tmp_path, build_tiny_causal_lm(tok), tok)
    # AutoTokenizer is what vLLM uses; with transformers 5.x it rebuilds Qwen's pipeline
    for loader in (AutoTokenizer, PreTrainedTokenizerFast):
        loaded = loader.from_pretrained(str(tmp_path))
        assert loaded(TEXT)["input_ids"] == ids, loader.__name__
        assert loaded.decode(ids) == TEXT
        assert loaded.eos_token_id == loaded.pad_token_id == tok.eos_token_id


def test_tiny_model_reloads_and_generates(tmp_path):
    tok = build_byte_tokenizer()
    model = build_tiny_causal_lm(tok, seed=3)
    assert len(tok) == model.config.vocab_size == 257
    save_checkpoint_dir(tmp_path, model, tok)
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)
    prompt = torch.tensor([tok("Q: 1+1?")["input_ids"]])
    greedy = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    # the reloaded checkpoint continues a prompt exactly as the model it was saved from
    assert torch.equal(again.generate(prompt, **greedy), model.generate(prompt, **greedy))
