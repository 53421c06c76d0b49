"""The package skeleton the README promises: distribution, console script, extras, layout,
the git-ignored run outputs, and `.ci/run` running exactly the README's test command.

These read the repository's own files, so they fail when one drifts from another (a renamed
script, a dropped extra, a CI script that runs something other than what the README says).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess

import pytest

from tests.helpers.tiny_setup import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

README = (REPO / "README.md").read_text(encoding="utf-8")
CI_RUN = REPO / ".ci" / "run"


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_distribution_script_and_extras():
    meta = pyproject()
    project = meta["project"]
    assert project["name"] == "hs-star-pl"
    assert project["scripts"] == {"hs-star": "hs_star_pl.cli:main"}
    module, attr = project["scripts"]["hs-star"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    extras = project["optional-dependencies"]
    assert {"vllm", "deepspeed", "dev"} <= set(extras)
    dev = " ".join(extras["dev"])
    assert "pytest" in dev and "hypothesis" in dev
    assert meta["tool"]["setuptools"]["packages"]["find"]["include"] == ["hs_star_pl*"]


def test_ci_script_is_executable():
    assert os.access(CI_RUN, os.X_OK), ".ci/run must be executable"


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_run_outputs_are_git_ignored_except_the_readme():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0

    assert ignored("checkpoints/some_run/checkpoints/last.ckpt")
    assert ignored("checkpoints/tiny/m0")
    assert not ignored("checkpoints/README.md")


def commands(script: str) -> list[str]:
    """The script's command lines (no comments, no ``echo``, no blank lines)."""
    out = []
    for line in script.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not line.startswith("echo "):
            out.append(line)
    return out


def test_ci_runs_the_readmes_test_command_after_installing_torch_first():
    """The README names ``python -m pytest`` as the test command and ``-m integration`` as the
    second tier; ``.ci/run`` ends with the two, and installs torch 2.13.0 before the package,
    as the README's CPU instructions do."""
    assert re.search(r"the test command alone is `python -m pytest`", README)
    assert "`python -m pytest -m integration`" in README
    lines = commands(CI_RUN.read_text(encoding="utf-8"))
    assert lines[-2:] == ["python -m pytest", "python -m pytest -m integration"]
    torch_at = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line)
    package_at = next(i for i, line in enumerate(lines) if '-e ".[dev]"' in line)
    assert torch_at < package_at
    assert README.index("pip install torch==2.13.0") < README.index('-e ".[dev]"')


def test_the_readmes_main_job_config_exists():
    match = re.search(r"^hs-star fit -c (configs/\S+\.yaml)$", README, flags=re.M)
    assert match, "the README's Quickstart must give the main job's command"
    assert (REPO / match.group(1)).is_file()
