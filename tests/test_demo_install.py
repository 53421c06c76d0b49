"""The README's first command, install included: ``bash scripts/demo.sh`` in a fresh virtual
environment that sees this machine's packages (``--system-site-packages``: the installs it runs
are then checks and an editable install, not downloads of torch), on a copy of this checkout,
with a short demo. A fresh machine differs only in what pip downloads."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.helpers.tiny_setup import REPO


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_demo_script_installs_into_a_fresh_environment_and_runs_the_demo(tmp_path):
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    out = subprocess.run(["bash", "scripts/demo.sh", "--self_training.n_iterations=1",
                          "--self_training.problems_per_iteration=12", "--evaluation.max_problems=6",
                          f"--trainer.default_root_dir={tmp_path / 'run'}"],
                         cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "== torch (CPU wheel) first" in out.stdout and "== the demo:" in out.stdout
    # the package the demo ran is the copy's, installed into the new environment
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import hs_star_pl; print(hs_star_pl.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(clone / "hs_star_pl" / "__init__.py")
    assert (venv / "bin" / "hs-star").is_file()
    assert "| M_1 |" in (tmp_path / "run" / "results.md").read_text()
