"""Round folders on disk: atomic writes, a phase store, and the ``DONE`` marker.

Layout of one iteration (``<run dir>/rounds/round_NNN/``)::

    problems.jsonl            the iteration's problems (after dropping ungradeable golds)
    presample_generated.jsonl phase store: pre-samples as generated (text, finish, tokens)
    presample_scored.jsonl    phase store: ... with verdict and step scores
    resample_generated.jsonl  phase store: re-samples as generated
    resample_scored.jsonl     phase store: ... scored
    resample_wNNN_*.jsonl     phase store: the same, one pair per wave (SequentialBudget)
    oracle_*.jsonl            phase store: samples that only classify (difficulty.oracle_samples)
    reference_logps.jsonl     phase store: the pairs with their reference log-probs under M_t
    rollouts.jsonl            every scored rollout of the round
    difficulty.jsonl          per problem: phi_a, phi_r, class, sample counts
    ledger.json               the budget ledger (per-problem counts, totals per phase/class)
    pairs.jsonl | sft.jsonl   the training examples
    summary.json              the round's numbers (``RoundResult.summary()``)
    DONE                      written last: the round is complete
    settings.json             written first by the callback: the settings that decide the
                              round (``fingerprint``)

Every file is written to a temporary name in the same folder, flushed and fsynced, then
renamed over the final name, so a reader never sees half a file and a crash leaves either
the old state or the new. A folder without ``DONE`` is an unfinished round: its phase files
are reused on resume, everything else is rewritten (and the temporary files a SIGKILL left
behind are removed, ``remove_stale_temporaries``). A write on a full disk or into an
unwritable folder raises ``StorageError`` naming the file (``storage``); a file damaged
outside hs-star (missing from a complete round, cut short) raises ``InputFileError`` naming
it when read back.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hs_star_pl.infra import faults
from hs_star_pl.core.budget import BudgetLedger
from hs_star_pl.core.records import PreferencePair, Problem, ProblemDifficulty, ScoredRollout, SftExample
from hs_star_pl.core.rounds import RoundResult
from hs_star_pl.infra.errors import InputFileError
from hs_star_pl.infra.jsonl import LineError, parse_json_line
from hs_star_pl.infra.storage import storage_error

DONE = "DONE"
_ROUND_NAME = re.compile(r"^round_(\d{3,})$")


def round_dir(run_dir: str | Path, iteration: int) -> Path:
    """``<run_dir>/rounds/round_NNN`` (zero-padded to three digits)."""
    return Path(run_dir) / "rounds" / f"round_{iteration:03d}"


def fsync_dir(directory: Path) -> None:
    """fsync a folder, so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one.

    Raises:
        StorageError: the disk is full or the folder is not writable (naming ``path``).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if (failed := storage_error(err, path)) is not None:  # a full disk, a read-only folder
            raise failed from err
        raise
    fsync_dir(path.parent)


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Atomically write one JSON object per line."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json(path: str | Path, value: Any) -> None:
    """Atomically write pretty-printed JSON."""
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


_REDO = ("the file was changed outside hs-star: restore it, or delete it (and the round folder's DONE marker, "
         "if there is one) to redo that part of the round")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file this module wrote; a bad line raises naming ``file:line``."""
    rows = []
    with Path(path).open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                row = parse_json_line(raw, lineno)
            except LineError as err:
                raise InputFileError(f"{path}:{lineno}: {err} in a round artifact; {_REDO}") from None
            if row is not None:
                rows.append(row)
    return rows


def read_json(path: str | Path) -> Any:
    """Read a JSON file this module wrote; a damaged one raises naming the file."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise InputFileError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start}) in a round artifact; "
                             f"{_REDO}") from None
    except ValueError as err:
        raise InputFileError(f"{path}: invalid JSON in a round artifact ({err}); {_REDO}") from None


class RoundStore:
    """A ``rounds.PhaseStore`` backed by a round folder (one ``<phase>.jsonl`` per phase)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def load(self, name: str) -> list[dict[str, Any]] | None:
        path = self.directory / f"{name}.jsonl"
        return read_jsonl(path) if path.is_file() else None

    def save(self, name: str, value: list[dict[str, Any]]) -> None:
        write_jsonl(self.directory / f"{name}.jsonl", value)


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / DONE).is_file()


def write_round(directory: str | Path, result: RoundResult, extra_summary: Mapping[str, Any] | None = None) -> None:
    """Write every artifact of a finished round, then ``DONE``.

    ``extra_summary`` adds keys to ``summary.json`` (e.g. reference log-prob timing).
    """
    directory = Path(directory)
    write_jsonl(directory / "problems.jsonl", (p.to_dict() for p in result.problems))
    write_jsonl(directory / "rollouts.jsonl", (r.to_dict() for r in result.rollouts))
    write_jsonl(directory / "difficulty.jsonl", (d.to_dict() for d in result.difficulties.values()))
    write_json(directory / "ledger.json", result.ledger.to_dict())
    write_examples(directory, result.examples)
    summary = result.summary()
    summary["dropped_problem_ids"] = list(result.dropped)
    summary.update(extra_summary or {})
    with faults.persisting("round_write"):
        write_json(directory / "summary.json", summary)
        atomic_write_text(directory / DONE, "")


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left in ``directory`` (``.<name>.*.tmp``).

    ``atomic_write_text`` removes its temporary file on an exception, but a SIGKILL leaves it.
    Call this only while no other process writes into ``directory``. Returns what was removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = sorted(p for p in directory.glob(".*.tmp") if p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_examples(directory: str | Path, examples: list[PreferencePair] | list[SftExample]) -> Path:
    """Write training examples as ``pairs.jsonl`` (DPO) or ``sft.jsonl`` (SFT); returns the path."""
    is_sft = bool(examples) and isinstance(examples[0], SftExample)
    path = Path(directory) / ("sft.jsonl" if is_sft else "pairs.jsonl")
    write_jsonl(path, (e.to_dict() for e in examples))
    return path


def read_examples(directory: str | Path) -> list[PreferencePair] | list[SftExample]:
    directory = Path(directory)
    if (directory / "sft.jsonl").is_file():
        return [SftExample.from_dict(r) for r in read_jsonl(directory / "sft.jsonl")]
    return [PreferencePair.from_dict(r) for r in read_jsonl(directory / "pairs.jsonl")]


def read_round(directory: str | Path) -> RoundResult:
    """Rebuild a complete round's ``RoundResult`` from its folder (``seconds`` from the summary).

    Raises:
        InputFileError: a file of the complete round is missing or damaged (naming it).
    """
    directory = Path(directory)
    if not is_complete(directory):
        raise FileNotFoundError(f"{directory}: round is not complete (no {DONE} marker)")
    needed = ["summary.json", "ledger.json", "problems.jsonl", "rollouts.jsonl", "difficulty.jsonl"]
    if not (directory / "sft.jsonl").is_file():
        needed.append("pairs.jsonl")
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise InputFileError(
            f"{directory}: the round is marked complete ({DONE}) but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing; restore the folder, or delete its {DONE} marker "
            "to redo the round"
        )
    summary = read_json(directory / "summary.json")
    try:
        rollouts = [ScoredRollout.from_dict(r) for r in read_jsonl(directory / "rollouts.jsonl")]
        difficulties = [ProblemDifficulty.from_dict(r) for r in read_jsonl(directory / "difficulty.jsonl")]
        from hs_star_pl.core.difficulty import DifficultyThresholds

        return RoundResult(
            iteration=int(summary["iteration"]),
            problems=[Problem.from_dict(r) for r in read_jsonl(directory / "problems.jsonl")],
            dropped=list(summary.get("dropped_problem_ids", [])),
            presamples=[r for r in rollouts if r.rollout.phase.value == "presample"],
            resamples=[r for r in rollouts if r.rollout.phase.value == "resample"],
            difficulties={d.problem_id: d for d in difficulties},
            thresholds=DifficultyThresholds(summary["tau_low"], summary["tau_high"]),
            ledger=BudgetLedger.from_dict(read_json(directory / "ledger.json")),
            examples=read_examples(directory),
            seconds=dict(summary.get("seconds", {})),
            n_selected=summary.get("n_examples_selected"),
            oracle_total=int(summary.get("samples_oracle", 0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if isinstance(err, InputFileError):
            raise
        raise InputFileError(
            f"{directory}: a file of this complete round does not hold what hs-star wrote "
            f"({type(err).__name__}: {err}); restore the folder, or delete its {DONE} marker to redo the round"
        ) from None


def round_folders(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(iteration, folder)`` of every ``round_NNN`` folder under ``<run_dir>/rounds``, ascending."""
    root = Path(run_dir) / "rounds"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), child) for child in root.iterdir() if (m := _ROUND_NAME.match(child.name)) and child.is_dir()]
    return sorted(found, key=lambda item: item[0])


def completed_rounds(run_dir: str | Path) -> list[int]:
    """Iterations whose round folder under ``<run_dir>/rounds`` is complete, ascending."""
    return [iteration for iteration, folder in round_folders(run_dir) if is_complete(folder)]
