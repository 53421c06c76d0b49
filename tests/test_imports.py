"""The modules that decide import neither torch nor lightning (STYLE 2.1)."""

from __future__ import annotations

import subprocess
import sys

PURE = ["errors", "faults", "jsonl", "storage", "config_checks", "core.fingerprint", "core.records", "core.problems", "evaluation.datasets", "evaluation.protocol", "core.protocols", "core.steps", "core.difficulty", "core.budget", "core.selection", "core.rounds", "core.artifacts", "tasks.arithmetic"]


def test_pure_modules_do_not_import_torch_or_lightning():
    code = (
        "import sys\n"
        + "".join(f"import hs_star_pl.{m}\n" for m in PURE)
        + "heavy = sorted(m for m in ('torch', 'lightning', 'transformers', 'pytorch_lightning') if m in sys.modules)\n"
        + "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_docstring_examples_hold():
    import doctest
    import importlib

    for name in PURE:
        module = importlib.import_module(f"hs_star_pl.{name}")
        result = doctest.testmod(module)
        assert result.failed == 0, f"{name}: {result.failed} doctest failures"
