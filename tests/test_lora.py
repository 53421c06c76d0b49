"""LoRA policies (``model.peft``, ``hs_star_pl.tensors.lora``) on the tiny model: what trains, the merged
export, checkpoints and the config errors. Multi-process and vLLM checks: ``test_lora_integration.py``."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("peft", reason="peft is not installed (extra [peft])")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hs_star_pl.core.fingerprint import counts  # noqa: E402
from hs_star_pl.training.data import MathDataModule  # noqa: E402
from hs_star_pl.infra.errors import ConfigError  # noqa: E402
from hs_star_pl.training.export import HFExportCallback, export_hf  # noqa: E402
from hs_star_pl.tensors.lora import LoraSettings, apply_lora, has_lora, policy_state_dict  # noqa: E402
from hs_star_pl.training.module import HSStarModule, TinyModelConfig  # noqa: E402
from hs_star_pl.tensors.tiny import build_byte_tokenizer, build_tiny_causal_lm  # noqa: E402
from tests.helpers.tiny_setup import PAIRS_FILE, STEPWISE_FILE  # noqa: E402
from tests.helpers.trainers import cpu_trainer  # noqa: E402

TINY = TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def lora_module(objective: str = "dpo", lr: float = 1e-2, peft: LoraSettings = LORA, **kwargs) -> HSStarModule:
    return HSStarModule(tiny=TINY, objective=objective, peft=peft,
                        optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), **kwargs)


def _fit(tmp_path, module: HSStarModule, data: dict, steps: int, ckpt_path: str | None = None, **trainer_kwargs):
    import lightning as L

    losses: list[float] = []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    dm = MathDataModule(template="plain", max_length=256, batch_size=4, shuffle=False, **data)
    trainer = cpu_trainer(tmp_path, max_epochs=steps, limit_train_batches=1, reload_dataloaders_every_n_epochs=1,
                          callbacks=[Recorder(), *trainer_kwargs.pop("callbacks", [])], **trainer_kwargs)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer, losses


def _perturb_adapters(model: torch.nn.Module, scale: float = 0.2) -> None:
    """Give the adapters non-zero weights (lora_B starts at zero: the merge would be trivial)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))


def _logps(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float().log_softmax(-1)


@pytest.fixture(scope="module")
def dpo_lora_run(tmp_path_factory):
    module = lora_module()
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    trainer, losses = _fit(tmp_path_factory.mktemp("dpo_lora"), module, {"train_file": str(PAIRS_FILE)}, steps=6)
    return module, frozen, adapters, trainer, losses


def test_only_adapters_are_trainable_and_reach_the_optimizer(dpo_lora_run):
    module, frozen, adapters, trainer, _ = dpo_lora_run
    assert module.peft_model is not None and module.peft_model.get_base_model() is module.model
    assert adapters and all("lora_" in n for n in adapters)
    assert sum(p.numel() for p in module.model.parameters() if p.requires_grad) < 0.2 * sum(
        p.numel() for p in module.model.parameters())
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.model.parameters() if p.requires_grad}
    # the wrapper is kept outside the module tree: no parameter is registered twice
    assert len(list(module.parameters())) == len(list(module.model.parameters()))


def test_dpo_with_lora_lowers_the_loss_and_moves_only_the_adapters(dpo_lora_run):
    module, frozen, adapters, trainer, losses = dpo_lora_run
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # reference = policy at step 0
    assert losses[-1] < losses[0] - 0.05
    changed_base = [n for n, p in module.model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    assert not changed_base, changed_base  # bit for bit
    lora_b = [n for n in adapters if "lora_B" in n]
    unchanged = [n for n in lora_b if torch.equal(dict(module.model.named_parameters())[n].detach(), adapters[n])]
    assert not unchanged, unchanged


def test_sft_with_lora_lowers_the_loss(tmp_path):
    _, losses = _fit(tmp_path, lora_module("sft"), {"problems_file": str(STEPWISE_FILE)}, steps=6)
    assert losses[-1] < losses[0] - 0.1


def test_merged_weights_equal_peft_merge_and_unload_and_leave_the_model_untouched():
    tok = build_byte_tokenizer()
    for settings in (LORA, LoraSettings(r=2, target_modules=["q_proj", "down_proj"], modules_to_save=["norm"])):
        wrapped = apply_lora(build_tiny_causal_lm(tok, hidden_size=32), settings)
        _perturb_adapters(wrapped)
        before = {k: v.clone() for k, v in wrapped.state_dict().items()}
        merged = policy_state_dict(wrapped.get_base_model())
        reference = copy.deepcopy(wrapped).merge_and_unload().state_dict()
        assert sorted(merged) == sorted(reference)
        assert all(torch.equal(merged[k], reference[k]) for k in reference)
        assert all(torch.equal(v, before[k]) for k, v in wrapped.state_dict().items())
        assert not has_lora(AutoModelForCausalLM.from_config(wrapped.get_base_model().config))


def test_merged_export_loads_without_peft_and_gives_the_policys_logprobs(tmp_path):
    module = lora_module()
    _perturb_adapters(module.model)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    ids = torch.tensor([module.tokenizer.encode("Start with 3. Add 4. Step 1: 3 + 4 = 7")])
    expected = _logps(module.model, ids)
    out = export_hf(module, tmp_path / "policy_001", adapter=True)
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())  # training state as it was
    assert not (out / "adapter_config.json").exists()  # a plain HF folder at the top
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not has_lora(plain) and type(plain).__name__ == "Qwen2ForCausalLM"
    torch.testing.assert_close(_logps(plain, ids), expected, atol=1e-5, rtol=0)
    # the adapter alone, on the base it was trained on, is the same policy
    assert {p.name for p in (out / "adapter").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    base = build_tiny_causal_lm(module.tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    torch.testing.assert_close(_logps(PeftModel.from_pretrained(base, out / "adapter"), ids), expected, atol=1e-5, rtol=0)
    # and plain HF loading does not pick the adapter up
    torch.testing.assert_close(_logps(HSStarModule(model_path=str(out)).model, ids), expected, atol=1e-5, rtol=0)


def test_the_adapter_export_needs_a_lora_policy(tmp_path):
    from hs_star_pl.training.module import HSStarModule as Plain

    with pytest.raises(ConfigError, match="export.adapter"):
        HFExportCallback(adapter=True).setup(cpu_trainer(tmp_path), Plain(tiny=TINY), "fit")


def test_gradient_checkpointing_with_lora_gives_the_same_adapter_gradients():
    grads = []
    for checkpointing in (False, True):
        module = lora_module(gradient_checkpointing=checkpointing)
        _perturb_adapters(module.model)
        module.model.train()
        ids = torch.tensor([module.tokenizer.encode("Start with 3. Add 4.")] * 2)
        module.model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad})
        assert all(p.grad is None for p in module.model.parameters() if not p.requires_grad)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[1][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_checkpoint_holds_the_adapters_not_the_base_and_a_resume_restores_them(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = lora_module()
    ckpt_dir = tmp_path / "checkpoints"
    trainer, _ = _fit(tmp_path, module, {"train_file": str(PAIRS_FILE)}, steps=2, enable_checkpointing=True,
                      callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)])
    trained = {k: v.clone() for k, v in module.state_dict().items()}
    saved = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    keys = set(saved["state_dict"])
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    assert not any("base_layer" in k or "embed_tokens" in k for k in keys)  # the frozen base stays out
    assert saved["lora_base"]["omitted"]
    # a fresh process: the base is rebuilt from model.tiny, the adapters come from the checkpoint
    resumed = lora_module()
    assert not all(torch.equal(v, trained[k]) for k, v in resumed.state_dict().items())
    trainer, _ = _fit(tmp_path, resumed, {"train_file": str(PAIRS_FILE)}, steps=2, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert trainer.global_step == 2
    assert resumed.state_dict().keys() == trained.keys()
    assert all(torch.equal(v, trained[k]) for k, v in resumed.state_dict().items())
    # another base: refused, since the checkpoint does not hold it
    other = lora_module()
    other.tiny = TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, seed=1)
    with pytest.raises(ConfigError, match="another base|trained on the base"):
        other.on_load_checkpoint(torch.load(ckpt_dir / "last.ckpt", weights_only=False))


def test_the_adapters_start_from_their_own_seed():
    a, b, c = lora_module(), lora_module(), lora_module(peft=LoraSettings(r=4, alpha=8, dropout=0.0, seed=1))
    names = [n for n, p in a.model.named_parameters() if "lora_A" in n]
    params = [dict(m.model.named_parameters()) for m in (a, b, c)]
    assert all(torch.equal(params[0][n], params[1][n]) for n in names)
    assert not any(torch.equal(params[0][n], params[2][n]) for n in names)


def test_the_lora_settings_count_in_the_run_fingerprint():
    assert counts("model.peft.r") and counts("model.peft.target_modules") and counts("model.peft.alpha")
    assert not counts("export.adapter")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"r": 0}, r"model\.peft\.r must be an integer > 0"),
    ({"r": 2.5}, r"model\.peft\.r must be an integer > 0"),
    ({"alpha": 0}, r"model\.peft\.alpha must be a finite number > 0"),
    ({"alpha": float("nan")}, r"model\.peft\.alpha must be a finite number > 0"),
    ({"dropout": 1.0}, r"model\.peft\.dropout must be in \[0, 1\)"),
    ({"target_modules": []}, r"model\.peft\.target_modules must be a non-empty list"),
    ({"target_modules": ""}, r"model\.peft\.target_modules must name modules"),
    ({"modules_to_save": [""]}, r"model\.peft\.modules_to_save must be a list"),
])
def test_bad_lora_settings_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraSettings(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target_modules": ["qproj"]}, r"model\.peft\.target_modules=\['qproj'\]: Target modules"),
    ({"target_modules": "nothing.*"}, r"model\.peft\.target_modules='nothing\.\*'"),
    ({"modules_to_save": ["head"]}, r"model\.peft\.modules_to_save: the model has no module named \['head'\]"),
])
def test_settings_the_model_cannot_take_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora_module(peft=LoraSettings(**kwargs))


# -- through the CLI -------------------------------------------------------------------------

def _cli_args(tmp_path) -> list[str]:
    from tests.helpers.tiny_setup import REPO

    return ["-c", str(REPO / "configs" / "base.yaml"), "-c", str(REPO / "configs" / "debug" / "tiny_cpu.yaml"),
            f"--trainer.default_root_dir={tmp_path}", f"--data.train_file={PAIRS_FILE}",
            "--trainer.enable_progress_bar=false", "--model.peft.r=4", "--model.peft.target_modules=[q_proj,v_proj]",
            "--export.adapter=true"]


def test_cli_trains_lora_and_resumes_its_adapters_from_last(tmp_path):
    from hs_star_pl.cli import HSStarCLI

    first = HSStarCLI(args=["fit", *_cli_args(tmp_path), "--trainer.max_epochs=1"])
    assert first.model.peft_model.peft_config["default"].target_modules == {"q_proj", "v_proj"}
    adapters = {k: v.clone() for k, v in first.model.state_dict().items() if "lora_" in k}
    assert adapters and all(k.endswith(("q_proj.lora_A.default.weight", "q_proj.lora_B.default.weight",
                                        "v_proj.lora_A.default.weight", "v_proj.lora_B.default.weight"))
                            for k in adapters)
    export = tmp_path / "hf" / "policy_001"
    assert (export / "model.safetensors").is_file() and (export / "adapter" / "adapter_config.json").is_file()

    # resumed where it ended: nothing left to train, the adapters are the checkpoint's
    restored = HSStarCLI(args=["fit", *_cli_args(tmp_path), "--trainer.max_epochs=1", "--ckpt_path=last"])
    assert restored.trainer.global_step == 5
    state = restored.model.state_dict()
    assert all(torch.equal(state[k], adapters[k]) for k in adapters)
    resumed = HSStarCLI(args=["fit", *_cli_args(tmp_path), "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert resumed.trainer.global_step == 10  # 5 restored + 5 new optimizer steps
    assert (tmp_path / "hf" / "policy_002" / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_reports_a_bad_lora_value_with_its_key(tmp_path):
    from hs_star_pl.cli import HSStarCLI

    with pytest.raises(ValueError, match=r"model\.peft\.r must be an integer > 0, got -1"):
        HSStarCLI(args=[*_cli_args(tmp_path), "--model.peft.r=-1"], run=False)
