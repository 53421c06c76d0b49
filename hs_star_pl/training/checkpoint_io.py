"""Checkpoint files that are never half-written: ``AtomicCheckpointIO``.

Lightning's default ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary
file lives in the system temp folder. When that folder is on another filesystem than the run
(a local ``/tmp`` and a mounted volume, as on most rented GPU machines), the final move is a
copy, and a kill during the copy leaves a truncated ``last.ckpt`` that ``--ckpt_path last``
then cannot load. Here the temporary file is a sibling of the target, flushed and fsynced,
then renamed over it (atomic on POSIX), and the folder is fsynced: a kill at any moment
leaves the previous checkpoint or the new one. Temporary files a kill left behind are
removed by the next save. Remote paths (``s3://`` ...) keep Lightning's own transaction.

A save on a full disk raises ``StorageError`` naming the checkpoint (``storage``); loading a
damaged one (cut short, overwritten) raises ``InputFileError`` naming it, not torch's
"failed finding central directory".

``HSStarCLI`` installs it on every strategy that uses the plain ``TorchCheckpointIO``
(single device, DDP); DeepSpeed writes its own checkpoint folders.

``finished_run_refusal``: a ``fit`` without ``--ckpt_path`` into a folder whose checkpoint
folder already holds ``last.ckpt`` would train again from the start over that run, and
Lightning would write ``last-v1.ckpt`` beside the old ``last.ckpt``; it is refused, naming
``--ckpt_path last`` (continue that run) and a new ``trainer.default_root_dir`` (another run).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from hs_star_pl.infra import faults
from hs_star_pl.core.artifacts import fsync_dir
from hs_star_pl.infra.errors import InputFileError
from hs_star_pl.infra.storage import storage_error


def finished_run_refusal(trainer: Any, ckpt_path: Any) -> str | None:
    """Why ``trainer.fit(ckpt_path=ckpt_path)`` must not run into this folder, or ``None``.

    Refused when no checkpoint is resumed (``ckpt_path`` unset: Lightning sets
    ``trainer.ckpt_path`` only after the setup hooks) and one of the trainer's checkpoint
    folders already holds ``last.ckpt``, a run made there before.
    """
    if ckpt_path is not None:
        return None
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        dirpath = getattr(callback, "dirpath", None)
        if not isinstance(dirpath, (str, os.PathLike)) or "://" in str(dirpath):
            continue
        last = Path(dirpath) / "last.ckpt"
        if last.is_file():
            return (
                f"trainer.default_root_dir={trainer.default_root_dir} already holds a run ({last}): fit without "
                "--ckpt_path would train it again from the start and write its checkpoints beside the old ones "
                "(last-v1.ckpt). To continue that run (resume it, or extend it with more epochs or iterations), add "
                "--ckpt_path last; to start another, give it a new trainer.default_root_dir."
            )
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose ``save_checkpoint`` is atomic on local filesystems."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        faults.begin("checkpointing", epoch=checkpoint.get("epoch"), name=path.name)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            # A Python file object, not the path: torch's writer then fails through Python's
            # write, so a full disk is an OSError in the error's context (storage_error).
            with os.fdopen(fd, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            with faults.persisting("checkpoint", epoch=checkpoint.get("epoch"), name=path.name):
                os.replace(tmp, path)
        except BaseException as err:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if (failed := storage_error(err, path)) is not None:
                raise failed from err
            raise
        fsync_dir(path.parent)

    def load_checkpoint(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Lightning's load, with a damaged file (cut short, overwritten) reported as one message naming it."""
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            if "://" in str(path):
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputFileError(
                f"{path}: cannot be read as a checkpoint, it is damaged or cut short ({reason[:200]}). Resume from "
                f"another checkpoint (--ckpt_path <file>), or move it away and run without --ckpt_path to start over"
            ) from err
