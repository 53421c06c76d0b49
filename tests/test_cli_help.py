"""What ``hs-star`` says about itself: its name, its commands, a fast top-level ``--help``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hs_star_pl import COMMANDS, PROG
from tests.helpers.tiny_setup import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def _python(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if code is not None else [sys.executable, "-m", "hs_star_pl", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def test_console_script_is_the_light_entry_point():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts == {"hs-star": "hs_star_pl.__main__:main"}


def test_top_level_help_names_the_tool_and_its_commands_without_importing_torch():
    code = ("import sys; from hs_star_pl.__main__ import main; main(['--help']); "
            "heavy = sorted(m for m in ('torch', 'lightning', 'transformers', 'jsonargparse') if m in sys.modules); "
            "print('HEAVY', heavy)")
    out = _python(code=code)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    text = out.stdout
    assert text.startswith(f"usage: {PROG} ")
    for name, description in COMMANDS.items():
        assert f"  {name}" in text and description in text
    assert "predict" not in text and "Lightning Trainer" not in text and "__main__" not in text
    assert "hs-star fit -c configs/tiny/hs_star.yaml" in text


def test_no_command_prints_the_help_and_fails():
    out = _python()
    assert out.returncode == 2
    assert out.stdout.startswith(f"usage: {PROG} ") and "name a command" in out.stderr


def test_full_parser_uses_the_same_name_and_descriptions(capsys):
    from hs_star_pl.cli import HSStarCLI

    with pytest.raises(SystemExit) as stop:
        HSStarCLI(args=["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {PROG} ") and "Lightning Trainer" not in text
    for name, description in COMMANDS.items():
        assert name in text and " ".join(description.split()[:4]) in " ".join(text.split())
    assert "predict" not in text
    assert set(HSStarCLI.subcommands()) == set(COMMANDS)


def test_predict_is_refused_as_an_unknown_command(capsys):
    from hs_star_pl.cli import HSStarCLI

    with pytest.raises(SystemExit) as stop:
        HSStarCLI(args=["predict", "-c", str(REPO / "configs" / "base.yaml")])
    assert stop.value.code == 2
    assert "invalid choice: 'predict'" in capsys.readouterr().err
