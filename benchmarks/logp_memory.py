"""Peak memory of response log-probs at Qwen2.5's vocabulary: the reference pass and a training step.

Run: ``python benchmarks/logp_memory.py [--quick] [--pairs 2] [--tokens 512] [--chunk-size 256]``.

A 2-layer Qwen2 of width 64 with Qwen2.5's vocabulary (152,064), built from config and saved
as a model folder (no downloads), loaded as the policy (``HSStarModule``, float32, packed
sequences). ``--pairs`` pairs whose sequences are ``--tokens`` tokens long each (all equal, so
they pack into ``2 x pairs`` rows with no padding) go through, each case in a process of its
own:

* *reference pass*: ``compute_reference_logps`` on the pairs, one forward pass (no grad);
* *training step*: ``model_step`` (DPO) on the same pairs as one batch, and its backward pass.

Each with the log-probs taken as before (``model.logp_chunk_size: null``: the model's logits,
every response row in float32 and log-softmaxed at once), chunked from the model's logits (the
logits route: a training step under DeepSpeed ZeRO-3, and models with soft-capped or scaled
logits), and chunked through the LM head (the default; ZeRO-3's reference pass too, with the
head's weight gathered once). The table gives the
growth of the process's peak resident memory during the pass, over its resident memory just
before (the peak is reset through ``/proc/self/clear_refs``; the one-time checks and a warm-up
pass run first), in bytes and in units of *one float32 logits tensor of the batch* (positions
in the forward pass x vocabulary x 4 bytes). The goals: the reference pass at most 0.25 of
one, the training step at most 1.5.

The body is tiny, so nearly all of the growth is the vocabulary-wide work: per position, a
7B policy adds its activations to these numbers (docs/scale.md). Not a test: the numbers
depend on torch's CPU kernels; on a GPU the caching allocator and bf16 change them.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from bench_common import common_parser, emit, setup_torch

VOCAB = 152_064
CASES = {  # name -> (pass, logp_chunk_size is None, route forced to the model's logits)
    "reference, whole vocabulary (before)": ("reference", True, False),
    "reference, chunked logits (logits route)": ("reference", False, True),
    "reference, chunked through the head": ("reference", False, False),
    "training step, whole vocabulary (before)": ("training", True, False),
    "training step, chunked logits (logits route)": ("training", False, True),
    "training step, chunked through the head": ("training", False, False),
}
GOALS = {"reference": 0.25, "training": 1.5}


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset the peak resident memory (Linux: ``clear_refs`` 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def peak_kib(resettable: bool) -> int:
    return _status_kib("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def build_model_folder(folder: Path) -> Path:
    """The 2-layer, width-64 Qwen2 with Qwen2.5's vocabulary and the byte tokenizer, saved."""
    import torch
    from transformers import Qwen2ForCausalLM

    from hs_star_pl.tensors.tiny import build_byte_tokenizer, save_checkpoint_dir, tiny_qwen2_config

    tokenizer = build_byte_tokenizer()
    config = tiny_qwen2_config(VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return save_checkpoint_dir(folder, Qwen2ForCausalLM(config), tokenizer)


def make_pairs(n_pairs: int, n_tokens: int, start: int = 0):
    """Pairs whose chosen and rejected sequences are ``n_tokens`` tokens each (EOS included)."""
    from hs_star_pl.core.records import PreferencePair

    prompt = n_tokens // 8
    response = n_tokens - prompt - 1  # + EOS
    return [PreferencePair(f"p{i}", "q" * prompt, "c" * response, "r" * response, f"{i}c", f"{i}r")
            for i in range(start, start + n_pairs)]


def run_case(name: str, folder: Path, n_pairs: int, n_tokens: int, chunk_size: int) -> dict:
    """One case, in this process: the peak growth of the pass."""
    import torch

    from hs_star_pl.tensors.collate import collate_pairs, encode_pair
    from hs_star_pl.training.module import HSStarModule

    which, whole, logits_route = CASES[name]
    module = HSStarModule(model_path=str(folder), logp_chunk_size=None if whole else chunk_size,
                          optimizer=torch.optim.SGD)
    if logits_route:
        module._head_route = False  # as for a soft-capped model: logp_route() gives "logits"
    pairs = make_pairs(n_pairs, n_tokens)
    encoded = [encode_pair(module.tokenizer, p, n_tokens) for p in pairs]
    if any(e is None for e in encoded) or any(len(s.ids) != n_tokens for e in encoded for s in e):
        raise RuntimeError("the synthetic pairs do not encode to the asked length")
    batch = collate_pairs(encoded, module.tokenizer.pad_token_id, ref_logps=[(-1.0, -2.0)] * n_pairs)
    positions = 2 * n_pairs * n_tokens  # packed: 2 x pairs rows of n_tokens, no padding

    def reference():
        module.compute_reference_logps(pairs, max_length=n_tokens, batch_size=n_pairs)

    def training():
        module.zero_grad(set_to_none=False)  # gradient buffers exist before the measured step, as in training
        loss = module.model_step(batch, "train")
        loss.backward()

    step = reference if which == "reference" else training
    with warnings.catch_warnings():  # self.log without a trainer
        warnings.simplefilter("ignore")
        module.train()
        # warm-up: the one-time checks, and a pass on short pairs (allocator and lazy state)
        short = make_pairs(1, 32, start=100)
        module.compute_reference_logps(short, max_length=32, batch_size=1)
        small = collate_pairs([encode_pair(module.tokenizer, short[0], 32)], module.tokenizer.pad_token_id,
                              ref_logps=[(-1.0, -2.0)])
        module.model_step(small, "train").backward()
        module.zero_grad(set_to_none=False)
        gc.collect()
        resettable = reset_peak()
        before = _status_kib("VmRSS") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        peak = peak_kib(resettable)
    unit = positions * VOCAB * 4
    growth = max(peak - before, 0) * 1024
    return {"case": name, "pass": which, "growth_bytes": growth, "unit_bytes": unit, "positions": positions,
            "peak_resettable": resettable}


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="pairs in the batch (default 2: 4 sequences)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--chunk-size", type=int, help="model.logp_chunk_size of the chunked cases (default: its default)")
    parser.add_argument("--case", help=argparse_hidden(), default=None)
    parser.add_argument("--model-folder", help=argparse_hidden(), default=None)
    args = parser.parse_args()
    setup_torch(args.threads)
    from hs_star_pl.tensors.logps import DEFAULT_CHUNK_SIZE

    chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE
    n_pairs, n_tokens = (1, 64) if args.quick else (args.pairs, args.tokens)
    if args.case is not None:  # a child: one case, its result as JSON on the last line
        print(json.dumps(run_case(args.case, Path(args.model_folder), n_pairs, n_tokens, chunk_size)))
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model_folder(Path(tmp) / "model")
        for name in CASES:
            cmd = [sys.executable, __file__, "--case", name, "--model-folder", str(folder), "--threads",
                   str(args.threads), "--pairs", str(n_pairs), "--tokens", str(n_tokens), "--chunk-size", str(chunk_size)]
            if args.quick:
                cmd.append("--quick")
            done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if done.returncode != 0:
                raise SystemExit(f"case {name!r} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    unit = results[0]["unit_bytes"]
    rows = []
    for r in results:
        ratio = r["growth_bytes"] / r["unit_bytes"]
        goal = GOALS[r["pass"]]
        rows.append([r["case"], round(r["growth_bytes"] / 2**20, 1), round(ratio, 3), round(r["growth_bytes"] / r["positions"] / 1024, 1),
                     f"<= {goal}", "yes" if ratio <= goal else "no"])
    notes = [
        f"a 2-layer width-64 Qwen2 at vocabulary {VOCAB:,}, float32, packed sequences: {n_pairs} pair(s) of "
        f"{n_tokens}-token sequences = {results[0]['positions']:,} positions; one float32 logits tensor of the batch = "
        f"{unit / 2**20:,.0f} MiB; model.logp_chunk_size {chunk_size} in the chunked cases",
        "peak resident memory growth during the pass, over the resident memory before it"
        + ("" if all(r["peak_resettable"] for r in results) else " (peak not resettable here: growth over the whole process's peak)"),
    ]
    emit("Response log-prob memory at Qwen2.5's vocabulary", notes,
         ["case", "peak growth (MiB)", "x one float32 logits tensor", "KiB per position", "goal", "met"], rows, args.json)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
