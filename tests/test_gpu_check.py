"""scripts/gpu_check.py: the one-shot GPU check, checked on the CPU.

The wheelhouse's requirement walk and tag check run on hand-made wheels; the offline install
runs the script's real install step (pip, into a target folder) on a hand-made wheelhouse; and
the whole plan runs as ``--dry-run`` (integration tier), its JSON read back.

Run: ``PYTHONPATH=$PWD python -m pytest tests/test_gpu_check.py -q`` (add ``-m integration`` for the
dry run).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers.tiny_setup import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


def make_wheel(folder: Path, name: str, version: str, requires: list[str] = (), module: str | None = None) -> Path:
    """A minimal pure-Python wheel: METADATA, WHEEL, RECORD and optionally one module."""
    stem = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{stem}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{stem}.dist-info/METADATA": meta,
             f"{stem}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    if module:
        files[f"{module}.py"] = "VALUE = 42\n"
    files[f"{stem}.dist-info/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{stem}.dist-info/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_the_requirement_walk_names_what_a_wheelhouse_lacks(gpu_check, tmp_path):
    wheels = [
        make_wheel(tmp_path, "top", "1.0", ["mid>=2", "machine-thing", "gone", "old-one>=3",
                                            "py310-only; python_version < '3.11'", "extra-dep; extra == 'fancy'"]),
        make_wheel(tmp_path, "mid", "2.5", ["leaf"]),
        make_wheel(tmp_path, "old-one", "2.0"),
        make_wheel(tmp_path, "extra-dep", "1.0", ["extra-leaf"]),
    ]
    available = {}
    for path in wheels:
        name, version, requires = gpu_check.wheel_metadata(path)
        available[name] = (version, requires)
    env = gpu_check.target_environment()
    plain = gpu_check.check_closure(["top"], available, {"machine-thing"}, env)
    assert plain["provided"] == ["machine-thing"]
    assert plain["reached"] == ["mid", "top"]
    assert plain["unmet"] == ["gone (for top): not there", "leaf (for mid): not there",
                              "old-one>=3 (for top): old-one 2.0 is there"]
    fancy = gpu_check.check_closure(["top[fancy]", "datasets>=3"], available, {"machine-thing"}, env)
    assert "extra-dep" in fancy["reached"] and "extra-leaf (for extra-dep): not there" in fancy["unmet"]
    assert fancy["lazy"] == ["datasets"]  # imported on first use: listed, not required


def test_wheel_tags_are_checked_against_cpython_312_on_manylinux(gpu_check):
    assert gpu_check.fits_target("msgpack-1.2.4-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
    assert gpu_check.fits_target("ninja-1.13.2-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl")
    assert gpu_check.fits_target("jsonargparse-4.53.0-py3-none-any.whl")
    assert not gpu_check.fits_target("msgpack-1.2.4-cp311-cp311-manylinux_2_17_x86_64.whl")
    assert not gpu_check.fits_target("msgpack-1.2.4-cp312-cp312-macosx_11_0_arm64.whl")


def test_the_carried_list_covers_the_packages_the_machine_lacks(gpu_check):
    carried = {gpu_check.canonical(r.split("[")[0].split("==")[0]) for r in gpu_check.CARRIED}
    assert {"jsonargparse", "docstring-parser", "typeshed-client", "math-verify", "latex2sympy2-extended",
            "antlr4-python3-runtime", "deepspeed", "pytest"} <= carried
    assert not carried & gpu_check.MACHINE  # the machine's torch and friends are never carried
    assert sum(s.timeout_s for s in gpu_check.STEPS) <= gpu_check.BUDGET_S < 8 * 60


def run_check(tmp_path: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out" / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--workdir", str(tmp_path / "work"),
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_install_puts_only_what_is_missing_into_the_target_offline(tmp_path):
    import importlib.metadata

    wheelhouse = tmp_path / "whl"
    make_wheel(wheelhouse, "gpucheck-probe", "0.1", module="gpucheck_probe")  # absent here: installed
    make_wheel(wheelhouse, "gpucheck-needs", "0.1", ["iniconfig>=99"])  # absent here: installed
    make_wheel(wheelhouse, "iniconfig", "99.0")  # the installed one is refused by gpucheck-needs: installed
    pyyaml = importlib.metadata.version("pyyaml")
    make_wheel(wheelhouse, "pyyaml", pyyaml, ["pluggy>=99"])  # installed here and refused by nobody: kept
    pluggy = importlib.metadata.version("pluggy")
    make_wheel(wheelhouse, "pluggy", "99.0")  # refused only by the carried pyyaml, which is not installed: kept
    proc, report = run_check(tmp_path, "--wheelhouse", str(wheelhouse), "--steps", "install", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    step = report["steps"]["install"]
    assert step["status"] == "ok" and set(step) >= {"seconds", "output_tail", "command"}
    result = step["result"]
    assert sorted(result["installed"]) == ["gpucheck_needs-0.1-py3-none-any.whl", "gpucheck_probe-0.1-py3-none-any.whl",
                                           "iniconfig-99.0-py3-none-any.whl"]
    assert result["kept"] == {"pyyaml": f"{pyyaml} is installed", "pluggy": f"{pluggy} is installed"}
    assert result["unmet"] == []
    target = Path(result["target"])
    probe = subprocess.run([sys.executable, "-c", "import gpucheck_probe; print(gpucheck_probe.VALUE)"],
                           env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "42"
    assert not (target / "yaml").exists()


def test_an_empty_wheelhouse_fails_the_install_step_with_the_folder_named(tmp_path):
    (tmp_path / "empty").mkdir()
    proc, report = run_check(tmp_path, "--wheelhouse", str(tmp_path / "empty"), "--steps", "install", timeout=120)
    assert proc.returncode == 1
    step = report["steps"]["install"]
    assert step["status"] == "failed" and "no .whl files there" in step["output_tail"]


@pytest.mark.integration
def test_the_dry_run_runs_every_step_on_the_cpu(tmp_path):
    proc, report = run_check(tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:]
    steps = report["steps"]
    assert report["mode"] == "dry-run" and list(steps) == ["install", "versions", "gpu_tests", "fit_hf_bf16", "fit_zero2",
                                                           "fit_zero3", "reference_memory", "prm_offload"]
    assert all(s["status"] in ("ok", "failed", "skipped", "timeout") for s in steps.values())
    assert steps["gpu_tests"] == {"status": "skipped", "what": steps["gpu_tests"]["what"],
                                  "reason": "CUDA-only, and this is a dry run on the CPU"}
    deepspeed = steps["versions"]["result"]["imports"]["deepspeed"] == "ok"
    for name, step in steps.items():
        if name == "gpu_tests" or (name.startswith("fit_zero") and not deepspeed):
            continue
        assert step["status"] == "ok", (name, step.get("output_tail"))
        assert step["seconds"] > 0 and Path(step["log"]).exists()
    for name in ("fit_hf_bf16", "fit_zero2", "fit_zero3") if deepspeed else ("fit_hf_bf16",):
        result = steps[name]["result"]
        assert result["exported"] and result["round_0"]["n_problems"] == 16
        assert set(result["test_accuracy"]) == {"M_0", "M_1"}
    assert steps["versions"]["result"]["cuda_available"] is False
    memory = steps["reference_memory"]["result"]
    assert set(memory["model_dtype"]) == {"float32", "bfloat16"} and memory["sequences_per_forward"] == 4
    assert steps["prm_offload"]["result"]["offload cpu"]["gpu_mib_freed"] is None  # nothing moves on the CPU
