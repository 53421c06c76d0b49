"""The package skeleton and what the README promises: its commands exist, parse and come in
the order it says; the console script, extras and the git-ignored run outputs.

These run or parse the repository's own files, so they fail when one drifts from another (a
renamed script or config, a dropped extra, a CI script that runs something other than what the
README says).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys

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


def test_the_console_script_and_every_extra_that_is_installed_exist():
    """``hs-star`` points at a callable, and every extra that the scripts and docs install
    (``-e ".[dev]"``, ``hs-star-pl[plots]``, ...) is one pyproject defines."""
    project = pyproject()["project"]
    module, attr = project["scripts"]["hs-star"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    texts = [README, CI_RUN.read_text(encoding="utf-8"), (REPO / "scripts" / "demo.sh").read_text(encoding="utf-8"),
             *(path.read_text(encoding="utf-8") for path in (REPO / "docs").glob("*.md"))]
    named = {extra for text in texts for group in re.findall(r'(?:-e "\.|hs-star-pl)\[([a-z,]+)\]', text)
             for extra in group.split(",")}
    assert {"dev", "plots"} <= named
    assert named <= set(project["optional-dependencies"]), named - set(project["optional-dependencies"])


def test_the_readmes_scripts_are_executable():
    for script in (CI_RUN, REPO / "scripts" / "demo.sh"):
        assert os.access(script, os.X_OK), f"{script} must be executable"


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_run_outputs_are_git_ignored_except_the_readme():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0

    assert ignored("checkpoints/some_run/checkpoints/last.ckpt")
    assert ignored("checkpoints/tiny/m0")
    assert not ignored("checkpoints/README.md")


def commands(script: str) -> list[str]:
    """The script's command lines (no comments, no ``echo`` or ``stage`` progress lines, no blank lines)."""
    out = []
    for line in script.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "echo ", "stage ")):
            out.append(line)
    return out


def _readme_commands() -> list[str]:
    """Every command line in the README's bash blocks (comments cut, continuation lines joined)."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", README, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_the_readme_starts_with_the_demo_then_the_tests_on_its_first_screen():
    """The first command runs the demo from nothing, the second installs everything and tests;
    both are in the first 25 lines, and the README stays short (detail lives in docs/)."""
    commands = _readme_commands()
    assert commands[:2] == ["bash scripts/demo.sh", "bash .ci/run"]
    head = "\n".join(README.splitlines()[:25])
    assert "bash scripts/demo.sh" in head and "bash .ci/run" in head
    assert len(README.encode("utf-8")) <= 10_000


@pytest.mark.parametrize("script", ["scripts/demo.sh", ".ci/run"])
def test_the_readmes_scripts_are_bash_that_parses(script):
    assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0


def test_the_demo_script_installs_torch_first_then_runs_the_demo_config():
    """What ``scripts/demo.sh`` runs, in order (tests/test_console.py runs its demo step,
    tests/test_demo_install.py the whole script in a fresh virtual environment)."""
    lines = commands((REPO / "scripts" / "demo.sh").read_text(encoding="utf-8"))
    torch_at = next(i for i, line in enumerate(lines) if "pip install -q torch==2.13.0" in line)
    package_at = next(i for i, line in enumerate(lines) if "-c .ci/constraints-cpu.txt -e" in line)
    demo_at = next(i for i, line in enumerate(lines) if "-m hs_star_pl fit -c configs/tiny/hs_star.yaml" in line)
    assert torch_at < package_at < demo_at


def test_ci_installs_torch_first_and_ends_with_both_test_tiers():
    lines = commands(CI_RUN.read_text(encoding="utf-8"))
    assert lines[-2:] == ["python -m pytest", "python -m pytest -m integration"]
    torch_at = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line)
    package_at = next(i for i, line in enumerate(lines) if '-e ".[dev]"' in line)
    assert torch_at < package_at
    assert "python -m pytest" in _readme_commands() and "python -m pytest -m integration" in _readme_commands()


def test_every_hs_star_command_in_the_readme_parses(tmp_path):
    """Each ``hs-star`` line of the README builds its config (``--print_config``: parsed, not run);
    each ``python -m`` module exists; each config file named exists."""
    import importlib.util

    hs_star = [c for c in _readme_commands() if c.startswith("hs-star ")]
    assert len(hs_star) >= 3
    for command in hs_star:
        args = command.split()[1:]
        for path in (b for a, b in zip(args, args[1:]) if a == "-c"):
            assert (REPO / path).is_file(), (command, path)
        out = subprocess.run([sys.executable, "-m", "hs_star_pl", *args, "--print_config"], capture_output=True,
                             text=True, cwd=REPO, timeout=300,
                             env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, (command, out.stderr[-2000:])
    for command in _readme_commands():
        if command.startswith("python -m ") and not command.startswith("python -m pytest"):
            assert importlib.util.find_spec(command.split()[2]) is not None, command
