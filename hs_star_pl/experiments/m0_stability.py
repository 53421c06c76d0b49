"""How much M_0 (the step-wise initialisation) depends on the seed and on the CPU's float path.

    python -m hs_star_pl.experiments.m0_stability                         # seeds 0 1 2, native and AVX2
    python -m hs_star_pl.experiments.m0_stability --seeds 0 --isa avx2
    python -m hs_star_pl.experiments.m0_stability --trainer.max_epochs=4  # another recipe
    python -m hs_star_pl.experiments.m0_stability --report-only

Each (ISA, seed) pair is one ``hs-star fit -c configs/base.yaml -c <recipe>`` in its own
process, into ``<out>/<isa>/seed_<s>/``, with the seed deciding the weight initialisation
(``model.tiny.seed``), the order of the SFT examples (``data.seed``) and ``seed_everything``; the
development set (``data/tiny/dev.jsonl``, never the test set) evaluated greedily after every
epoch, so each run also gives a learning curve. Arguments of the form ``--dotted.key=value``
go to every fit.

``--isa avx2`` runs the same command on this machine with torch, oneDNN and MKL held to AVX2
kernels (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``): what a
CPU without AVX-512 computes. A run whose last evaluation is on disk is not run again.

Written to ``<out>/m0_stability.md`` and ``.json``: dev accuracy per epoch for every run, the
final accuracy's mean and sample sd per ISA and over all runs, whether the two ISAs gave
byte-identical weights at the same seed, and each run's wall time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

RECIPE = Path("configs/tiny/stepwise_init.yaml")
BASE = Path("configs/base.yaml")
DEV = Path("data/tiny/dev.jsonl")
# Environment that holds torch's, oneDNN's and MKL's kernels to an instruction set.
ISA_ENV: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


@dataclass
class M0Run:
    """What one (ISA, seed) run left on disk."""

    isa: str
    seed: int
    accuracy: list[float]  # dev accuracy after epoch 0 (the random init), 1, 2, ...
    weights_sha256: str | None
    seconds: float | None

    @property
    def final(self) -> float:
        return self.accuracy[-1]


def run_dir(out: Path, isa: str, seed: int) -> Path:
    return out / isa / f"seed_{seed}"


def weights_digest(directory: Path) -> str | None:
    """SHA-256 of the last HF export's weights (``hf/policy_NNN/*.safetensors``)."""
    from hs_star_pl.training.export import latest_export

    export = latest_export(directory / "hf")
    if export is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(export.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def collect(directory: Path, isa: str, seed: int) -> M0Run | None:
    evals = sorted(directory.glob("eval/*/policy_*.json"))
    if not evals:
        return None
    accuracy = [json.loads(p.read_text())["summary"]["accuracy"] for p in evals]
    timing = directory / "seconds.txt"
    seconds = float(timing.read_text()) if timing.exists() else None
    return M0Run(isa, seed, accuracy, weights_digest(directory), seconds)


def fit_command(recipe: Path, seed: int, directory: Path, dev: Path, dev_limit: int,
                fit_args: Sequence[str]) -> list[str]:
    return [
        sys.executable, "-m", "hs_star_pl", "fit", "-c", str(BASE), "-c", str(recipe),
        f"--seed_everything={seed}",
        f"--model.tiny.seed={seed}",  # the weight initialisation
        f"--data.seed={seed}",  # the order of the SFT examples
        f"--trainer.default_root_dir={directory}",
        f"--evaluation.problems_file={dev}",
        f"--evaluation.iteration_max_problems={dev_limit}",
        "--evaluation.verifier=hs_star_pl.verifiers.ExactMatchVerifier",
        "--evaluation.max_new_tokens=200",
        *fit_args,
    ]


def run_one(recipe: Path, isa: str, seed: int, directory: Path, dev: Path, dev_limit: int, epochs: int,
            fit_args: Sequence[str]) -> M0Run:
    done = collect(directory, isa, seed)
    if done is not None and len(done.accuracy) == epochs + 1:
        print(f"[m0] {isa} seed {seed}: done already ({directory})", flush=True)
        return done
    if directory.exists():
        raise SystemExit(f"[m0] {directory} holds an unfinished run; remove it to start that run again")
    directory.mkdir(parents=True)
    cmd = fit_command(recipe, seed, directory, dev, dev_limit, fit_args)
    env = {**os.environ, **ISA_ENV[isa]}
    print(f"[m0] {isa} seed {seed}: {' '.join(f'{k}={v}' for k, v in ISA_ENV[isa].items())} {' '.join(cmd)}",
          flush=True)
    started = time.perf_counter()
    with open(directory / "m0.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"[m0] {isa} seed {seed} failed (exit {proc.returncode}); see {directory / 'm0.log'}")
    (directory / "seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    result = collect(directory, isa, seed)
    if result is None or len(result.accuracy) != epochs + 1:
        raise SystemExit(f"[m0] {isa} seed {seed} finished without {epochs + 1} evaluations in {directory}/eval")
    print(f"[m0] {isa} seed {seed}: dev accuracy per epoch {[round(a, 3) for a in result.accuracy]}", flush=True)
    return result


def _mean_sd(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f} (1 run)" if values else ""
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(runs: Sequence[M0Run], settings: Mapping[str, object]) -> str:
    epochs = max(len(r.accuracy) for r in runs) - 1
    lines = [
        "# M_0 across seeds and CPU float paths",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
        "Dev accuracy (greedy) after each epoch; epoch 0 is the random initialisation.",
        "",
        "| ISA | seed | " + " | ".join(f"epoch {e}" for e in range(epochs + 1)) + " | minutes | weights (sha256) |",
        "| --- | ---: | " + " | ".join("---:" for _ in range(epochs + 1)) + " | ---: | --- |",
    ]
    for r in runs:
        cells = [f"{a:.3f}" for a in r.accuracy] + [""] * (epochs + 1 - len(r.accuracy))
        minutes = f"{r.seconds / 60:.1f}" if r.seconds is not None else ""
        lines.append(f"| {r.isa} | {r.seed} | " + " | ".join(cells) + f" | {minutes} | {(r.weights_sha256 or '')[:12]} |")
    lines += ["", "| runs | final dev accuracy, mean ± sd | min | max |", "| --- | ---: | ---: | ---: |"]
    groups = {isa: [r.final for r in runs if r.isa == isa] for isa in dict.fromkeys(r.isa for r in runs)}
    if len(groups) > 1:
        groups["all"] = [r.final for r in runs]
    for name, values in groups.items():
        lines.append(f"| {name} ({len(values)}) | {_mean_sd(values)} | {min(values):.3f} | {max(values):.3f} |")
    by_seed: dict[int, dict[str, M0Run]] = {}
    for r in runs:
        by_seed.setdefault(r.seed, {})[r.isa] = r
    pairs = [(s, d) for s, d in sorted(by_seed.items()) if len(d) > 1]
    if pairs:
        lines += ["", "Same seed, different ISA:", ""]
        for seed, d in pairs:
            finals = ", ".join(f"{isa} {r.final:.3f}" for isa, r in d.items())
            same = len({r.weights_sha256 for r in d.values()}) == 1
            lines.append(f"- seed {seed}: {finals}; weights {'identical' if same else 'differ'}")
    return "\n".join(lines) + "\n"


def n_epochs(recipe: Path, fit_args: Sequence[str]) -> int:
    for arg in reversed(fit_args):
        if arg.startswith("--trainer.max_epochs="):
            return int(arg.split("=", 1)[1])
    import yaml

    with open(recipe) as f:
        return int(yaml.safe_load(f)["trainer"]["max_epochs"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the M_0 config (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--isa", nargs="+", choices=sorted(ISA_ENV), default=["native", "avx2"])
    parser.add_argument("--dev", type=Path, default=DEV, help="evaluation set (default: %(default)s)")
    parser.add_argument("--dev-limit", type=int, default=500, help="its first N problems (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/tiny/m0_stability"))
    parser.add_argument("--report-only", action="store_true", help="only tabulate runs already on disk")
    args, fit_args = parser.parse_known_args(argv)
    bad = [a for a in fit_args if not (a.startswith("--") and "=" in a)]
    if bad:
        parser.error(f"unrecognized arguments {bad}: options for hs-star fit are passed as --dotted.key=value")
    epochs = n_epochs(args.recipe, fit_args)
    runs: list[M0Run] = []
    for seed in args.seeds:
        for isa in args.isa:
            directory = run_dir(args.out, isa, seed)
            if args.report_only:
                found = collect(directory, isa, seed)
                if found is not None:
                    runs.append(found)
                continue
            runs.append(run_one(args.recipe, isa, seed, directory, args.dev, args.dev_limit, epochs, fit_args))
    if not runs:
        raise SystemExit(f"no finished runs under {args.out}")
    settings = {"recipe": args.recipe, "dev": f"{args.dev}[:{args.dev_limit}]", **dict(a[2:].split("=", 1) for a in fit_args)}
    table = report(runs, settings)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "m0_stability.md").write_text(table)
    (args.out / "m0_stability.json").write_text(json.dumps([{**r.__dict__} for r in runs], indent=2) + "\n")
    print(table, flush=True)


if __name__ == "__main__":
    main()
