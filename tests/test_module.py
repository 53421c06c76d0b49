"""HSStarModule on a tiny model built from config: DPO and SFT training, reference log-probs, export."""

from __future__ import annotations

import dataclasses
import math

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hs_star_pl.data import MathDataModule
from hs_star_pl.export import export_hf
from hs_star_pl.module import HSStarModule, TinyModelConfig
from hs_star_pl.records import PreferencePair
from hs_star_pl.schedules import WarmupCosineLR
from hs_star_pl.templates import render_prompt
from hs_star_pl.tiny import save_checkpoint_dir
from tests.helpers.tiny_setup import PAIRS_FILE, STEPWISE_FILE, tiny_module


class _LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit_on_one_fixed_batch(tmp_path, objective: str, data_kwargs: dict, steps: int, lr: float):
    """Train ``steps`` optimizer steps, each on the same first batch (no shuffle, 1 batch/epoch)."""
    module = HSStarModule(
        tiny=TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        objective=objective,
        optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0),  # no decay: only gradients move weights
    )
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    dm = MathDataModule(template="plain", max_length=256, batch_size=4, shuffle=False, **data_kwargs)
    recorder = _LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=steps, limit_train_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        reload_dataloaders_every_n_epochs=1, default_root_dir=tmp_path, callbacks=[recorder],
    )
    trainer.fit(module, dm)
    return module, before, recorder.losses, trainer


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    return _fit_on_one_fixed_batch(
        tmp_path_factory.mktemp("dpo"), "dpo", {"train_file": str(PAIRS_FILE)}, steps=6, lr=1e-2
    )


def test_dpo_step0_loss_is_log2(dpo_run):
    """Reference = the policy at step 0, so every pair has h = 0 and the loss is -log sigmoid(0)."""
    _, _, losses, _ = dpo_run
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)


def test_dpo_changes_every_trainable_parameter(dpo_run):
    module, before, _, _ = dpo_run
    unchanged = [n for n, p in module.named_parameters() if p.requires_grad and torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"


def test_dpo_loss_decreases_on_a_fixed_batch(dpo_run):
    _, _, losses, trainer = dpo_run
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.05
    assert trainer.callback_metrics["train/reward_accuracy"] > 0.5
    assert trainer.callback_metrics["train/margin"] > 0


def test_sft_loss_decreases_on_a_fixed_batch(tmp_path):
    _, _, losses, _ = _fit_on_one_fixed_batch(tmp_path, "sft", {"problems_file": str(STEPWISE_FILE)}, steps=4, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1
    assert losses[0] == pytest.approx(math.log(257), rel=0.05)  # near-uniform start over 257 ids


def _pairs(n: int = 3) -> list[PreferencePair]:
    return [
        PreferencePair(f"p{i}", render_prompt("plain", f"Start with {i}. Add 1."), f"Step 1: {i} + 1 = {i + 1}",
                       f"Step 1: {i} + 1 = {i + 2}", "c", "r")
        for i in range(n)
    ]


def test_compute_reference_logps_matches_a_direct_forward_and_restores_mode():
    module = tiny_module()
    module.train()
    pairs = _pairs()
    out = module.compute_reference_logps(pairs, max_length=256, batch_size=2)
    assert module.model.training  # mode restored
    assert all(p.ref_chosen_logp is None for p in pairs)  # inputs untouched (frozen copies)
    tok = module.tokenizer
    for pair, filled in zip(pairs, out):
        ids = tok.encode(pair.prompt + pair.chosen) + [tok.eos_token_id]
        n_prompt = len(tok.encode(pair.prompt))
        with torch.no_grad():
            logits = module.model(torch.tensor([ids])).logits[0].log_softmax(-1)
        direct = sum(float(logits[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))
        assert filled.ref_chosen_logp == pytest.approx(direct, abs=1e-4)
        assert filled.ref_rejected_logp < 0
        assert dataclasses.replace(filled, ref_chosen_logp=None, ref_rejected_logp=None) == pair


def test_compute_reference_logps_batches_by_length_and_returns_input_order():
    """Long and short pairs alternate: sorted, each batch pads only to its own length."""
    module = tiny_module()
    short = _pairs(2)
    long = [dataclasses.replace(p, problem_id=f"long{i}", prompt=p.prompt + " Then add 2, 3 and 4." * 3)
            for i, p in enumerate(_pairs(2))]
    pairs = [long[0], short[0], long[1], short[1]]
    widths: list[int] = []
    hook = module.model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                                  with_kwargs=True)
    try:
        by_length = module.compute_reference_logps(pairs, max_length=256, batch_size=2)
        sorted_widths, widths[:] = list(widths), []
        in_order = module.compute_reference_logps(pairs, max_length=256, batch_size=2, sort_by_length=False)
    finally:
        hook.remove()
    assert sum(sorted_widths) < sum(widths)  # in input order both batches pad to a long pair
    assert [p.problem_id for p in by_length] == [p.problem_id for p in pairs]
    for a, b in zip(by_length, in_order):
        assert a.ref_chosen_logp == pytest.approx(b.ref_chosen_logp, abs=1e-4)
        assert a.ref_rejected_logp == pytest.approx(b.ref_rejected_logp, abs=1e-4)


def test_compute_reference_logps_leaves_unfittable_pairs_unchanged():
    module = tiny_module()
    long = dataclasses.replace(_pairs(1)[0], prompt="x" * 300)
    out = module.compute_reference_logps([long, *_pairs(1)], max_length=64)
    assert out[0] is long and out[1].ref_chosen_logp is not None


def test_reference_cache_is_reused_on_resume(tmp_path):
    """A second fit into the same run dir reads the cached values instead of recomputing."""
    module, _, _, trainer = _fit_on_one_fixed_batch(tmp_path, "dpo", {"train_file": str(PAIRS_FILE)}, steps=1, lr=1e-2)
    cache = list((tmp_path / "reference_logps").glob("*.json"))
    assert len(cache) == 1
    dm = MathDataModule(train_file=str(PAIRS_FILE), template="plain", max_length=256)
    dm.trainer = trainer
    trainer.strategy.connect(module)
    dm.setup("fit")
    # the module has trained, so recomputing would give different numbers; the cache gives the originals
    first = trainer.datamodule.train_examples[0].ref_chosen_logp
    recomputed = module.compute_reference_logps(dm.train_examples[:1], max_length=256)[0].ref_chosen_logp
    assert recomputed != pytest.approx(first, abs=1e-6)
    dm.train_dataloader()
    assert dm.train_examples[0].ref_chosen_logp == first


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"objective": "ppo"}, r"model.objective must be one of \['dpo', 'sft'\], got 'ppo'"),
        ({"loss_type": "hinge"}, r"model.loss_type: unknown DPO loss type 'hinge'; valid names are \['ipo', 'sigmoid'\]"),
        ({"beta": 0.0}, r"model.beta must be > 0"),
        ({"model_path": "/nowhere"}, r"exactly one of model.model_path .* and model.tiny"),
    ],
)
def test_constructor_errors_name_the_yaml_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HSStarModule(tiny=TinyModelConfig(hidden_size=32), **kwargs)


def test_tiny_config_validates_heads():
    with pytest.raises(ValueError, match=r"model.tiny.hidden_size \(30\) must be a multiple of model.tiny.num_attention_heads"):
        TinyModelConfig(hidden_size=30, num_attention_heads=4)


def test_bf16_and_gradient_checkpointing_switches():
    module = HSStarModule(tiny=TinyModelConfig(hidden_size=32), dtype="bfloat16", gradient_checkpointing=True)
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert module.model.is_gradient_checkpointing


def test_model_path_loads_a_saved_checkpoint(tmp_path):
    source = tiny_module()
    save_checkpoint_dir(tmp_path / "m0", source.model, source.tokenizer)
    loaded = HSStarModule(model_path=str(tmp_path / "m0"))
    ids = torch.tensor([source.tokenizer.encode("Start with 3.")])
    torch.testing.assert_close(loaded.model(ids).logits, source.model(ids).logits)
    assert loaded.tokenizer.decode(ids[0].tolist()) == "Start with 3."
    assert all(m.training for m in loaded.model.modules())  # from_pretrained's eval mode undone


def test_export_reloads_and_generates(tmp_path):
    module = tiny_module()
    out = export_hf(module, tmp_path / "hf" / "iteration_000")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = render_prompt("plain", "Start with 2. Add 3. What is the result?")
    ids = torch.tensor([tok.encode(prompt)])
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids.shape[1]
    torch.testing.assert_close(model(ids).logits, module.model(ids).logits)
    assert tok.decode(ids[0].tolist()) == prompt  # newline and spaces survive the round trip
    assert not (tmp_path / "hf" / "iteration_000.tmp").exists()


def test_warmup_cosine_factors():
    """W = 2, total = 6: steps 0, 1 warm up to 1/2 and 2/2; then progress (s - 2) / 4 on a
    half cosine: s = 2 -> 1, s = 4 -> (1 + cos(pi/2)) / 2 = 0.5, s = 6 and later -> 0."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, warmup_steps=2, total_steps=6)
    assert [sched.factor(s) for s in (0, 1, 2, 4, 6, 9)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    ratio = WarmupCosineLR(opt, warmup_ratio=0.25)
    ratio.set_total_steps(8)  # warmup = 2 steps
    assert ratio.factor(0) == pytest.approx(0.5) and opt.param_groups[0]["lr"] == pytest.approx(0.5)
