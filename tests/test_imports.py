"""The package's layers are folders, and each folder imports only from the layers below it.

From the bottom up (docs/layout.md explains each):

1. ``infra/``: plain Python every layer uses (errors, faults, JSONL lines, the run lock, ...).
2. ``core/``: the pure core, what a round reads, decides and writes.
3. ``tasks/``, ``evaluation/``, ``verifiers``: pure code beside the core (task generators,
   benchmark files and protocol, the answer checks).
4. ``tensors/``: torch without Lightning (losses, batches, packing, LoRA, ZeRO-3 helpers).
5. ``engines/``, ``prm/``: the backends behind core's protocols.
6. ``training/``: the Lightning shell.
7. ``cli``, ``__main__``, ``experiments/``: the entry points.

The rules are checked on every import in every source file, function-level imports included,
so a lazy import cannot hide an upward arrow or a cycle. Every module is found by walking the
package, so a new file is covered without editing this one.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import hs_star_pl

PACKAGE = Path(hs_star_pl.__file__).parent
HEAVY = ("torch", "lightning", "pytorch_lightning", "transformers")

LAYERS = [
    ("infra",),
    ("core",),
    ("tasks", "evaluation", "verifiers"),
    ("tensors",),
    ("engines", "prm"),
    ("training",),
    ("cli", "__main__", "experiments"),
]
"""The package's top-level names, bottom layer first."""

PURE_LAYERS = 3
"""The first three layers import neither torch, Lightning nor transformers."""

NO_LIGHTNING_LAYERS = 5
"""Up to the backends, nothing imports Lightning: the shell hands them a model or a state dict."""


def all_modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> source file."""
    found = {"hs_star_pl": PACKAGE / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE)], "hs_star_pl."):
        rel = info.name.split(".")[1:]
        path = PACKAGE.joinpath(*rel)
        found[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return found


MODULES = all_modules()


def package_imports(path: Path, modules=MODULES) -> set[str]:
    """Modules of the package a source file imports, at the top or inside functions.

    ``from hs_star_pl.infra import faults`` names the module ``hs_star_pl.infra.faults`` when that
    is a module, else the package it was taken from.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {name for name in found if name == "hs_star_pl" or name.startswith("hs_star_pl.")}


def layer_of(module: str) -> int | None:
    """The index in ``LAYERS`` of a module's top-level folder or file; ``None`` for the package itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add its folder to one")


def import_graph(modules=MODULES) -> dict[str, set[str]]:
    return {name: package_imports(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or ``None`` when it has none.

    >>> find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()})
    ['a', 'b', 'c', 'a']
    >>> find_cycle({"a": {"b"}, "b": set()}) is None
    True
    """
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_every_module_is_in_a_layer_and_few_stay_flat():
    flat = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__", "__main__", "cli", "verifiers"], flat
    for name in MODULES:
        layer_of(name)


def test_the_walk_finds_the_modules_of_each_folder():
    """Guards the checks below against passing over an empty list."""
    for folder in ("infra", "core", "tensors", "engines", "prm", "training", "evaluation"):
        on_disk = {p.stem for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__"}
        found = {name.rsplit(".", 1)[1] for name in MODULES if name.startswith(f"hs_star_pl.{folder}.")}
        assert on_disk and found == on_disk, folder


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "an import cycle: " + " -> ".join(cycle or [])


def test_imports_point_down_only():
    upward = {}
    for name, targets in import_graph().items():
        mine = layer_of(name)
        if mine is None:
            continue
        bad = sorted(t for t in targets if (layer_of(t) or 0) > mine)
        if bad:
            upward[name] = bad
    assert upward == {}, f"imports from a higher layer (LAYERS, bottom first): {upward}"


def test_a_planted_cycle_and_upward_import_are_found(tmp_path):
    """The checks above on a package where infra imports training and training imports infra."""
    pkg = tmp_path / "hs_star_pl"
    for rel, text in {
        "__init__.py": "", "infra/__init__.py": "", "training/__init__.py": "",
        "infra/errors.py": "def f():\n    from hs_star_pl.training import module\n",
        "training/module.py": "from hs_star_pl.infra import errors\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    modules = {"hs_star_pl.infra.errors": pkg / "infra/errors.py", "hs_star_pl.training.module": pkg / "training/module.py"}
    graph = {name: package_imports(path, modules) for name, path in modules.items()}
    assert graph == {"hs_star_pl.infra.errors": {"hs_star_pl.training.module"},
                     "hs_star_pl.training.module": {"hs_star_pl.infra.errors"}}
    assert find_cycle(graph) == ["hs_star_pl.infra.errors", "hs_star_pl.training.module", "hs_star_pl.infra.errors"]
    assert layer_of("hs_star_pl.infra.errors") < layer_of("hs_star_pl.training.module")


def _modules_in(first: int, last: int) -> list[str]:
    return sorted(n for n in MODULES if (layer := layer_of(n)) is not None and first <= layer < last)


def _loaded_after_importing(modules: list[str], heavy: tuple[str, ...]) -> list[str]:
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_pure_layers_do_not_import_torch_lightning_or_transformers():
    pure = _modules_in(0, PURE_LAYERS)
    assert "hs_star_pl.core.rounds" in pure and "hs_star_pl.infra.errors" in pure
    assert _loaded_after_importing(pure, HEAVY) == []


def test_tensor_code_and_backends_do_not_import_lightning():
    below_shell = _modules_in(PURE_LAYERS, NO_LIGHTNING_LAYERS)
    assert "hs_star_pl.tensors.losses" in below_shell and "hs_star_pl.engines.hf" in below_shell
    assert _loaded_after_importing(below_shell, ("lightning", "pytorch_lightning")) == []


def test_docstring_examples_hold():
    """In every layer: the config checks' examples (the shell's) as much as the core's."""
    for name in sorted(MODULES):
        module = importlib.import_module(name)
        result = doctest.testmod(module)
        assert result.failed == 0, f"{name}: {result.failed} doctest failures"
