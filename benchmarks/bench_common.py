"""What every benchmark script shares: thread setup, the machine line, tables, timing, M_0.

The scripts in this folder are run as ``python benchmarks/<name>.py`` (their folder is then
first on ``sys.path``, so ``import bench_common`` works from any working directory). They
report *ratios measured side by side in one run*: on shared machines absolute times move by
10x with the load, while two variants timed alternately in one process keep their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO_M0 = REPO / "data" / "tiny" / "m0"  # shipped; trained by DEMO_M0_CONFIGS when missing
DEMO_M0_CONFIGS = [str(REPO / "configs" / "base.yaml"), str(REPO / "configs" / "tiny" / "stepwise_init.yaml")]


def common_parser(description: str) -> argparse.ArgumentParser:
    """An ``argparse`` parser with the options every script takes (``--quick``, ``--threads``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a minimal size that only checks the script runs")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the table and notes to this JSON file")
    return parser


def setup_torch(threads: int) -> None:
    """Fix the thread count and keep Hugging Face libraries offline and quiet."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def machine_line() -> str:
    """CPU count, load average, Python/torch versions and torch threads, for the report."""
    import torch

    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"machine: {os.cpu_count()} CPUs, load average {load} (1/5/15 min), "
        f"Python {platform.python_version()}, torch {torch.__version__}, torch threads {torch.get_num_threads()}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant decimals' worth of digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if value == 0 or abs(value) >= 100:
                return f"{value:,.0f}"
            if abs(value) >= 1:
                return f"{value:.2f}"
            return f"{value:.3g}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(title: str, notes: Sequence[str], headers: Sequence[str], rows: Sequence[Sequence[Any]],
         json_path: str | None = None) -> None:
    """Print ``# title``, the machine line, the notes and the table; optionally save them as JSON."""
    machine = machine_line()
    print(f"# {title}")
    print(machine)
    for note in notes:
        print(note)
    print()
    print(markdown_table(headers, rows))
    if json_path:
        payload = {"title": title, "machine": machine, "notes": list(notes),
                   "rows": [dict(zip(headers, row)) for row in rows]}
        Path(json_path).write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, value)`` of one call."""
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[tuple[float, Any]]]:
    """Run every variant ``repeats`` times, round-robin, so load changes hit all of them alike."""
    out: dict[str, list[tuple[float, Any]]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            out[name].append(timed(fn))
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ensure_demo_m0(model_path: str | None) -> Path:
    """The policy the round benchmarks sample from.

    ``model_path`` when given; otherwise the tiny demo's shipped M_0 (``data/tiny/m0``), trained
    first with the demo's own step-wise initialisation (about 5 minutes, once) if it is missing,
    exactly as ``hs-star fit -c configs/tiny/hs_star.yaml`` does.
    """
    if model_path is not None:
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model-path {path}: expected a Hugging Face model folder with config.json")
        return path
    if not DEMO_M0.exists():
        from hs_star_pl.cli import bootstrap_stepwise_init

        cwd = os.getcwd()
        os.chdir(REPO)  # the demo's configs name data/ and checkpoints/ relative to the repository
        try:
            bootstrap_stepwise_init(DEMO_M0_CONFIGS, DEMO_M0)
        finally:
            os.chdir(cwd)
    return DEMO_M0


# ---------------------------------------------------------------------------- rounds on the tiny demo


def demo_round_config(max_new_tokens: int = 200):
    """The tiny demo's round settings (configs/tiny/hs_star.yaml): T=0.7, top_p 0.95, tau 0.25/0.75."""
    from hs_star_pl.core.difficulty import DifficultyConfig
    from hs_star_pl.core.protocols import SamplingParams
    from hs_star_pl.core.rounds import RoundConfig

    return RoundConfig(
        sampling=SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=max_new_tokens),
        difficulty=DifficultyConfig(tau_low=0.25, tau_high=0.75),
    )


def demo_problems(n: int, problems_file: str | None = None):
    """``n`` problems, a seeded draw from ``problems_file`` (default: the demo's ``data/tiny/pool.jsonl``).

    Past the demo pool's 1,200 problems it is extended with freshly generated problems of the
    same task mix (distinct questions), so the scaling benchmark can go beyond it.
    """
    from hs_star_pl.core.problems import ProblemPool, load_problems

    path = problems_file or REPO / "data" / "tiny" / "pool.jsonl"
    pool = tuple(load_problems(path))
    if n > len(pool):
        if problems_file is not None:
            raise ValueError(f"--problems-file {path} holds {len(pool)} problems, fewer than the {n} asked for")
        from hs_star_pl.tasks.arithmetic import generate_problems
        from hs_star_pl.tasks.tiny_demo import POOL

        pool = pool + tuple(generate_problems(n - len(pool), seed=99, config=POOL, exclude=pool))
    return ProblemPool(pool, problems_per_iteration=n, seed=0).draw(0)


def add_round_args(parser: argparse.ArgumentParser) -> None:
    """Options of the scripts that run rounds on the tiny demo."""
    parser.add_argument("--model-path", help="M_0 as a Hugging Face folder (default: the demo's shipped data/tiny/m0)")
    parser.add_argument("--problems-file", help="problems JSONL (default: the demo's data/tiny/pool.jsonl)")
    parser.add_argument("--max-new-tokens", type=int, help="sampling cap per response (default 200, the demo's; 16 with --quick)")
    parser.add_argument("--batch-size", type=int, default=128, help="HFEngine batch size (default 128, the demo's)")


def round_policy_path(args: argparse.Namespace) -> Path | None:
    """``None`` (an untrained tiny model) for a bare ``--quick``, else M_0 (see ``ensure_demo_m0``)."""
    if args.quick and args.model_path is None:
        return None
    return ensure_demo_m0(args.model_path)


def max_new_tokens(args: argparse.Namespace) -> int:
    return args.max_new_tokens or (16 if args.quick else 200)


def load_policy(model_path: Path | None, quick: bool):
    """An ``HSStarModule`` (DPO) on ``model_path``, or, for ``--quick``, an untrained tiny one."""
    from functools import partial

    import torch

    from hs_star_pl.training.module import HSStarModule, TinyModelConfig

    optimizer = partial(torch.optim.AdamW, lr=1e-5)
    if model_path is None:
        if not quick:
            raise ValueError("a model path is needed outside --quick")
        return HSStarModule(tiny=TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=1), optimizer=optimizer)
    return HSStarModule(model_path=str(model_path), optimizer=optimizer)


def render_plain(problem) -> str:
    from hs_star_pl.core.templates import render_prompt

    return render_prompt("plain", problem.question)
