"""GPU validation of the scale paths on a random-init model of Qwen2.5-0.5B's size.

Run on a CUDA machine (docs/gpu-validation.md says what to record):

    python benchmarks/gpu_validation.py --stage 2 --devices 8   # ZeRO-2 DPO steps + export + generation
    python benchmarks/gpu_validation.py --stage 3 --devices 8   # the same under ZeRO-3
    python benchmarks/gpu_validation.py --quick                 # tiny model on CPU: checks the script only

One process tree per run (Lightning starts a process per GPU). Phases, each printing one JSON
line prefixed ``RESULT``:

1. ``train``: DPO steps with ``hs_star_pl.training.strategies.DeepSpeedStrategy`` (bf16, gradient
   checkpointing) on synthetic pairs whose reference log-probs are computed under the
   strategy first; tokens/s and peak memory per rank.
2. ``reference_logps``: the lockstep path, uneven pairs per rank, timed.
3. ``export``: the gathered HF export (rank 0 writes), timed; reloaded with
   ``AutoModelForCausalLM`` and compared with the policy's own logits.
4. ``hf_generate``: ``generate`` throughput of the export on one GPU (fixed length).
5. ``vllm`` (when vLLM is installed and CUDA is there): vLLM throughput on the export, then an
   in-place weight sync (``VLLMEngine.sync_weights``) from a perturbed copy and a log-prob check.

The model: Qwen2 architecture with 0.5B's shape (24 layers, hidden 896, MLP 4864, 14 heads, 2
KV heads, vocab 151,936, tied embeddings; 494M parameters), random weights, and our byte-level
tokenizer (ids 0-256; the model's other ids are never produced by the data, and generation is
measured on token ids). Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time
from pathlib import Path

import lightning as L
import torch

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151_936, max_position_embeddings=4096)
QUICK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=512, max_position_embeddings=1024)


def report(phase: str, **values) -> None:
    print("RESULT " + json.dumps({"phase": phase, **values}), flush=True)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # RSS peak, Linux KiB


def prepare(out: Path, shape: dict, n_pairs: int, length: int) -> tuple[Path, Path]:
    """A random-init model folder and a pairs file (written once; other ranks wait for it)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hs_star_pl.tensors.tiny import build_byte_tokenizer

    model_dir, pairs = out / "model", out / "pairs.jsonl"
    done = out / "PREPARED"
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        while not done.exists():
            time.sleep(1)
        return model_dir, pairs
    if done.exists():
        return model_dir, pairs
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_byte_tokenizer()
    config = Qwen2Config(**shape, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789 +-*=\n"
    with pairs.open("w") as f:
        for i in range(n_pairs):
            text = lambda n: "".join(rng.choice(letters) for _ in range(n))  # noqa: E731
            f.write(json.dumps({"id": f"p{i}", "prompt": text(64), "chosen": text(length), "rejected": text(length)}) + "\n")
    done.touch()
    return model_dir, pairs


class Probe(L.Callback):
    """Times the training steps, then, at the end of training (model still sharded, every rank
    present), runs the reference log-prob and export phases."""

    def __init__(self, warmup: int, out: Path, length: int, batch_size: int) -> None:
        self.warmup, self.out, self.length, self.batch_size = warmup, out, length, batch_size
        self.times: list[float] = []
        self.tokens = 0
        self._t = 0.0
        self.export_dir: Path | None = None
        self.policy_logits: torch.Tensor | None = None
        self.probe = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t)
            self.tokens += int(batch["attention_mask"].sum())

    def on_train_end(self, trainer, module):
        from hs_star_pl.core.records import PreferencePair
        from hs_star_pl.tensors.distributed import all_gather_objects
        from hs_star_pl.training.export import export_hf

        device = module.device
        seconds = sum(self.times)
        mine = {"rank": trainer.global_rank, "tokens_per_s": self.tokens / seconds if seconds else None,
                "step_s": seconds / len(self.times) if self.times else None, "peak_gib": peak_memory_gib(device)}
        ranks = all_gather_objects(trainer.world_size, mine)
        if trainer.is_global_zero:
            report("train", world_size=trainer.world_size, pairs_per_gpu=self.batch_size,
                   tokens_per_s_total=sum(r["tokens_per_s"] or 0 for r in ranks), ranks=ranks)
        # reference log-probs in lockstep: rank r scores pairs[r::world] of an uneven list
        pairs = [PreferencePair(f"r{i}", "question ", "x" * self.length, "y" * (self.length // 2), "c", "r")
                 for i in range(4 * self.batch_size * trainer.world_size + 3)]
        t = time.perf_counter()
        module.compute_reference_logps(pairs[trainer.global_rank :: trainer.world_size],
                                       max_length=self.length + 80, batch_size=self.batch_size)
        if trainer.is_global_zero:
            report("reference_logps", seconds=time.perf_counter() - t, pairs=len(pairs))
        with torch.no_grad():  # every rank: under ZeRO-3 the forward is a collective
            module.model.eval()
            self.policy_logits = module.model(input_ids=self.probe.to(device)).logits.float().cpu()
        t = time.perf_counter()
        self.export_dir = export_hf(module, self.out / "export")
        if trainer.is_global_zero:
            size = sum(f.stat().st_size for f in self.export_dir.glob("*.safetensors"))
            report("export", seconds=time.perf_counter() - t, gib=size / 2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=2, choices=(2, 3), help="ZeRO stage")
    parser.add_argument("--devices", type=int, default=1, help="GPUs (processes) on this node")
    parser.add_argument("--steps", type=int, default=20, help="training micro-batches per rank")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per GPU per micro-batch")
    parser.add_argument("--length", type=int, default=1024, help="response tokens per sequence")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/gpu_validation"))
    parser.add_argument("--quick", action="store_true", help="tiny model, CPU, 1 process: checks the script")
    args = parser.parse_args()

    from hs_star_pl.training.data import MathDataModule
    from hs_star_pl.training.module import HSStarModule
    from hs_star_pl.training.strategies import DeepSpeedStrategy

    cuda = torch.cuda.is_available() and not args.quick
    if args.quick:
        args.devices, args.steps, args.batch_size, args.length = 1, 3, 2, 32
    shape = QUICK if args.quick else QWEN25_05B
    out = args.out / f"stage{args.stage}"
    model_dir, pairs_file = prepare(args.out, shape, args.steps * args.batch_size * args.devices, args.length)

    module = HSStarModule(model_path=str(model_dir), dtype="bfloat16" if cuda else "float32", objective="dpo",
                          gradient_checkpointing=True,
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-6, weight_decay=0.0))
    data = MathDataModule(train_file=str(pairs_file), template="plain", max_length=args.length + 80,
                          batch_size=args.batch_size, ref_batch_size=args.batch_size, shuffle=False)
    probe = Probe(warmup=min(2, args.steps - 1), out=out, length=args.length, batch_size=args.batch_size)
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=args.devices, precision="bf16-mixed" if cuda else "32-true",
        strategy=DeepSpeedStrategy(stage=args.stage), max_steps=args.steps, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, callbacks=[probe], default_root_dir=str(out),
        num_sanity_val_steps=0,
    )
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        report("config", stage=args.stage, devices=args.devices, shape=shape, pairs_per_gpu=args.batch_size,
               seq_len=args.length + 64, device=torch.cuda.get_device_name(0) if cuda else "cpu")
    trainer.fit(module, datamodule=data)
    if not trainer.is_global_zero:
        return

    # the export, reloaded on one device: same logits as the sharded policy, then generate()
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    reloaded = AutoModelForCausalLM.from_pretrained(probe.export_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    reloaded.to(device).eval()
    with torch.no_grad():
        gap = (reloaded(input_ids=probe.probe.to(device)).logits.float().cpu() - probe.policy_logits).abs().max().item()
    report("export_reload", max_logit_gap_vs_policy=gap)
    new_tokens, batch = (16, 4) if args.quick else (256, 64)
    prompts = torch.randint(0, 256, (batch, 64), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    with torch.no_grad():
        reloaded.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                          temperature=0.7, top_p=0.95, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    seconds = time.perf_counter() - t
    report("hf_generate", batch=batch, new_tokens=new_tokens, tokens_per_s=batch * new_tokens / seconds,
           peak_gib=peak_memory_gib(device))
    if cuda:
        vllm_phase(probe.export_dir, reloaded)


def vllm_phase(export_dir: Path, hf_model) -> None:
    """vLLM throughput on the export, then an in-place sync of perturbed weights, checked by log-probs."""
    try:
        import vllm
    except ImportError:
        report("vllm", skipped="vllm is not installed")
        return
    from hs_star_pl.engines import VLLMEngine
    from hs_star_pl.engines.canary import compare_logprobs, sequence_token_logprobs
    from hs_star_pl.engines.vllm import WORKER_EXTENSION

    hf_model.to("cpu")
    torch.cuda.empty_cache()
    llm = vllm.LLM(model=str(export_dir), skip_tokenizer_init=True, dtype="bfloat16", gpu_memory_utilization=0.5,
                   worker_extension_cls=WORKER_EXTENSION, seed=0)
    prompts = [{"prompt_token_ids": [random.Random(i).randrange(256) for _ in range(64)]} for i in range(256)]
    params = vllm.SamplingParams(max_tokens=256, min_tokens=256, temperature=0.7, top_p=0.95, detokenize=False)
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    report("vllm_generate", sequences=len(prompts), new_tokens=256, tokens_per_s=len(prompts) * 256 / seconds)

    engine = VLLMEngine(sync_mode="inplace")
    engine.llm = llm  # the engine's RPCs only; this LLM has no tokenizer, so the canary runs here
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    t = time.perf_counter()
    engine.sync_weights(hf_model, canary=False)
    sync_s = time.perf_counter() - t
    check = vllm.SamplingParams(max_tokens=16, temperature=1.0, logprobs=0, detokenize=False, seed=1)
    outs = llm.generate(prompts[:4], check, use_tqdm=False)
    observed = [[step[tok].logprob for step, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    reference = sequence_token_logprobs(hf_model.to("cuda").float(), [p["prompt_token_ids"] for p in prompts[:4]],
                                        [list(o.outputs[0].token_ids) for o in outs])
    canary = compare_logprobs(reference, observed, tolerance=0.05, what="vLLM after in-place sync")
    report("vllm_sync", seconds=sync_s, chunks=engine.last_sync["chunks"], tensors=engine.last_sync["tensors"],
           canary_mean_abs_diff=canary.mean_abs_diff, canary_max_abs_diff=canary.max_abs_diff)


if __name__ == "__main__":
    main()
