"""One-shot check for the first GPU: install what the machine lacks, offline, then run each GPU path once.

A lent GPU machine (one GPU, x86-64, Python 3.12, no internet; its own torch, lightning,
transformers and peft, but no jsonargparse, math-verify or DeepSpeed) may be there for about ten
minutes. Build the wheelhouse here, carry it with the working tree, and run the check there
(docs/gpu-validation.md, "Run this first whenever a GPU is there"):

    python scripts/gpu_check.py --build-wheelhouse .whl                      # here, with pip's index
    python scripts/gpu_check.py --wheelhouse .whl --out $OUT/gpu_check.json  # on the GPU machine
    python scripts/gpu_check.py --dry-run --out gpu_check.json               # the same plan on CPU (CI)

The check runs these steps, each in its own process under its own timeout (their timeouts sum
to less than 8 minutes), and rewrites one JSON file after each, so whatever finished is on disk
even if the machine goes away. Every step records ``status`` (ok, failed, skipped, timeout),
``seconds``, the command, the tail of its output and what it measured:

1. ``install``: the carried wheels this interpreter lacks (or has in a version that some carried
   package refuses) go into a target folder with ``pip install --no-index --no-deps --target``;
   the machine's own torch and friends are never touched. Then every requirement of the package,
   of DeepSpeed and of pytest is checked against what is installed.
2. ``versions``: torch, CUDA, the GPU and its memory, lightning, transformers, peft, DeepSpeed.
3. ``gpu_tests``: ``python -m pytest -m gpu`` over the test files with gpu-marked tests (the
   494M-parameter ``gpu_validation.py`` case is left out: it alone needs more than this budget;
   docs/gpu-validation.md has its command).
4. ``fit_hf_bf16``: one HS-STaR iteration of the shipped tiny M_0 through the CLI
   (``configs/tiny/hs_star.yaml``, HFEngine) on the GPU in bf16-mixed.
5. ``fit_zero2``, ``fit_zero3``: the same under ``configs/strategy/deepspeed_zero{2,3}.yaml``
   with one device (skipped when DeepSpeed does not import).
6. ``reference_memory``: the peak memory the reference log-prob pass adds, at Qwen2.5's
   vocabulary (152,064), on a 2-layer Qwen2 with 4 sequences of ~1,200 tokens per forward, in
   units of one float32 logits tensor of the batch (``torch.cuda.max_memory_allocated``).
7. ``prm_offload``: ``benchmarks/prm_offload.py --device cuda``: a 0.36B PRM with ``offload: cpu``
   and the GPU memory each sleep gives back.

``--dry-run`` runs the same plan on the CPU with tiny settings (fp32, DeepSpeed's CPU strategy
configs, a small vocabulary); the CUDA-only step is skipped with its reason. It checks the
script, not the GPU.

The wheelhouse holds the packages below (``CARRIED``), pinned to the versions the CPU suite runs
with: binary wheels for CPython 3.12 on manylinux x86-64, and DeepSpeed built here from its
sdist (pure Python; its ops compile on first use, and the check's optimizer, torch's AdamW,
needs none). The package itself is not carried as a wheel: the working tree travels, and the
check puts it first on ``PYTHONPATH``. vLLM (300+ MB) cannot be carried: the fits use HFEngine.
"""

from __future__ import annotations

import argparse
import datetime
import email.parser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
LIMIT_BYTES = 64 * 2**20  # what the device tool carries with the working tree

# The wheelhouse: requirement -> why it is carried. Pinned to the CPU suite's versions.
CARRIED = {
    "jsonargparse[signatures]==4.53.0": "the CLI",
    "docstring-parser==0.18.0": "jsonargparse[signatures]",
    "typeshed-client==2.15.0": "jsonargparse[signatures]",
    "math-verify==0.9.0": "MathVerifyVerifier",
    "latex2sympy2_extended==1.11.0": "math-verify",
    "antlr4-python3-runtime==4.13.2": "latex2sympy2_extended",
    "deepspeed==0.19.8": "the ZeRO-2/3 fits (a wheel built here from the sdist)",
    "hjson==3.1.0": "deepspeed",
    "ninja==1.13.2": "deepspeed",
    "py-cpuinfo==9.0.0": "deepspeed",
    "msgpack==1.2.4": "deepspeed",
    "einops==0.8.2": "deepspeed",
    "pydantic==2.13.4": "deepspeed",
    "pydantic-core==2.46.4": "pydantic",
    "annotated-types==0.7.0": "pydantic",
    "typing-inspection==0.4.2": "pydantic",
    "typing-extensions==4.16.0": "pydantic needs >=4.14.1; installed only if the machine's is older",
    "pytest==9.0.3": "the gpu-marked tests",
    "pluggy==1.6.0": "pytest",
    "iniconfig==2.3.0": "pytest",
    "pygments==2.20.0": "pytest",
}
FROM_SDIST = {"deepspeed"}
# What the GPU machine brings with its torch, lightning, transformers and peft.
MACHINE = {"torch", "lightning", "transformers", "peft", "torchmetrics", "numpy", "packaging", "pyyaml", "tqdm",
           "sympy", "psutil", "safetensors", "huggingface-hub", "filelock", "fsspec", "jinja2", "networkx",
           "regex", "tokenizers", "accelerate", "lightning-utilities"}
# Requirements of the package that are imported on first use only, by code the check does not run.
LAZY = {"datasets": "imported on first use by core/problem_sources.py (parquet and hub problem sources)"}
# The requirement checks start from the package's own dependencies plus these.
EXTRA_ROOTS = ["deepspeed>=0.19.8", "pytest>=8"]
TARGET_PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]

# -- requirements ------------------------------------------------------------------------


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_environment(python: str = TARGET_PYTHON) -> dict[str, str]:
    """Marker values of the GPU machine (CPython ``python``, Linux x86-64)."""
    return {"python_version": python, "python_full_version": python + ".0", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "platform_python_implementation": "CPython", "implementation_name": "cpython",
            "implementation_version": python + ".0", "platform_release": "", "platform_version": ""}


def applies(requirement, extras: set[str], environment: dict[str, str] | None) -> bool:
    """Whether ``requirement``'s marker holds for a package installed with ``extras``."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**(environment or {}), "extra": extra}) for extra in extras or {""})


def package_roots() -> list[str]:
    """The package's dependencies (pyproject.toml) plus ``EXTRA_ROOTS``."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + EXTRA_ROOTS


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """``(canonical name, version, Requires-Dist)`` read from a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(name).decode("utf-8"))
    return canonical(meta["Name"]), meta["Version"], meta.get_all("Requires-Dist") or []


def check_closure(roots: list[str], available: dict[str, tuple[str, list[str]]], provided: set[str],
                  environment: dict[str, str] | None, follow: set[str] | None = None) -> dict:
    """Walk the requirements from ``roots`` through ``available`` packages.

    ``available`` maps a canonical name to ``(version, Requires-Dist)``; a requirement on a name
    in ``provided`` is taken as met without a version check (the machine brings it); one in
    ``LAZY`` is listed, not followed. ``environment`` holds the marker values (``None``: this
    interpreter's). ``follow``: the packages whose own requirements are walked (``None``: all;
    on the GPU machine the carried ones, not the machine's torch and its CUDA libraries).
    Returns ``{"unmet": [...], "provided": [...], "lazy": [...], "reached": [...]}``.
    """
    from packaging.requirements import Requirement

    unmet, from_machine, lazy, reached = [], set(), set(), set()
    stack = [(Requirement(r), "the package" if r not in EXTRA_ROOTS else "the check") for r in roots]
    seen: set[tuple[str, frozenset]] = set()
    while stack:
        req, parent = stack.pop()
        name = canonical(req.name)
        if name in LAZY:
            lazy.add(name)
            continue
        if name in available:
            version, requires = available[name]
            if not req.specifier.contains(version, prereleases=True):
                unmet.append(f"{req} (for {parent}): {name} {version} is there")
                continue
            key = (name, frozenset(req.extras))
            if key in seen:
                continue
            seen.add(key)
            reached.add(name)
            if follow is not None and name not in follow:
                continue
            for line in requires:
                child = Requirement(line)
                if applies(child, set(req.extras), None if environment is None else environment):
                    stack.append((child, name))
        elif name in provided:
            from_machine.add(name)
        else:
            unmet.append(f"{req} (for {parent}): not there")
    return {"unmet": sorted(set(unmet)), "provided": sorted(from_machine), "lazy": sorted(lazy),
            "reached": sorted(reached)}


# -- building the wheelhouse (here) ------------------------------------------------------


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def fits_target(wheel_name: str, python: str = TARGET_PYTHON) -> bool:
    """Whether a wheel file name has a tag that CPython ``python`` on manylinux x86-64 installs."""
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import parse_wheel_filename

    abi = "cp" + python.replace(".", "")
    version = tuple(int(v) for v in python.split("."))
    platforms = [p for p in PLATFORMS if p != "any"]
    supported = set(cpython_tags(version, abis=[abi], platforms=platforms))
    supported |= set(compatible_tags(version, interpreter=abi, platforms=platforms))
    return bool(parse_wheel_filename(wheel_name)[3] & supported)


def build_wheelhouse(dest: Path, python: str = TARGET_PYTHON) -> int:
    from packaging.requirements import Requirement

    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):  # a wheelhouse holds exactly the list below
        old.unlink()
    binaries = [r for r in CARRIED if canonical(Requirement(r).name) not in FROM_SDIST]
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
        "--abi", "cp" + python.replace(".", ""), *platform_args, "-d", str(dest), *binaries)
    for req in (r for r in CARRIED if canonical(Requirement(r).name) in FROM_SDIST):
        with tempfile.TemporaryDirectory() as tmp:
            pip("download", "--no-deps", "--no-binary=:all:", "-d", tmp, req)
            sdist = next(Path(tmp).iterdir())
            # no build isolation: DeepSpeed's setup imports torch; DS_BUILD_OPS=0 prebuilds no op
            pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(sdist),
                env={**os.environ, "DS_BUILD_OPS": "0"})

    problems, available, rows = [], {}, []
    for wheel in sorted(dest.glob("*.whl")):
        if not fits_target(wheel.name, python):
            problems.append(f"{wheel.name}: no tag for CPython {python} on Linux x86-64")
        meta_name, meta_version, requires = wheel_metadata(wheel)
        available[meta_name] = (meta_version, requires)
        rows.append((wheel.name, wheel.stat().st_size))
    for req in CARRIED:
        if canonical(Requirement(req).name) not in available:
            problems.append(f"{req}: no wheel in {dest}")
    closure = check_closure(package_roots(), available, MACHINE, target_environment(python))
    problems += [f"unmet: {u}" for u in closure["unmet"]]
    unused = sorted(set(available) - set(closure["reached"]))
    total = sum(size for _, size in rows)
    width = max(len(n) for n, _ in rows)
    for wheel_name, size in rows:
        print(f"{wheel_name:<{width}}  {size / 2**20:7.2f} MiB")
    print(f"{'total':<{width}}  {total / 2**20:7.2f} MiB ({len(rows)} wheels; the limit is {LIMIT_BYTES / 2**20:.0f} MiB)")
    print(f"from the GPU machine: {', '.join(closure['provided'])}")
    print(f"not carried, {', '.join(f'{k}: {v}' for k, v in LAZY.items())}")
    if unused:
        print(f"carried but reached by no requirement: {', '.join(unused)}")
    if total > LIMIT_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB is over the {LIMIT_BYTES / 2**20:.0f} MiB the device tool carries")
    manifest = {"python": python, "platforms": PLATFORMS, "carried": CARRIED, "wheels": dict(rows),
                "total_bytes": total, "from_machine": closure["provided"], "lazy": LAZY, "problems": problems}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


# -- installing from it (on the GPU machine) ----------------------------------------------


def installed_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_plan(wheels: list[Path]) -> tuple[list[Path], dict[str, str]]:
    """The wheels to install and ``{name: why}`` for those left out.

    A carried package is installed when this interpreter lacks it, or has a version that the
    package itself or a carried package being installed refuses (typing-extensions for
    pydantic, say); otherwise the machine's own copy is kept, and the requirements of the
    carried version are not imposed (a kept pydantic keeps its own pydantic-core).
    """
    from packaging.requirements import Requirement

    meta = {path: wheel_metadata(path) for path in wheels}
    present = {path: installed_version(name) for path, (name, _, _) in meta.items()}
    roots = package_roots()
    extras = {e for r in roots for e in Requirement(r).extras}  # jsonargparse[signatures]
    install = {path for path in meta if present[path] is None}
    while True:  # an installed package may refuse a kept one, whose own version then comes in
        wanted: dict[str, list] = {}
        for line in roots + [r for path in install for r in meta[path][2]]:
            req = Requirement(line)
            if applies(req, extras, None):
                wanted.setdefault(canonical(req.name), []).append(req.specifier)
        refused = {path for path in meta if path not in install
                   and any(not s.contains(present[path], prereleases=True) for s in wanted.get(meta[path][0], []))}
        if not refused:
            break
        install |= refused
    kept = {meta[path][0]: f"{present[path]} is installed" for path in meta if path not in install}
    return sorted(install), kept


def child_install(wheelhouse: str | None, target: Path) -> dict:
    result: dict = {"target": str(target)}
    if wheelhouse:
        wheels = sorted(Path(wheelhouse).glob("*.whl"))
        if not wheels:
            raise FileNotFoundError(f"--wheelhouse {wheelhouse}: no .whl files there (build it with --build-wheelhouse)")
        install, kept = install_plan(wheels)
        result.update(wheels=len(wheels), kept=kept, installed=[p.name for p in install])
        if install:
            target.mkdir(parents=True, exist_ok=True)
            if installed_version("pip"):
                cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse),
                       "--no-deps", "--target", str(target), "--upgrade", *map(str, install)]
                print("$ " + " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            else:  # no pip here: a wheel is a zip of its files
                for path in install:
                    with zipfile.ZipFile(path) as z:
                        z.extractall(target)
                result["installer"] = "unzipped (no pip)"
    else:
        result["note"] = "no --wheelhouse: nothing installed; the requirements are checked against this environment"
    sys.path.insert(0, str(target))  # as the later steps' PYTHONPATH puts it
    import importlib.metadata

    available = {}
    for dist in importlib.metadata.distributions():
        name = canonical(dist.metadata["Name"] or "")
        available.setdefault(name, (dist.version, dist.requires or []))
    from packaging.requirements import Requirement

    carried = {canonical(Requirement(r).name) for r in CARRIED}
    closure = check_closure(package_roots(), available, set(), None, follow=carried)
    result.update(unmet=closure["unmet"], lazy_not_checked=closure["lazy"])
    print(json.dumps(result, indent=1))
    return result


# -- the measuring steps (child processes) -----------------------------------------------


def child_versions() -> dict:
    import importlib

    import torch

    info: dict = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / 2**30, 2),
                    capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version())
    for dist in ("lightning", "transformers", "peft", "deepspeed", "jsonargparse", "math-verify", "torchmetrics", "vllm",
                 "pytest"):
        info[dist] = installed_version(dist)
    imports = {}
    for module in ("hs_star_pl.cli", "math_verify", "deepspeed"):
        try:
            importlib.import_module(module)
            imports[module] = "ok"
        except Exception as e:  # recorded: a failed import skips the steps that need it
            imports[module] = f"{type(e).__name__}: {e}"
    info["imports"] = imports
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    print(json.dumps(info, indent=1))
    return info


def child_reference_memory(dry_run: bool) -> dict:
    """Peak memory the reference log-prob pass adds, in float32 logits tensors of its batch."""
    import resource

    import torch
    from transformers import Qwen2ForCausalLM

    from hs_star_pl.core.records import PreferencePair
    from hs_star_pl.tensors.collate import encode_pair
    from hs_star_pl.tensors.tiny import build_byte_tokenizer, save_checkpoint_dir, tiny_qwen2_config
    from hs_star_pl.training.module import HSStarModule

    vocab, prompt_chars, response_chars = (4096, 40, 120) if dry_run else (152_064, 200, 1_000)
    pairs_per_forward, n_pairs = 2, 4  # 4 sequences (chosen + rejected) per forward, 2 forwards
    cuda = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    tokenizer = build_byte_tokenizer()
    config = tiny_qwen2_config(vocab, eos_token_id=tokenizer.eos_token_id, max_position_embeddings=4096)
    torch.manual_seed(0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint_dir(Path(tmp) / "model", Qwen2ForCausalLM(config), tokenizer)
        pairs = [PreferencePair(f"p{i}", f"q{i} " + "1 + 2 = 3\n" * (prompt_chars // 10), "a" * response_chars,
                                "b" * response_chars, "c", "r") for i in range(n_pairs)]
        max_length = prompt_chars + response_chars + 64
        chosen, rejected = encode_pair(tokenizer, pairs[0], max_length)
        tokens = pairs_per_forward * (len(chosen.ids) + len(rejected.ids))
        logits_bytes = tokens * vocab * 4
        for dtype in ("float32", "bfloat16"):
            module = HSStarModule(model_path=str(Path(tmp) / "model"), dtype=dtype, objective="dpo").to(device)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            else:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            started = time.perf_counter()
            out = module.compute_reference_logps(pairs, max_length=max_length, batch_size=pairs_per_forward)
            seconds = time.perf_counter() - started
            if cuda:
                peak = torch.cuda.max_memory_allocated(device) - before
            else:  # growth of the process's peak RSS: indicative only
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
            if not all(p.ref_chosen_logp is not None and p.ref_rejected_logp is not None for p in out):
                raise RuntimeError("compute_reference_logps left pairs without log-probs")
            rows[dtype] = {"peak_growth_bytes": peak, "peak_in_float32_logits": round(peak / logits_bytes, 3),
                           "seconds": round(seconds, 3)}
            del module
    result = {"device": str(device), "measure": "torch.cuda.max_memory_allocated" if cuda else "peak RSS growth (CPU)",
              "vocab_size": vocab, "sequences_per_forward": 2 * pairs_per_forward, "tokens_per_forward": tokens,
              "float32_logits_bytes": logits_bytes, "model_dtype": rows,
              "compare": "3.0x measured on CPU before chunked log-probs; the goal is at most 0.25x (docs/scale.md)"}
    print(json.dumps(result, indent=1))
    return result


CHILDREN = {"install": None, "versions": child_versions, "reference_memory": child_reference_memory}

# -- the plan ------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    timeout_s: float  # on the GPU; the dry run uses ``dry_timeout_s``
    dry_timeout_s: float
    cuda_only: bool = False
    needs_deepspeed: bool = False
    what: str = ""


STEPS = [
    Step("install", 35, 120, what="carried wheels the machine lacks, offline, into a target folder; requirements checked"),
    Step("versions", 30, 120, what="torch, CUDA, GPU, memory, lightning, transformers, peft, DeepSpeed"),
    Step("gpu_tests", 75, 60, cuda_only=True, what="python -m pytest -m gpu"),
    Step("fit_hf_bf16", 70, 240, what="one HS-STaR iteration of data/tiny/m0 through the CLI, HFEngine, bf16-mixed"),
    Step("fit_zero2", 80, 300, needs_deepspeed=True, what="the same under DeepSpeed ZeRO-2, one device"),
    Step("fit_zero3", 90, 400, needs_deepspeed=True, what="the same under DeepSpeed ZeRO-3, one device"),
    Step("reference_memory", 30, 120, what="reference-pass peak memory at vocabulary 152,064, in float32 logits tensors"),
    Step("prm_offload", 55, 240, what="benchmarks/prm_offload.py: a 0.36B PRM with offload cpu, GPU memory freed"),
]
BUDGET_S = 470  # the GPU steps' timeouts sum to this: under 8 minutes in all
assert sum(s.timeout_s for s in STEPS) <= BUDGET_S


def fit_command(step: str, run_dir: Path, dry_run: bool) -> list[str]:
    cmd = [sys.executable, "-m", "hs_star_pl", "fit", "-c", "configs/tiny/hs_star.yaml"]
    if step != "fit_hf_bf16":
        stage = step[-1]
        cmd += ["-c", f"configs/strategy/deepspeed_zero{stage}{'_cpu' if dry_run else ''}.yaml", "--trainer.devices=1",
                "--data.global_batch_size=null", "--data.batch_size=16"]
    elif dry_run:
        cmd += ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true"]
    else:
        cmd += ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed"]
    # the tiny config's engine is HFEngine (vLLM cannot be carried); one iteration
    cmd += ["--self_training.n_iterations=1", f"--trainer.default_root_dir={run_dir}"]
    if dry_run:  # a few problems: the loop's code paths, not its numbers
        cmd += ["--self_training.problems_per_iteration=16", "--evaluation.max_problems=16",
                "--self_training.budget.init_args.samples_per_problem=4",
                "--self_training.budget.init_args.n_presample=2"]
    else:
        cmd += ["--self_training.problems_per_iteration=64", "--evaluation.max_problems=100"]
    return cmd


def parse_fit(log: str, run_dir: Path) -> tuple[bool, dict]:
    result: dict = {"run_dir": str(run_dir)}
    # the round's numbers from its summary.json (the console shows one rounded line per round)
    summary_file = run_dir / "rounds" / "round_000" / "summary.json"
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
            result["round_0"] = {k: summary.get(k) for k in ("n_problems", "samples_total", "n_pairs",
                                                             "presample_accuracy", "mean_response_tokens")}
        except json.JSONDecodeError:
            pass
    for line in log.splitlines():
        match = re.match(r"eval: (M_\d+) \S+ acc ([\d.]+)%", line)
        if match:
            result.setdefault("test_accuracy", {})[match.group(1)] = float(match.group(2))
    # M_1's export: hf/policy_001 (hf/iteration_000 before that name)
    result["exported"] = any((run_dir / "hf" / name / "config.json").exists() for name in ("policy_001", "iteration_000"))
    return result["exported"] and "round_0" in result, result


def parse_pytest(log: str) -> tuple[bool, dict]:
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed)", log)}
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    return counts.get("passed", 0) > 0 and not failed, counts


def parse_prm_offload(path: Path, dry_run: bool) -> tuple[bool, dict]:
    report = json.loads(path.read_text())
    rows = {r["what"]: r for r in report["rows"]}

    def number(v):
        return None if v in ("", None) else float(str(v).replace(",", ""))
    result = {"prm": report["rows"][0]["PRM"], "device_note": report["notes"][-1]}
    for what in ("offload none", "offload cpu", "offload reload, page cache", "offload reload, from disk"):
        row = rows[what]
        result[what] = {"sleep_s": number(row["sleep s"]), "wake_s": number(row["wake s"]),
                        "gpu_mib_freed": number(row["GPU MiB freed"])}
    freed = result["offload cpu"]["gpu_mib_freed"]
    return dry_run or (freed is not None and freed > 0), result


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text(encoding="utf-8"))


@dataclass
class Check:
    args: argparse.Namespace
    out: Path
    logs: Path
    work: Path
    env: dict[str, str]
    started: float = field(default_factory=time.monotonic)
    results: dict = field(default_factory=dict)

    def write(self) -> None:
        payload = {"script": "scripts/gpu_check.py", "mode": "dry-run" if self.args.dry_run else "gpu",
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "commit": git_commit(), "budget_s": self.args.budget, "wheelhouse": self.args.wheelhouse,
                   "seconds": round(time.monotonic() - self.started, 1), "steps": self.results}
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(self.out)

    def record(self, step: Step, status: str, **values) -> dict:
        self.results[step.name] = {"status": status, "what": step.what, **values}
        self.write()
        print(f"[gpu_check] {step.name}: {status}" + (f" ({values['reason']})" if "reason" in values else "")
              + (f" in {values['seconds']} s" if "seconds" in values else ""), flush=True)
        return self.results[step.name]

    def run(self, step: Step, cmd: list[str], timeout: float, parse) -> dict:
        log_path = self.logs / f"{step.name}.log"
        started = time.monotonic()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own group: a timeout kills its workers too
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        seconds = round(time.monotonic() - started, 1)
        text = log_path.read_text(errors="replace")
        values = {"seconds": seconds, "timeout_s": round(timeout, 1), "command": " ".join(cmd), "returncode": rc,
                  "log": str(log_path), "output_tail": text[-self.args.tail:]}
        if rc is None:
            return self.record(step, "timeout", **values)
        try:
            ok, result = parse(text)
        except Exception as e:  # what the step printed did not have the expected shape
            ok, result = False, {"parse_error": f"{type(e).__name__}: {e}"}
        return self.record(step, "ok" if rc == 0 and ok else "failed", result=result, **values)


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_check(args: argparse.Namespace) -> int:
    dry = args.dry_run
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="hs_star_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    logs = out.parent / f"{out.stem}_logs"
    logs.mkdir(exist_ok=True)
    target = work / "site"
    path = os.pathsep.join(p for p in (str(ROOT), str(target), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not dry:
        env.setdefault("OMP_NUM_THREADS", "8")
    check = Check(args, out, logs, work, env)
    selected = set(args.steps.split(",")) if args.steps else {s.name for s in STEPS}
    unknown = selected - {s.name for s in STEPS}
    if unknown:
        raise SystemExit(f"--steps: unknown {sorted(unknown)}; choose from {[s.name for s in STEPS]}")
    child = [sys.executable, str(SCRIPT), *(["--dry-run"] if dry else [])]
    cuda, deepspeed = True, True
    for step in STEPS:
        if step.name not in selected:
            continue
        left = args.budget - (time.monotonic() - check.started)
        timeout = min(step.dry_timeout_s if dry else step.timeout_s, left)
        if step.cuda_only and dry:
            check.record(step, "skipped", reason="CUDA-only, and this is a dry run on the CPU")
            continue
        if step.cuda_only and not cuda:
            check.record(step, "skipped", reason="torch.cuda.is_available() is False (see versions)")
            continue
        if step.needs_deepspeed and not deepspeed:
            check.record(step, "skipped", reason="deepspeed does not import (see versions.result.imports)")
            continue
        if timeout < 5:
            check.record(step, "skipped", reason=f"the {args.budget:.0f} s budget is spent")
            continue
        if step.name == "install":
            cmd = child + ["--child", "install", "--child-out", str(work / "install.json"), "--target", str(target)]
            if args.wheelhouse:
                cmd += ["--wheelhouse", str(Path(args.wheelhouse).resolve())]
            check.run(step, cmd, timeout, lambda text: (True, json.loads((work / "install.json").read_text())))
        elif step.name in ("versions", "reference_memory"):
            file = work / f"{step.name}.json"
            file.unlink(missing_ok=True)
            record = check.run(step, child + ["--child", step.name, "--child-out", str(file)], timeout,
                               lambda text, file=file: (True, json.loads(file.read_text())))
            if step.name == "versions":
                info = record.get("result", {})
                cuda = bool(info.get("cuda_available")) if record["status"] == "ok" else False
                deepspeed = info.get("imports", {}).get("deepspeed") == "ok" if record["status"] == "ok" else False
                if not dry and not cuda:
                    print("[gpu_check] no CUDA device: the GPU steps will fail or be skipped", flush=True)
        elif step.name == "gpu_tests":
            cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                   "-k", "not test_gpu_validation_script_runs_on_cuda", *gpu_test_files()]
            check.run(step, cmd, timeout, parse_pytest)
        elif step.name.startswith("fit_"):
            run_dir = work / step.name
            shutil.rmtree(run_dir, ignore_errors=True)
            check.run(step, fit_command(step.name, run_dir, dry), timeout, lambda text, d=run_dir: parse_fit(text, d))
        elif step.name == "prm_offload":
            file = work / "prm_offload.json"
            file.unlink(missing_ok=True)
            cmd = [sys.executable, "benchmarks/prm_offload.py", "--json", str(file)]
            if dry:
                cmd += ["--quick", "--threads", "1"]
            else:
                cmd += ["--device", "cuda", "--sizes", "0.36b", "--repeats", "1", "--threads", "8"]
            check.run(step, cmd, timeout, lambda text: parse_prm_offload(file, dry))
    check.write()
    statuses = {name: r["status"] for name, r in check.results.items()}
    print(f"[gpu_check] wrote {out}: {json.dumps(statuses)}", flush=True)
    return 0 if all(s in ("ok", "skipped") for s in statuses.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:10]))
    parser.add_argument("--build-wheelhouse", metavar="DIR",
                        help="download and build the carried wheels into DIR, then stop")
    parser.add_argument("--python-version", default=TARGET_PYTHON,
                        help=f"the GPU machine's Python, for --build-wheelhouse (default {TARGET_PYTHON})")
    parser.add_argument("--wheelhouse", metavar="DIR", help="install what this machine lacks from DIR (offline) first")
    parser.add_argument("--out", help="the JSON of results (default $OUT/gpu_check.json when OUT is set, "
                                      "else checkpoints/gpu_check.json); step logs go beside it")
    parser.add_argument("--dry-run", action="store_true", help="the same plan on the CPU with tiny settings (CI)")
    parser.add_argument("--steps", help=f"comma-separated subset of {[s.name for s in STEPS]} (default: all)")
    parser.add_argument("--workdir", help="run folders and the install target (default: a new temporary folder)")
    parser.add_argument("--budget", type=float, help=f"seconds for all steps (default {BUDGET_S} on the GPU, 1800 dry)")
    parser.add_argument("--tail", type=int, default=3000, help="characters of each step's output kept in the JSON")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_wheelhouse:
        return build_wheelhouse(Path(args.build_wheelhouse), args.python_version)
    if args.child:
        if args.child == "install":
            result = child_install(args.wheelhouse, Path(args.target))
        elif args.child == "reference_memory":
            result = child_reference_memory(args.dry_run)
        else:
            result = child_versions()
        Path(args.child_out).write_text(json.dumps(result, indent=1) + "\n")
        return 1 if result.get("unmet") else 0
    if args.budget is None:
        args.budget = 1800 if args.dry_run else BUDGET_S
    if args.out is None:
        out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "checkpoints"
        args.out = str(out_dir / "gpu_check.json")
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
