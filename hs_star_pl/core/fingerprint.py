"""The settings that decide a round's content, recorded with every round and compared on reuse.

A run folder (``trainer.default_root_dir``) is reused on purpose: ``--ckpt_path last`` resumes
a killed run, and a finished round on disk is read back, never redone (``callback``). Since
the folder is named in the YAML, editing the YAML and running again is the normal workflow,
and without a record the edited run would silently read back rounds made under the old
settings, or finish a half-made round with the new ones (a ledger claiming 3 pre-samples per
problem over 2 on disk). So each round folder holds ``settings.json`` (written before the
round's first file) and the checkpoint's self-training state holds the same record; a run
that finds a record that differs from its own settings refuses, naming every key that
differs with both values and the two ways out: a new ``trainer.default_root_dir``, or the
old settings back.

What counts (``counts``): every setting that can change what a round holds or what the
policy that samples it was trained with:

* ``self_training.*``: the problem pool (by content: ``self_training.problems_file`` is
  recorded as a digest of the loaded problems, so a moved file with the same problems is the
  same pool and an edited one is not), the draw size, the budget (K, n_p, the allocator), the
  difficulty thresholds, the selection (classes, objective), sampling, the step delimiter,
  the seed, and the engine, verifier and PRM with their settings;
* the policy: ``model.*`` (the initial model ``model.model_path``, by path and by content, or
  ``model.tiny``; the objective, beta, optimizer and schedule), ``seed_everything``, and the
  training settings that shape M_t: ``data.template``/``system_prompt``/``max_length``/``batch_size``/
  ``global_batch_size``/``shuffle``/``seed`` and ``trainer.accumulate_grad_batches``/
  ``gradient_clip_val``/``gradient_clip_algorithm``/``precision``/``limit_train_batches``.

The models by content: a folder named by ``model.model_path`` or
``self_training.prm.init_args.model_path`` is recorded by its path and, under
``<key> (weights)``, by a digest of its weight files (``infra.digests``: cached by each file's
inode, size and times, so a 15 GB model is read once, and a copy over it that keeps the size
and the modification time, as ``cp -p`` and ``rsync -a`` make, is still seen). A run whose
weights changed under the same path is refused like any other changed setting, and the ways
out name the folder to restore.

What does not count (``IGNORED``): logging, progress bars and plots; paths of outputs;
``self_training.n_iterations`` and ``trainer.max_epochs`` (a finished run may be extended);
what to do on failures (``on_empty_round``, ``model.nonfinite_loss``); and resource knobs
that change how fast or in how much memory the same work is done (worker counts, caches, the
attention kernel ``attn_implementation`` of the policy and the PRM, ``model.packing``,
``model.logp_chunk_size``, ``HFEngine``'s ``kv_cache`` (where the keys and values live), the PRM's batch size and
``offload`` (where its weights wait between rounds), ``data.ref_batch_size``, vLLM's memory,
sleep, canary and weight-sync settings, devices and strategy), even where batching can
change floating-point rounding.
``HFEngine``'s ``batch_size`` does count: with ``seed_scope: batch`` it decides which random
stream each sample gets.

Records made by another version of this format are compared on the keys both hold. A record
read back names each class by the module it lives in today (``MOVED``), so a run folder made
before a module moved resumes as it was.

Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hs_star_pl.core.artifacts import read_json, round_folders, write_json
from hs_star_pl.core.records import Problem
from hs_star_pl.infra.digests import CACHE_NAME, DigestCache, folder_digest, weight_files

SETTINGS_FILE = "settings.json"
VERSION = 2  # 2: the models' weights by content (`` (weights)`` keys)
WEIGHT_KEYS = ("model.model_path", "self_training.prm.init_args.model_path")
"""Config keys naming a model folder, whose weights are recorded by content too."""
WEIGHTS = " (weights)"
DIGEST_CACHE = CACHE_NAME
"""The run folder's cache of weight-file digests (``infra.digests``): the next start reads nothing."""

COUNTED = (
    "self_training.",
    "model.",
    "seed_everything",
    "data.template",
    "data.system_prompt",
    "data.max_length",
    "data.batch_size",
    "data.global_batch_size",
    "data.shuffle",
    "data.seed",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
    "trainer.gradient_clip_algorithm",
    "trainer.precision",
    "trainer.limit_train_batches",
)
_RESOURCE_ARGS = (
    "progress", "n_workers", "cache_size", "device", "gpu_memory_utilization", "tensor_parallel_size",
    "enable_sleep_mode", "sleep_level", "cpu_kv_cache_space_gib", "enforce_eager", "canary_samples",
    "canary_max_tokens", "canary_tolerance", "sync_mode", "sync_chunk_mb", "distributed_executor_backend",
    "sync_from", "attn_implementation", "kv_cache", "offload",
)
IGNORED = re.compile(
    r"^(?:self_training\.(?:plots|n_iterations|on_empty_round|problem_fields\..*)"
    r"|self_training\.(?:engine|prm|verifier)\.init_args\.(?:" + "|".join(_RESOURCE_ARGS) + r")"
    r"|self_training\.prm\.init_args\.batch_size"
    r"|model\.(?:nonfinite_loss|gradient_checkpointing|attn_implementation|packing|logp_chunk_size))$"
)
POOL_KEY = "self_training.problems_file"
MOVED = {
    "hs_star_pl.budget.": "hs_star_pl.core.budget.",
    **{f"hs_star_pl.{old}.": f"hs_star_pl.{new}." for old, new in (
        ("schedules", "tensors.schedules"), ("losses", "tensors.losses"), ("lora", "tensors.lora"),
        ("module", "training.module"), ("data", "training.data"), ("callback", "training.self_training"),
        ("strategies", "training.strategies"), ("progress", "training.progress"),
        ("stop_callback", "training.stop_request"), ("evaluation.callback", "training.evaluation"),
    )},
}
"""Module prefixes a recorded ``class_path`` may still carry -> where those classes live now."""


def counts(key: str) -> bool:
    """Whether the dotted config ``key`` can change a round (see the module docstring).

    >>> counts("self_training.budget.init_args.samples_per_problem"), counts("self_training.plots")
    (True, False)
    >>> counts("trainer.enable_progress_bar"), counts("self_training.engine.init_args.progress")
    (False, False)
    """
    if key == POOL_KEY or IGNORED.match(key):
        return False
    return any(key == c or (c.endswith(".") and key.startswith(c)) for c in COUNTED)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; lists, ``None`` and scalars are values (JSON-normal)."""
    out: dict[str, Any] = {}
    for name, value in config.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, key))
        else:
            out[key] = json.loads(json.dumps(value, default=str))
    return out


def pool_digest(problems: Iterable[Problem]) -> str:
    """A digest of a problem pool's content (ids, questions, golds), independent of its path."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.question, p.answer], ensure_ascii=False).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return f"sha256:{h.hexdigest()[:16]}"


@dataclass(frozen=True)
class SettingsRecord:
    """The counted settings of a run (flat, dotted keys), with notes shown beside them (not compared).

    ``fingerprint`` is a short digest of ``settings``: equal settings, equal fingerprints.
    """

    settings: dict[str, Any]
    notes: dict[str, str] = field(default_factory=dict)
    version: int = VERSION

    @property
    def fingerprint(self) -> str:
        text = json.dumps(self.settings, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "fingerprint": self.fingerprint, "settings": dict(self.settings),
                "notes": dict(self.notes)}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> SettingsRecord:
        """The record of ``to_dict``'s output; a ``class_path`` of a moved module is read as today's."""
        settings = {k: _moved(v) if k.endswith("class_path") else v for k, v in value.get("settings", {}).items()}
        return cls(settings, dict(value.get("notes", {})), int(value.get("version", 0)))


def _moved(class_path: Any) -> Any:
    """``class_path`` with a module prefix of ``MOVED`` replaced by today's.

    >>> _moved("hs_star_pl.budget.UniformBudget"), _moved("hs_star_pl.prm.OutcomePRM")
    ('hs_star_pl.core.budget.UniformBudget', 'hs_star_pl.prm.OutcomePRM')
    """
    for old, new in MOVED.items():
        if isinstance(class_path, str) and class_path.startswith(old):
            return new + class_path[len(old):]
    return class_path


def settings_of(config: Mapping[str, Any], problems: Sequence[Problem], problems_file: str | None,
                digest_cache: DigestCache | None = None) -> SettingsRecord:
    """The record of a parsed config (nested, as ``--print_config`` shows it) and its loaded pool.

    A model folder named by a ``WEIGHT_KEYS`` key is recorded by content as well (``<key> (weights)``),
    its digests cached in ``digest_cache`` (saving it is the caller's); a path that is no folder
    (``model.tiny``, a model not there yet) is recorded by path only.

    >>> from hs_star_pl.core.records import Problem
    >>> r = settings_of({"self_training": {"seed": 5, "plots": True}, "trainer": {"max_epochs": 2}},
    ...                 [Problem("p1", "1+1?", "2")], "pool.jsonl")
    >>> sorted(r.settings), r.settings["self_training.seed"]
    (['self_training.problems_file', 'self_training.seed'], 5)
    >>> r.notes
    {'self_training.problems_file': 'pool.jsonl, 1 problems'}
    """
    settings = {k: v for k, v in flatten(config).items() if counts(k)}
    problems = list(problems)
    settings[POOL_KEY] = pool_digest(problems)
    notes = {POOL_KEY: f"{problems_file}, {len(problems)} problems"}
    cache = digest_cache if digest_cache is not None else DigestCache()
    for key in WEIGHT_KEYS:
        path = settings.get(key)
        if isinstance(path, str) and Path(path).is_dir():
            digest = folder_digest(path, cache)
            if digest is not None:
                settings[key + WEIGHTS] = digest
                n = len(weight_files(path))
                notes[key + WEIGHTS] = f"{n} weight file{'s' if n != 1 else ''} in {path}"
    return SettingsRecord(settings, notes)


_MISSING = object()


def differences(recorded: SettingsRecord, current: SettingsRecord) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded value, current value)}`` for every counted key that differs.

    A key one side lacks differs too (shown as "not set"), unless the records are of different
    format versions: then only the keys both hold are compared.
    """
    if recorded.version != current.version:
        keys = recorded.settings.keys() & current.settings.keys()
    else:
        keys = recorded.settings.keys() | current.settings.keys()
    out = {}
    for key in sorted(keys):
        old, new = recorded.settings.get(key, _MISSING), current.settings.get(key, _MISSING)
        if old != new:
            out[key] = (old, new)
    return out


def _shown(value: Any, note: str | None) -> str:
    if value is _MISSING:
        return "not set"
    text = json.dumps(value, ensure_ascii=False)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{text} ({note})" if note else text


def _label(sources: list[Any]) -> str:
    rounds = [s for s in sources if isinstance(s, int)]
    others = [s for s in sources if not isinstance(s, int)]
    parts = []
    if rounds:
        parts.append(("round " if len(rounds) == 1 else "rounds ") + ", ".join(map(str, rounds)))
    return ", ".join(parts + others)


def mismatch_message(subject: str, records: Sequence[tuple[Any, SettingsRecord]], current: SettingsRecord,
                     run_dir: str | Path) -> str | None:
    """The refusal naming each differing key, or ``None`` when every record matches ``current``.

    Args:
        subject: what holds the records, starting the sentence (``"/runs/a holds rounds"``).
        records: ``(source, record)``: a round index or a label (``"the checkpoint"``).
        current: this run's settings.
        run_dir: the run folder, named in the ways out.
    """
    by_key: dict[str, dict[str, list[Any]]] = {}  # key -> the recorded value as shown -> its sources
    for source, record in records:
        for key, (old, _new) in differences(record, current).items():
            by_key.setdefault(key, {}).setdefault(_shown(old, record.notes.get(key)), []).append(source)
    if not by_key:
        return None
    lines = []
    for key in sorted(by_key):
        was = "; ".join(f"{shown} in {_label(sources)}" for shown, sources in by_key[key].items())
        lines.append(f"  - {key}: {was}; {_shown(current.settings.get(key, _MISSING), current.notes.get(key))} now")
    folders = [str(current.settings.get(key.removesuffix(WEIGHTS))) for key in sorted(by_key) if key.endswith(WEIGHTS)]
    restore = (f"the settings above (and the weight files the run was made with in {', '.join(folders)})"
               if folders else "the settings above")
    return (
        f"{subject} made with other settings, and this run would mix them with its own. The settings that differ:\n"
        + "\n".join(lines)
        + f"\nEither give this configuration a run folder of its own (a new trainer.default_root_dir), or restore "
        f"{restore} to continue the run in {run_dir}."
    )


def write_record(directory: str | Path, record: SettingsRecord) -> None:
    """Write ``<directory>/settings.json`` (atomically)."""
    write_json(Path(directory) / SETTINGS_FILE, record.to_dict())


def read_record(directory: str | Path) -> SettingsRecord | None:
    """The record in ``<directory>/settings.json``, or ``None`` when there is none (an older run)."""
    path = Path(directory) / SETTINGS_FILE
    return SettingsRecord.from_dict(read_json(path)) if path.is_file() else None


def recorded_rounds(run_dir: str | Path) -> list[tuple[int, SettingsRecord]]:
    """``(iteration, record)`` of every round folder under ``<run_dir>/rounds`` that holds one, ascending."""
    records = ((iteration, read_record(folder)) for iteration, folder in round_folders(run_dir))
    return [(iteration, record) for iteration, record in records if record is not None]
