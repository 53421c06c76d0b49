"""The vLLM API ``VLLMEngine`` relies on, checked against a vLLM installation or a wheel's source.

An upgrade of vLLM should fail a test on CPU, not a GPU job an hour in. The engine's uses of
vLLM are read from its own source with ``ast`` (:func:`engine_uses`), so a call added there
is covered without editing a list:

- ``vllm.LLM(...)`` and ``vllm.SamplingParams(...)`` keyword arguments (the ``LLM``
  arguments are the keys ``build_llm_kwargs`` sets and the ones ``llm_kwargs`` refuses);
- every method reached from the ``LLM`` (``self.llm.generate(...)``,
  ``self.llm.llm_engine.engine_core.shutdown()``, ...), with its keywords and positional
  count;
- every ``collective_rpc("<method>", args=..., kwargs={...})`` target: a method of vLLM's
  worker (GPU and CPU), or of the engine's worker extension;
- in the worker extension (``vllm_worker.py``) every vLLM worker method it calls
  (``self.reload_weights(weights_iterator=...)``, ``self.model_runner.get_model()``),
  through to the model runners when a worker method passes ``*args, **kwargs`` on;
- ``current_platform.<method>()``.

:data:`EXPLICIT` adds what the source cannot show by itself: the output fields the engine
reads, the ``external_launcher`` backend and the environment variables that executor reads
(:data:`~hs_star_pl.engines.colocation.LAUNCHER_ENV` must cover them).

Two readers of vLLM give the same answers: :class:`InstalledVLLM` (the imported classes,
through ``inspect``) and :class:`WheelVLLM` (a wheel's ``.py`` files, through ``ast``, nothing
imported: the GPU wheel needs CUDA). ``tests/test_vllm_contract.py`` runs the first,
``scripts/vllm_contract.py`` the second; docs/engines.md records the results.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ENGINE_FILES = ("hs_star_pl/engines/vllm.py", "hs_star_pl/engines/vllm_worker.py")
REPO = Path(__file__).resolve().parents[2]

# Where each vLLM class the engine reaches lives. Every location found must satisfy a use; a
# location marked optional (``?`` before the module) may be absent in a version, the others may
# not, and at least one location of each name must exist.
CLASSES: dict[str, tuple[tuple[str, str], ...]] = {
    "LLM": (("vllm.entrypoints.llm", "LLM"),),
    "EngineArgs": (("vllm.engine.arg_utils", "EngineArgs"),),
    "SamplingParams": (("vllm.sampling_params", "SamplingParams"),),
    "LLMEngine": (("vllm.v1.engine.llm_engine", "LLMEngine"),),
    # the engine-core client: in-process (external launcher) or in a child process (default)
    "EngineCoreClient": (("vllm.v1.engine.core_client", "InprocClient"), ("vllm.v1.engine.core_client", "SyncMPClient")),
    "Worker": (("vllm.v1.worker.gpu_worker", "Worker"), ("?vllm.v1.worker.cpu_worker", "CPUWorker")),
    # the GPU model runner, its V2 rewrite (VLLM_USE_V2_MODEL_RUNNER; the only one from 0.34),
    # and the CPU ones
    "ModelRunner": (("?vllm.v1.worker.gpu_model_runner", "GPUModelRunner"), ("?vllm.v1.worker.gpu.model_runner", "GPUModelRunner"),
                    ("?vllm.v1.worker.cpu_model_runner", "CPUModelRunner"), ("?vllm.v1.worker.cpu.model_runner", "CPUModelRunner")),
    "Platform": (("vllm.platforms.interface", "Platform"),),
    "RequestOutput": (("vllm.outputs", "RequestOutput"),),
    "CompletionOutput": (("vllm.outputs", "CompletionOutput"),),
    "Logprob": (("vllm.logprobs", "Logprob"),),
    "ExternalLauncher": (("vllm.v1.executor.uniproc_executor", "ExecutorWithExternalLauncher"),),
}
# The class an attribute holds, for attribute chains (``llm.llm_engine.engine_core``).
ATTRIBUTE_TYPES = {("LLM", "llm_engine"): "LLMEngine", ("LLMEngine", "engine_core"): "EngineCoreClient",
                   ("Worker", "model_runner"): "ModelRunner"}
# ``**kwargs`` that vLLM passes on to another class (``LLM(**kwargs)`` -> ``EngineArgs(**kwargs)``).
KWARGS_GO_TO = {("LLM", "__init__"): "EngineArgs"}


@dataclass(frozen=True)
class Use:
    """One thing the engine needs from vLLM.

    ``kind``: ``call`` (``chain`` from ``cls``, ending in a method; ``__init__`` for a
    constructor), ``import`` (module ``cls`` defines ``keywords``), ``fields`` (``cls`` has the attributes in ``keywords``), ``literal``
    (``DistributedExecutorBackend`` allows the values in ``keywords``) or ``env`` (``cls``
    reads only the variables in ``keywords`` from ``os.environ``).
    """

    kind: str
    cls: str
    chain: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    positional: int = 0
    where: str = ""

    def __str__(self) -> str:
        if self.kind == "call":
            args = ", ".join([*(["_"] * self.positional), *(f"{k}=" for k in self.keywords)])
            name = ".".join((self.cls, *self.chain)).replace(".__init__", "")
            return f"{name}({args})"
        if self.kind == "import":
            return f"from {self.cls} import {', '.join(self.keywords)}"
        return f"{self.kind} {self.cls}: {', '.join(self.keywords)}"


@dataclass
class Finding:
    use: Use
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # the vLLM classes that were read

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------- the engine's uses


def _chain(node: ast.AST) -> list[str]:
    """``self.llm.a.b`` -> ``["self", "llm", "a", "b"]`` ([] for anything else)."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(names)]
    return []


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _llm_kwargs(tree: ast.Module) -> set[str]:
    """The ``vllm.LLM`` argument names ``build_llm_kwargs`` sets and ``llm_kwargs`` refuses."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "build_llm_kwargs":
            for sub in ast.walk(node):
                if isinstance(sub, ast.Call) and _chain(sub.func)[-1:] in (["dict"], ["update"]):
                    names.update(k.arg for k in sub.keywords if k.arg)
                if isinstance(sub, ast.Subscript) and isinstance(sub.ctx, ast.Store) and _chain(sub.value) == ["kwargs"]:
                    names.update(_strings(sub.slice))
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id in ("_OWNED_LLM_KWARGS", "_OWN_ARGUMENT_LLM_KWARGS") for t in targets):
                value = node.value
                if isinstance(value, ast.Dict):  # {argument: why it is refused}
                    names.update(k.value for k in value.keys if isinstance(k, ast.Constant))
                elif value is not None:
                    names.update(_strings(value))
    return names


def engine_uses(repo: Path = REPO) -> list[Use]:
    """Every use of vLLM in the engine's source (``ENGINE_FILES``), read with ``ast``."""
    uses: list[Use] = []
    engine_path, worker_path = (repo / f for f in ENGINE_FILES)
    tree = ast.parse(engine_path.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{ENGINE_FILES[0]}:{node.lineno}"
        chain = _chain(node.func)
        keywords = tuple(sorted(k.arg for k in node.keywords if k.arg))
        if chain[:1] == ["vllm"] and len(chain) == 2 and chain[1] in CLASSES:
            if chain[1] == "LLM" and any(k.arg is None for k in node.keywords):  # LLM(**self.build_llm_kwargs(...))
                keywords = tuple(sorted(set(keywords) | _llm_kwargs(tree)))
            uses.append(Use("call", chain[1], ("__init__",), keywords, len(node.args), where))
        elif chain[:2] == ["self", "llm"] and len(chain) > 2:
            uses.append(Use("call", "LLM", tuple(chain[2:]), keywords, len(node.args), where))
            if chain[2:] == ["collective_rpc"] and node.args and isinstance(node.args[0], ast.Constant):
                rpc_keywords: tuple[str, ...] = ()
                positional = 0
                for k in node.keywords:
                    if k.arg == "kwargs" and isinstance(k.value, ast.Dict):
                        rpc_keywords = tuple(sorted(key.value for key in k.value.keys if isinstance(key, ast.Constant)))
                    if k.arg == "args" and isinstance(k.value, ast.Tuple):
                        positional = len(k.value.elts)
                method = node.args[0].value
                owner = "WeightSyncExtension" if method.startswith("hs_star_") else "Worker"
                uses.append(Use("call", owner, (method,), rpc_keywords, positional, where))
        elif (isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Call)
              and _chain(node.func.value.func) == ["_current_platform"]):  # _current_platform().is_cpu()
            uses.append(Use("call", "Platform", (node.func.attr,), keywords, len(node.args), where))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
            names = tuple(a.name for a in node.names)
            uses.append(Use("import", node.module or "", keywords=names, where=f"{ENGINE_FILES[0]}:{node.lineno}"))
    worker_tree = ast.parse(worker_path.read_text())
    own = {n.name for n in ast.walk(worker_tree) if isinstance(n, ast.FunctionDef)}
    for node in ast.walk(worker_tree):
        if isinstance(node, ast.Call):
            chain = _chain(node.func)
            if chain[:1] == ["self"] and len(chain) > 1 and chain[1] not in own and not chain[1].startswith("_"):
                keywords = tuple(sorted(k.arg for k in node.keywords if k.arg))
                uses.append(Use("call", "Worker", tuple(chain[1:]), keywords, len(node.args), f"{ENGINE_FILES[1]}:{node.lineno}"))
    return sorted(uses, key=lambda u: (u.where.split(":")[0], int(u.where.split(":")[1])))


def explicit_uses() -> list[Use]:
    """What the engine needs that its calls do not show (see the module docstring)."""
    from hs_star_pl.engines.colocation import EXTERNAL_LAUNCHER, LAUNCHER_ENV

    here = "hs_star_pl/engines/vllm.py"
    return [
        Use("fields", "RequestOutput", keywords=("outputs", "prompt", "prompt_token_ids"), where=f"{here} generate, check_canary"),
        Use("fields", "CompletionOutput", keywords=("finish_reason", "logprobs", "stop_reason", "text", "token_ids"),
            where=f"{here} _completion, check_canary"),
        Use("fields", "Logprob", keywords=("logprob",), where=f"{here} check_canary"),
        Use("literal", "DistributedExecutorBackend", keywords=(EXTERNAL_LAUNCHER,), where="hs_star_pl/engines/colocation.py"),
        Use("env", "ExternalLauncher", keywords=LAUNCHER_ENV, where="hs_star_pl/engines/colocation.py launcher_env"),
    ]


def all_uses(repo: Path = REPO) -> list[Use]:
    return engine_uses(repo) + explicit_uses()


# ---------------------------------------------------------------------------- reading vLLM


@dataclass
class Signature:
    """A method's parameters (``self`` left out) and where its ``*args, **kwargs`` go."""

    positional: list[str]
    keyword_only: list[str]
    var_positional: bool
    var_keyword: bool
    delegates_to: list[tuple[str, str]]  # (self attribute, method) called with **kwargs

    def accepts(self, keyword: str) -> bool:
        return keyword in self.positional or keyword in self.keyword_only


def _signature_from_ast(fn: ast.FunctionDef | ast.AsyncFunctionDef, drop_first: bool = True) -> Signature:
    a = fn.args
    positional = [p.arg for p in [*a.posonlyargs, *a.args]][1 if drop_first else 0:]
    delegates = []
    if a.kwarg is not None:
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and any(k.arg is None for k in node.keywords):
                chain = _chain(node.func)
                if len(chain) == 3 and chain[0] == "self":
                    delegates.append((chain[1], chain[2]))
    return Signature(positional, [p.arg for p in a.kwonlyargs], a.vararg is not None, a.kwarg is not None, delegates)


@dataclass
class ClassInfo:
    name: str
    methods: dict[str, Signature | None]  # None: not read yet (``signature`` reads it)
    attributes: set[str]  # instance attributes set in methods, class-level names, fields
    read: Callable[[str], Signature] | None = None

    def method(self, name: str) -> Signature | None:
        if name not in self.methods:
            return None
        if self.methods[name] is None and self.read is not None:
            self.methods[name] = self.read(name)
        return self.methods[name]


def _self_attributes(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                names.add(t.attr)
    return names


def _class_level_names(cls: ast.ClassDef) -> set[str]:
    names = set()
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
    return names


class VLLMReader:
    """Answers what a vLLM class has; subclasses read an installation or a wheel."""

    label = "vLLM"

    def classes(self, name: str) -> tuple[list[tuple[str, ClassInfo]], list[str]]:
        """The locations of ``name`` found (``module.qualname``, info), and the problems: a
        required location absent, or none found at all."""
        cache = self.__dict__.setdefault("_classes", {})
        found, problems = [], []
        for module, qual in CLASSES[name]:
            optional, module = module.startswith("?"), module.lstrip("?")
            if (module, qual) not in cache:
                cache[(module, qual)] = self.read_class(module, qual)
            if cache[(module, qual)] is not None:
                found.append((f"{module}.{qual}", cache[(module, qual)]))
            elif not optional:
                problems.append(f"{module}.{qual}: not found")
        if not found and not problems:
            locations = ", ".join(f"{module.lstrip('?')}.{qual}" for module, qual in CLASSES[name])
            problems.append(f"none of {locations} found")
        return found, problems

    def read_class(self, module: str, qualname: str) -> ClassInfo | None:
        raise NotImplementedError

    def backend_literals(self) -> set[str] | None:
        raise NotImplementedError

    def module_defines(self, module: str, name: str) -> bool | None:
        """Whether ``module`` defines (or imports) ``name``; ``None`` when the module is absent."""
        raise NotImplementedError

    def environ_keys(self, module: str, qualname: str) -> set[str] | None:
        raise NotImplementedError


def _environ_reads(tree: ast.AST) -> set[str]:
    """Keys read as ``os.environ["K"]``, ``os.environ.get("K")`` or ``os.getenv("K")``."""
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _chain(node.value)[-1:] == ["environ"] and isinstance(node.ctx, ast.Load):
            keys.update(_strings(node.slice))
        if isinstance(node, ast.Call) and _chain(node.func)[-2:] in (["environ", "get"], ["os", "getenv"]) and node.args:
            keys.update(_strings(node.args[0]))
    return keys


def _unwrap_static(member: object) -> object:
    return member.__func__ if isinstance(member, (staticmethod, classmethod)) else member


def _from_inspect(signature: inspect.Signature, drop_first: bool) -> Signature:
    params = list(signature.parameters.values())[1 if drop_first else 0:]
    kinds = inspect.Parameter
    return Signature(
        [p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)],
        [p.name for p in params if p.kind == kinds.KEYWORD_ONLY],
        any(p.kind == kinds.VAR_POSITIONAL for p in params), any(p.kind == kinds.VAR_KEYWORD for p in params), [])


class InstalledVLLM(VLLMReader):
    """The installed vLLM, imported: signatures through ``inspect``, attribute assignments
    through ``inspect.getsource`` of each class in the real MRO."""

    def __init__(self) -> None:
        import vllm

        self.label = f"installed vllm {vllm.__version__}"

    def _class(self, module: str, qualname: str) -> type | None:
        import importlib

        try:
            obj = importlib.import_module(module)
        except ImportError:
            return None
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj  # type: ignore[return-value]

    def read_class(self, module: str, qualname: str) -> ClassInfo | None:
        cls = self._class(module, qualname)
        if cls is None:
            return None
        attributes: set[str] = set(dir(cls)) | set(getattr(cls, "__struct_fields__", ()))
        for klass in reversed(cls.__mro__[:-1]):
            attributes |= set(getattr(klass, "__annotations__", {}))
            try:
                attributes |= _self_attributes(ast.parse(textwrap.dedent(inspect.getsource(klass))))
            except (OSError, TypeError, SyntaxError):
                pass
        names = [n for n in dir(cls) if inspect.isfunction(_unwrap_static(inspect.getattr_static(cls, n)))]
        methods: dict[str, Signature | None] = dict.fromkeys(names)
        if "__init__" not in methods or getattr(cls, "__struct_fields__", None):  # dataclass / msgspec: fields
            methods["__init__"] = _from_inspect(inspect.signature(cls), drop_first=False)

        def read(name: str) -> Signature:
            member = _unwrap_static(inspect.getattr_static(cls, name))
            try:
                fn = ast.parse(textwrap.dedent(inspect.getsource(member))).body[0]
            except (OSError, TypeError, SyntaxError, IndexError):
                fn = None
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name == name:
                return _signature_from_ast(fn)
            return _from_inspect(inspect.signature(member), drop_first=True)

        return ClassInfo(qualname, methods, attributes, read)

    def module_defines(self, module: str, name: str) -> bool | None:
        import importlib

        try:
            return hasattr(importlib.import_module(module), name)
        except ImportError:
            return None

    def backend_literals(self) -> set[str] | None:
        import typing

        from vllm.config import parallel

        return set(typing.get_args(getattr(parallel, "DistributedExecutorBackend", None))) or None

    def environ_keys(self, module: str, qualname: str) -> set[str] | None:
        cls = self._class(module, qualname)
        return None if cls is None else _environ_reads(ast.parse(textwrap.dedent(inspect.getsource(cls))))


class WheelVLLM(VLLMReader):
    """A vLLM wheel's source, read with ``ast``; nothing is imported (the GPU wheel needs CUDA)."""

    def __init__(self, wheel: str | Path) -> None:
        self.wheel = Path(wheel)
        self.label = self.wheel.name
        with zipfile.ZipFile(self.wheel) as z:
            self.files = {n: z.read(n).decode() for n in z.namelist() if n.startswith("vllm/") and n.endswith(".py")}
        self._trees: dict[str, ast.Module | None] = {}

    def _module(self, module: str) -> tuple[ast.Module | None, str]:
        base = module.replace(".", "/")
        for path in (f"{base}.py", f"{base}/__init__.py"):
            if path in self.files:
                if path not in self._trees:
                    self._trees[path] = ast.parse(self.files[path])
                return self._trees[path], path
        return None, ""

    def _find(self, module: str, name: str, depth: int = 0) -> tuple[ast.ClassDef, str] | None:
        """The class ``name`` defined in ``module`` or imported into it."""
        tree, path = self._module(module)
        if tree is None or depth > 8:
            return None
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return node, module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = node.module or ""
                        if node.level:
                            package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
                            package = package[: len(package) - node.level + 1]
                            source = ".".join([*package, *([node.module] if node.module else [])])
                        return self._find(source, alias.name, depth + 1)
        return None

    def _mro(self, module: str, name: str) -> list[ast.ClassDef]:
        found = self._find(module, name)
        if found is None:
            return []
        cls, where = found
        out = [cls]
        for base in cls.bases:
            chain = _chain(base.value if isinstance(base, ast.Subscript) else base)
            if chain and chain[-1] not in ("object", "ABC", "Generic", "Protocol", "Struct"):
                out += [c for c in self._mro(where, chain[-1]) if c not in out]
        return out

    def read_class(self, module: str, qualname: str) -> ClassInfo | None:
        mro = self._mro(module, qualname)
        if not mro:
            return None
        methods: dict[str, Signature] = {}
        attributes: set[str] = set()
        fields: list[str] = []
        for cls in reversed(mro):  # most derived last: it wins
            attributes |= _class_level_names(cls) | _self_attributes(cls)
            fields += [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
            for node in cls.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    methods[node.name] = _signature_from_ast(node)
        if "__init__" not in methods:  # a dataclass or msgspec struct: its fields are its arguments
            methods["__init__"] = Signature(fields, [], False, False, [])
        return ClassInfo(qualname, methods, attributes)

    def module_defines(self, module: str, name: str) -> bool | None:
        tree, _ = self._module(module)
        if tree is None:
            return None
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return True
            if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
                return True
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        # a lazily imported name (module-level __getattr__): listed in the module's strings
        return any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body) and name in _strings(tree)

    def backend_literals(self) -> set[str] | None:
        tree, _ = self._module("vllm.config.parallel")
        for node in (tree.body if tree else []):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == "DistributedExecutorBackend" for t in targets):
                return set(_strings(node.value))
        return None

    def environ_keys(self, module: str, qualname: str) -> set[str] | None:
        found = self._find(module, qualname)
        return None if found is None else _environ_reads(found[0])


# ---------------------------------------------------------------------------- checking


def _check_call(reader: VLLMReader, use: Use, finding: Finding, owner: str, chain: tuple[str, ...],
                keywords: tuple[str, ...], depth: int = 0) -> None:
    if owner == "WeightSyncExtension":  # the engine's own worker extension: importable here
        from hs_star_pl.engines.vllm_worker import WeightSyncExtension

        if not callable(getattr(WeightSyncExtension, chain[0], None)):
            finding.problems.append(f"WeightSyncExtension has no method {chain[0]}")
        return
    found, absent = reader.classes(owner)
    finding.problems += absent
    for location, info in found:
        finding.checked.append(location)
        if len(chain) > 1:  # an attribute on the way: its class continues the chain
            if chain[0] not in info.attributes:
                finding.problems.append(f"{location} has no attribute {chain[0]!r}")
            elif (owner, chain[0]) not in ATTRIBUTE_TYPES:
                finding.problems.append(f"the contract does not know the class of {owner}.{chain[0]} (ATTRIBUTE_TYPES)")
            else:
                _check_call(reader, use, finding, ATTRIBUTE_TYPES[(owner, chain[0])], chain[1:], keywords, depth + 1)
            continue
        method = info.method(chain[0])
        if method is None:
            finding.problems.append(f"{location} has no method {chain[0]!r}")
            continue
        if use.positional > len(method.positional) and not method.var_positional and depth == 0:
            finding.problems.append(f"{location}.{chain[0]} takes {len(method.positional)} positional arguments, "
                                    f"the engine passes {use.positional}")
        unknown = tuple(k for k in keywords if not method.accepts(k))
        if not unknown:
            continue
        if not method.var_keyword:
            finding.problems.append(f"{location}.{chain[0]} has no parameter(s) {', '.join(unknown)}")
        elif (owner, chain[0]) in KWARGS_GO_TO:
            _check_call(reader, use, finding, KWARGS_GO_TO[(owner, chain[0])], ("__init__",), unknown, depth + 1)
        elif method.delegates_to:
            for attr, name in method.delegates_to:
                if (owner, attr) not in ATTRIBUTE_TYPES:
                    finding.problems.append(f"{location}.{chain[0]} passes **kwargs to self.{attr}.{name}, whose class "
                                            "the contract does not know (ATTRIBUTE_TYPES)")
                else:
                    _check_call(reader, use, finding, ATTRIBUTE_TYPES[(owner, attr)], (name,), unknown, depth + 1)
        # **kwargs that go nowhere known: accepted as vLLM declares it


def check(reader: VLLMReader, uses: list[Use] | None = None) -> list[Finding]:
    """Each use, checked against ``reader``; a finding's ``problems`` say what is missing."""
    findings = []
    for use in uses if uses is not None else all_uses():
        finding = Finding(use)
        if use.kind == "call":
            _check_call(reader, use, finding, use.cls, use.chain, use.keywords)
        elif use.kind == "import":
            finding.checked.append(use.cls)
            for name in use.keywords:
                defined = reader.module_defines(use.cls, name)
                if not defined:
                    finding.problems.append(f"module {use.cls} " + ("not found" if defined is None else f"has no {name!r}"))
        elif use.kind == "fields":
            found, absent = reader.classes(use.cls)
            finding.problems += absent
            for location, info in found:
                finding.checked.append(location)
                init = info.method("__init__")
                missing = [k for k in use.keywords if k not in info.attributes and not (init and init.accepts(k))]
                if missing:
                    finding.problems.append(f"{location} has no field(s) {', '.join(missing)}")
        elif use.kind == "literal":
            finding.checked.append("vllm.config.parallel.DistributedExecutorBackend")
            allowed = reader.backend_literals()
            missing = [k for k in use.keywords if allowed is None or k not in allowed]
            if missing:
                finding.problems.append(f"DistributedExecutorBackend does not allow {missing} (allows {sorted(allowed or [])})")
        elif use.kind == "env":
            for module, qual in CLASSES[use.cls]:
                module = module.lstrip("?")
                finding.checked.append(f"{module}.{qual}")
                read = reader.environ_keys(module, qual)
                if read is None:
                    finding.problems.append(f"{module}.{qual}: not found")
                elif not read <= set(use.keywords):
                    finding.problems.append(f"{qual} reads {sorted(read - set(use.keywords))} from the environment, "
                                            "which hs_star_pl.engines.colocation does not set")
        findings.append(finding)
    return findings


def report(reader: VLLMReader, findings: list[Finding]) -> Iterator[str]:
    """One line per use: ``ok`` or ``FAIL``, the use, where the engine makes it, and why it failed."""
    yield f"vLLM contract against {reader.label}: {sum(f.ok for f in findings)}/{len(findings)} uses ok"
    for f in findings:
        yield f"{'ok  ' if f.ok else 'FAIL'}  {f.use}  [{f.use.where}]"
        for problem in f.problems:
            yield f"        {problem}"
