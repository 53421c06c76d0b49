"""HSStarModule on a tiny model built from config: DPO and SFT training, reference log-probs, export."""

from __future__ import annotations

import dataclasses
import math

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hs_star_pl.core.records import PreferencePair
from hs_star_pl.core.templates import render_prompt
from hs_star_pl.training.data import MathDataModule
from hs_star_pl.training.export import export_hf
from hs_star_pl.training.module import HSStarModule, TinyModelConfig
from hs_star_pl.tensors.tiny import save_checkpoint_dir
from tests.helpers.tiny_setup import PAIRS_FILE, STEPWISE_FILE, tiny_module
from tests.helpers.tolerances import sequence_logp_tolerance
from tests.helpers.trainers import cpu_trainer


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
    trainer = cpu_trainer(tmp_path, max_epochs=steps, limit_train_batches=1, reload_dataloaders_every_n_epochs=1,
                          callbacks=[recorder])
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
        assert abs(filled.ref_chosen_logp - direct) <= sequence_logp_tolerance(len(ids) - n_prompt, len(tok), direct)
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
    module.compute_reference_logps(pairs[:1], max_length=256)  # the one-time checks' forward passes
    hook = module.model.get_decoder().register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                                  with_kwargs=True)
    try:
        by_length = module.compute_reference_logps(pairs, max_length=256, batch_size=2)
        sorted_widths, widths[:] = list(widths), []
        in_order = module.compute_reference_logps(pairs, max_length=256, batch_size=2, sort_by_length=False)
    finally:
        hook.remove()
    assert sum(sorted_widths) < sum(widths)  # in input order both batches pad to a long pair
    assert [p.problem_id for p in by_length] == [p.problem_id for p in pairs]
    for a, b in zip(by_length, in_order):  # other batch widths: equal to the rounding of each sum
        for key in ("ref_chosen_logp", "ref_rejected_logp"):
            want = getattr(b, key)
            assert abs(getattr(a, key) - want) <= sequence_logp_tolerance(256, len(module.tokenizer), want), key


def test_compute_reference_logps_leaves_unfittable_pairs_unchanged():
    module = tiny_module()
    long = dataclasses.replace(_pairs(1)[0], prompt="x" * 300)
    out = module.compute_reference_logps([long, *_pairs(1)], max_length=64)
    assert out[0] is long and out[1].ref_chosen_logp is not None


def test_reference_cache_is_reused_on_resume(tmp_path):
    """A second fit into the same run dir reads the cached values instead of recomputing."""
    module, _, _, trainer = _fit_on_one_fixed_batch(tmp_path, "dpo", {"train_file": str(PAIRS_FILE)}, steps=1, lr=1e-2)
    cache = list((tmp_path / "reference_logps").glob("*.jsonl"))
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
        ({"beta": float("nan")}, r"model.beta must be a finite number, got nan"),  # NaN passes "beta <= 0"
        ({"model_path": "/nowhere"}, r"exactly one of model.model_path .* and model.tiny"),
    ],
)
def test_constructor_errors_name_the_yaml_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HSStarModule(tiny=TinyModelConfig(hidden_size=32), **kwargs)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_tiny_and_the_loaded_model(attn_implementation, tmp_path):
    """``model.attn_implementation`` from the CLI reaches the tiny model's config and a
    ``model_path`` checkpoint's (through ``from_pretrained``); the kernels agree."""
    from hs_star_pl.cli import HSStarCLI

    source = tiny_module()
    save_checkpoint_dir(tmp_path / "m0", source.model, source.tokenizer)
    tiny = HSStarCLI(args=["--model.tiny.hidden_size=32", f"--model.attn_implementation={attn_implementation}",
                           f"--trainer.default_root_dir={tmp_path}"], run=False).model
    loaded = HSStarModule(model_path=str(tmp_path / "m0"), attn_implementation=attn_implementation)
    for module in (tiny, loaded):
        assert module.model.config._attn_implementation == attn_implementation
        assert all(layer.self_attn.config._attn_implementation == attn_implementation
                   for layer in module.model.model.layers)
    ids = torch.tensor([source.tokenizer.encode("Start with 3.")])
    torch.testing.assert_close(loaded.model(ids).logits, source.model(ids).logits, atol=1e-5, rtol=1e-5)


def test_attn_implementation_is_checked_before_any_weights_are_read(tmp_path):
    with pytest.raises(ValueError, match=r"model.attn_implementation must be one of \['eager', 'sdpa'.*got 'fast'"):
        HSStarModule(model_path=str(tmp_path / "never_read"), attn_implementation="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="model.attn_implementation='flash_attention_2' needs the flash-attn package"):
            HSStarModule(tiny=TinyModelConfig(hidden_size=32), attn_implementation="flash_attention_2")


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
    out = export_hf(module, tmp_path / "hf" / "policy_001")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = render_prompt("plain", "Start with 2. Add 3. What is the result?")
    ids = torch.tensor([tok.encode(prompt)])
    greedy = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, **greedy), module.model.generate(ids, **greedy))
    torch.testing.assert_close(model(ids).logits, module.model(ids).logits)
    assert tok.decode(ids[0].tolist()) == prompt  # newline and spaces survive the round trip
    assert not (tmp_path / "hf" / "policy_001.tmp").exists()


def test_defaults_are_adamw_and_a_constant_learning_rate():
    """The signature defaults: AdamW, no schedule (docs/training-core.md says why; the paper's
    warmup + cosine is ``model.lr_scheduler`` in configs/sft/ and configs/paper/)."""
    module = HSStarModule(tiny=TinyModelConfig(hidden_size=32))
    optimizer = module.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in module.model.parameters()}


def _pair_batch(module: HSStarModule):
    """Two pairs, collated the way MathDataModule does (chosen rows first, then rejected)."""
    from hs_star_pl.tensors.collate import collate_pairs, encode_example

    tok = module.tokenizer
    encoded = [(encode_example(tok, p.prompt, p.chosen, 256), encode_example(tok, p.prompt, p.rejected, 256))
               for p in _pairs(2)]
    return collate_pairs(encoded, tok.pad_token_id), encoded


@pytest.mark.parametrize("sft_weight", [0.0, 2.0])
def test_dpo_step_metrics_and_nll_term_match_hand_values(sft_weight):
    """beta = 0.1. References set from the policy's own log-probs so that the implicit rewards
    are known: pair 1 chosen +1 nat, rejected -2 nats -> rewards 0.1, -0.2; pair 2 chosen -1,
    rejected 0 -> rewards -0.1, 0. Reward accuracy 1/2, margin mean (0.3 + -0.1) / 2 = 0.1,
    chosen mean 0, rejected mean -0.1, loss mean(-log sigmoid(0.3), -log sigmoid(-0.1)) plus
    sft_weight x the chosen responses' per-token NLL."""
    module = tiny_module(sft_weight=sft_weight)
    batch, encoded = _pair_batch(module)
    with torch.no_grad():
        logps = module.response_logps(batch, n_pairs=2)
    chosen, rejected = logps[:2], logps[2:]
    batch["ref_chosen_logps"] = chosen - torch.tensor([1.0, -1.0])
    batch["ref_rejected_logps"] = rejected - torch.tensor([-2.0, 0.0])
    loss = module.model_step(batch, "train")
    dpo = (math.log1p(math.exp(-0.3)) + math.log1p(math.exp(0.1))) / 2
    n_tokens = torch.tensor([c.n_response for c, _ in encoded], dtype=torch.float32)
    nll = float((-chosen / n_tokens).mean())
    assert float(loss) == pytest.approx(dpo + sft_weight * nll, abs=1e-5)
    metrics = {name: float(m.compute()) for name, m in module.metrics["train_"].items()}
    assert metrics["reward_accuracy"] == pytest.approx(0.5)
    assert metrics["margin"] == pytest.approx(0.1, abs=1e-5)
    assert metrics["chosen_reward"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["rejected_reward"] == pytest.approx(-0.1, abs=1e-5)


def test_reference_logps_are_computed_in_eval_mode_without_grad():
    module = tiny_module()
    module.train()
    module.packing_active()  # the one-time checks run their own small forward passes first
    module.logp_route()
    seen: list[tuple[bool, bool]] = []
    hook = module.model.get_decoder().register_forward_pre_hook(lambda m, _: seen.append((m.training, torch.is_grad_enabled())))
    try:
        module.compute_reference_logps(_pairs(3), max_length=256, batch_size=2)
    finally:
        hook.remove()
    assert seen == [(False, False), (False, False)]  # two batches, both eval mode and no grad
    assert module.model.training


def test_gradient_checkpointing_recomputes_activations_and_gives_the_same_gradients():
    """Same weights with and without the switch: equal loss and gradients, but each decoder
    layer is entered twice (its forward is re-run in the backward pass; a pre-hook, because
    torch stops the re-run early once it has the activations it needs)."""
    plain, checkpointed = tiny_module(), tiny_module(gradient_checkpointing=True)
    batch, _ = _pair_batch(plain)
    batch["ref_chosen_logps"] = torch.tensor([-50.0, -60.0])
    batch["ref_rejected_logps"] = torch.tensor([-55.0, -58.0])
    layer_calls = {"plain": 0, "checkpointed": 0}
    grads = {}
    for name, module in (("plain", plain), ("checkpointed", checkpointed)):
        module.train()
        module.packing_active()  # the one-time checks run their own small forward passes first
        module.logp_route()
        layer = module.model.model.layers[0]
        hook = layer.register_forward_pre_hook(lambda *_, name=name: layer_calls.__setitem__(name, layer_calls[name] + 1))
        loss = module.model_step(batch, "train")
        loss.backward()
        hook.remove()
        grads[name] = (float(loss), {n: p.grad.clone() for n, p in module.model.named_parameters()})
    assert layer_calls == {"plain": 1, "checkpointed": 2}
    assert grads["plain"][0] == pytest.approx(grads["checkpointed"][0], abs=1e-6)
    for n, g in grads["plain"][1].items():
        torch.testing.assert_close(grads["checkpointed"][1][n], g, atol=1e-6, rtol=1e-5)


def test_bf16_weights_train_with_dpo(tmp_path):
    """``model.dtype: bfloat16``: a few DPO steps run, the loss starts at log 2 (to bf16 precision)
    and every weight stays bf16 and moves."""
    module = HSStarModule(tiny=TinyModelConfig(hidden_size=32), dtype="bfloat16",
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    recorder = _LossRecorder()
    trainer = cpu_trainer(tmp_path, max_epochs=3, limit_train_batches=1, reload_dataloaders_every_n_epochs=1,
                          callbacks=[recorder])
    trainer.fit(module, MathDataModule(train_file=str(PAIRS_FILE), template="plain", max_length=256, batch_size=4,
                                       shuffle=False))
    assert all(math.isfinite(x) for x in recorder.losses) and recorder.losses[0] == pytest.approx(math.log(2), abs=1e-2)
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert not [n for n, p in module.named_parameters() if torch.equal(p.detach(), before[n])]


class _CountingModule(HSStarModule):
    """Counts, at every training step, the models alive besides the policy."""

    def __init__(self, *args, known_model_ids: set[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.known = known_model_ids | {id(m) for m in self.model.modules()}
        self.other_models: list[int] = []
        self.first_losses: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        self.other_models.append(len([o for o in _live_models() if id(o) not in self.known]))
        loss = super().training_step(batch, batch_idx)
        self.first_losses.setdefault(self.current_epoch, float(loss))
        return loss


def _live_models() -> list:
    """Every Hugging Face model object alive in the process (a policy copy would be one)."""
    import gc

    from transformers import PreTrainedModel

    return [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]


def test_each_iteration_is_referenced_by_the_policy_at_its_start_without_a_second_model(tmp_path, monkeypatch):
    """Two iterations served like the self-training callback serves them (an example source
    asked when Lightning builds each epoch's dataloader). Iteration 1's pairs are new, so their
    reference is computed once, from the policy after iteration 0's training: its first loss is
    log 2 again although the policy has moved. No causal LM besides the policy is ever alive."""
    from hs_star_pl.training import reference

    reference_passes: list[int] = []  # the epoch of each reference pass (the real one, recorded)
    real_pass = reference.score_pairs

    def recorded_pass(policy, pairs, **kwargs):
        reference_passes.append(policy.trainer.current_epoch)
        return real_pass(policy, pairs, **kwargs)

    monkeypatch.setattr(reference, "score_pairs", recorded_pass)
    module = _CountingModule(tiny=TinyModelConfig(hidden_size=32), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                             known_model_ids={id(o) for o in _live_models()})
    iterations = {0: _pairs(4), 1: [dataclasses.replace(p, problem_id=f"next{i}", chosen=p.chosen + " so",
                                                        rejected=p.rejected + " hm") for i, p in enumerate(_pairs(4))]}
    dm = MathDataModule(template="plain", max_length=256, batch_size=2, shuffle=False)
    dm.set_example_source(lambda epoch: iterations[epoch])
    recorder = _LossRecorder()
    trainer = cpu_trainer(tmp_path, max_epochs=2, reload_dataloaders_every_n_epochs=1, callbacks=[recorder])
    trainer.fit(module, dm)
    assert reference_passes == [0, 1]  # once per iteration, not per batch or per epoch rebuild
    assert module.first_losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert recorder.losses[1] < math.log(2) - 1e-3  # the policy moved during iteration 0 ...
    assert module.first_losses[1] == pytest.approx(math.log(2), abs=1e-5)  # ... and is iteration 1's reference
    assert module.other_models == [0, 0, 0, 0]  # 2 steps per iteration; no model besides the policy


def test_export_after_the_last_epoch_of_each_iteration(tmp_path):
    """export.epochs_per_iteration 2 over 4 epochs: policy_001 holds the weights at the end
    of epoch 1 (not 0), policy_002 those at the end of epoch 3, and nothing else is written."""
    from safetensors.torch import load_file

    from hs_star_pl.training.export import HFExportCallback

    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    module = tiny_module(lr=1e-2)
    trainer = cpu_trainer(tmp_path, max_epochs=4, limit_train_batches=1, reload_dataloaders_every_n_epochs=1,
                          callbacks=[Snapshot(), HFExportCallback(epochs_per_iteration=2)])
    trainer.fit(module, MathDataModule(train_file=str(PAIRS_FILE), template="plain", max_length=256, batch_size=4))
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["policy_001", "policy_002"]
    for iteration, epoch in ((0, 1), (1, 3)):
        saved = load_file(str(tmp_path / "hf" / f"policy_{iteration + 1:03d}" / "model.safetensors"))
        for name, tensor in saved.items():
            torch.testing.assert_close(tensor, snapshots[epoch][name])
    weight = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(snapshots[0][weight], snapshots[1][weight])  # so epoch 0's weights would differ


def test_the_module_is_the_policy_the_shell_asks_for_and_anything_else_is_named():
    from hs_star_pl.training.policy import Policy, context_length, require_policy

    module = tiny_module()
    assert isinstance(module, Policy) and require_policy(module, "the DPO reference pass") is module
    assert context_length(module) == module.model.config.max_position_embeddings
    with pytest.raises(TypeError, match=r"^the DPO reference pass needs the policy module \(HSStarModule, the model\.\* "
                                        r"group\), got BoringModel$"):
        from lightning.pytorch.demos.boring_classes import BoringModel

        require_policy(BoringModel(), "the DPO reference pass")
