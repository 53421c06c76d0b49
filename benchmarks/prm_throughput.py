"""PRM scoring throughput on CPU for the tiny Skywork and Qwen2.5-Math formats, and the rule PRM.

Run: ``python benchmarks/prm_throughput.py [--quick]``.

Builds tiny random PRMs in a temporary folder (no downloads), then scores synthetic
responses of 2-8 steps: batched (length-sorted, padded) versus one response per forward
pass. Not a test: numbers depend on the machine and say nothing about real 1.5B-7B PRMs.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch

from hs_star_pl.prm import ArithmeticPRM, QwenMathPRM, SkyworkPRM
from hs_star_pl.prm.hf import build_tiny_prm_dir
from hs_star_pl.protocols import StepScoringRequest


def make_requests(n: int, seed: int = 0) -> list[StepScoringRequest]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        value = rng.randint(1, 30)
        question, steps = f"Start with {value}.", []
        for k in range(rng.randint(2, 8)):
            b = rng.randint(1, 9)
            question += f" Add {b}."
            steps.append(f"Step {k + 1}: {value} + {b} = {value + b}")
            value += b
        steps.append(f"The answer is \\boxed{{{value}}}.")
        out.append(StepScoringRequest(question + " What is the result?", tuple(steps)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few requests, tiny model (a smoke run)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    n = 16 if args.quick else 256
    config = dict(hidden_size=64, num_hidden_layers=2) if args.quick else dict(hidden_size=128, num_hidden_layers=4)
    requests = make_requests(n)
    n_steps = sum(len(r.steps) for r in requests)
    rows = []
    t0 = time.perf_counter()
    ArithmeticPRM().score(requests)
    t = time.perf_counter() - t0
    rows.append(("ArithmeticPRM", "-", t, n / t, n_steps / t, None))
    with tempfile.TemporaryDirectory() as tmp:
        for kind, cls in (("skywork", SkyworkPRM), ("qwen", QwenMathPRM)):
            path = build_tiny_prm_dir(f"{tmp}/{kind}", kind, **config)
            prm = cls(str(path), device="cpu", batch_size=args.batch_size, progress=False)
            n_params = sum(p.numel() for p in prm.model.parameters())
            prm.score(requests)  # warm-up (first calls pay one-off allocation costs)
            prm.score(requests[:4])
            t0 = time.perf_counter()
            prm.score(requests)
            t_batched = time.perf_counter() - t0
            t0 = time.perf_counter()
            for r in requests:
                prm.score([r])
            t_single = time.perf_counter() - t0
            name = f"{cls.__name__} ({n_params / 1e6:.2f}M)"
            rows.append((name, f"bs={args.batch_size}", t_batched, n / t_batched, n_steps / t_batched, t_single / t_batched))
            rows.append((name, "bs=1", t_single, n / t_single, n_steps / t_single, 1.0))
    print(f"{n} responses, {n_steps} steps, CPU, torch threads={torch.get_num_threads()}")
    print(f"{'scorer':<24}{'batch':>8}{'seconds':>10}{'resp/s':>10}{'steps/s':>10}{'speed-up':>10}")
    for name, batch, t, rps, sps, speedup in rows:
        sp = f"{speedup:.1f}x" if speedup is not None else "-"
        print(f"{name:<24}{batch:>8}{t:>10.3f}{rps:>10.0f}{sps:>10.0f}{sp:>10}")


if __name__ == "__main__":
    main()
