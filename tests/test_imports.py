"""The pure rule is a folder rule: everything under ``hs_star_pl/core/`` is plain Python (STYLE 2.1).

Every module under ``hs_star_pl.core`` (found by walking the package, so a new module is
covered without editing this file) and the few pure modules kept outside it import neither
torch, lightning nor transformers; core imports nothing of the package outside itself but
the infrastructure below it; and their docstring examples hold. docs/layout.md explains
what lives where.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import hs_star_pl.core

HEAVY = ("torch", "lightning", "pytorch_lightning", "transformers")

PURE_OUTSIDE_CORE = [
    "errors", "faults", "jsonl", "storage", "run_lock", "workers",  # infrastructure every layer uses
    "verifiers",  # the answer checks: math-verify runs in its worker processes, never here
    "config_checks",  # the CLI's checks over the whole parsed config
    "tasks.arithmetic", "tasks.tiny_demo",  # task generators: they write problem files
    "evaluation.datasets", "evaluation.protocol",  # the pure half of benchmark evaluation
]
"""Pure modules that stay outside ``core/``, and why (docs/layout.md)."""

CORE_MAY_IMPORT = {"hs_star_pl.errors", "hs_star_pl.faults", "hs_star_pl.jsonl", "hs_star_pl.storage"}
"""What ``core/`` may import from the rest of the package: the infrastructure below it."""


def core_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(hs_star_pl.core.__path__, "hs_star_pl.core."))


PURE = ["hs_star_pl.core", *core_modules(), *(f"hs_star_pl.{name}" for name in PURE_OUTSIDE_CORE)]


def test_the_walk_finds_the_core_modules():
    """Guards the tests below against passing over an empty list."""
    found = core_modules()
    for name in ("answers", "artifacts", "budget", "difficulty", "problems", "protocols", "records", "rounds", "selection"):
        assert f"hs_star_pl.core.{name}" in found
    on_disk = {p.stem for p in Path(hs_star_pl.core.__file__).parent.glob("*.py") if p.stem != "__init__"}
    assert {name.rsplit(".", 1)[1] for name in found} == on_disk


def test_pure_modules_do_not_import_torch_lightning_or_transformers():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in PURE)
        + f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _package_imports(path: Path) -> set[str]:
    """Modules of ``hs_star_pl`` that a source file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "hs_star_pl":  # from hs_star_pl import faults
                found.update(f"hs_star_pl.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
    return {name for name in found if name == "hs_star_pl" or name.startswith("hs_star_pl.")}


def test_core_imports_only_core_and_the_infrastructure_below_it():
    upward = {}
    for path in sorted(Path(hs_star_pl.core.__file__).parent.glob("*.py")):
        bad = sorted(m for m in _package_imports(path)
                     if not (m == "hs_star_pl.core" or m.startswith("hs_star_pl.core.") or m in CORE_MAY_IMPORT))
        if bad:
            upward[path.name] = bad
    assert upward == {}, f"core/ imports modules outside core/ (allowed: {sorted(CORE_MAY_IMPORT)}): {upward}"


def test_docstring_examples_hold():
    for name in PURE:
        module = importlib.import_module(name)
        result = doctest.testmod(module)
        assert result.failed == 0, f"{name}: {result.failed} doctest failures"
