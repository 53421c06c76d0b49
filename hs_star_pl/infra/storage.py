"""Failed writes told as one sentence: a full disk, a read-only or forbidden folder.

A run writes through several libraries, and each reports a full disk its own way: Python's
``OSError: [Errno 28] No space left on device``, torch's ``[enforce fail at
inline_container.cc] unexpected pos`` (the ``OSError`` only in its ``__context__``),
safetensors' ``SafetensorError: ... No space left on device (os error 28)``.
``storage_error`` recognises all of them (walking the exception's cause and context chain,
and reading the message of errors that carry no errno) and builds one ``StorageError``
naming where the write failed and what to do. The writers of hs-star (round artifacts,
checkpoints, HF exports) call it with the path they were writing; ``HSStarCLI`` calls it for
whatever else failed (Lightning's logs and saved config), naming the run folder.

Every file hs-star finishes is written to a temporary name and renamed (``artifacts``,
``checkpoint_io``, ``export``), so a write that fails leaves the previous version intact and
``--ckpt_path last`` resumes once space is freed.

``check_writable`` refuses, before anything is written, a folder that cannot be written at
all (a read-only mount, no permission), naming the config key.

Stdlib only.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from hs_star_pl.infra.errors import ConfigError, StorageError

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
# Errors that carry no errno (safetensors' Rust writer) still say it in their message.
_MESSAGES = {
    "no space left on device": errno.ENOSPC,
    "(os error 28)": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "(os error 122)": errno.EDQUOT,
    "read-only file system": errno.EROFS,
    "(os error 30)": errno.EROFS,
}


def _chain(err: BaseException):
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def write_errno(err: BaseException) -> tuple[int, str | None] | None:
    """``(errno, filename)`` of the full-disk or not-writable failure behind ``err``, or ``None``."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in DISK_FULL | NOT_WRITABLE:
            return e.errno, e.filename if isinstance(e.filename, str) else None
    for e in _chain(err):
        text = str(e).lower()
        for marker, code in _MESSAGES.items():
            if marker in text:
                return code, None
    return None


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free(path: Path) -> str:
    try:
        free = float(shutil.disk_usage(_existing(path)).free)
    except OSError:
        return ""
    unit = "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if free < 1024:
            break
        free, unit = free / 1024, bigger
    return f"; {free:.0f} {unit} free there now" if unit == "bytes" else f"; {free:.1f} {unit} free there now"


def _error(code: int, message: str) -> StorageError:
    error = StorageError(message)  # one argument: str() is the message alone
    error.errno = code
    return error


def storage_error(err: BaseException, path: str | os.PathLike | None = None,
                  run_dir: str | os.PathLike | None = None, *, writing: bool = True) -> StorageError | None:
    """One ``StorageError`` for a write that failed on a full disk or an unwritable folder, or ``None``.

    Args:
        err: the exception the write raised (any library's).
        path: the file or folder being written, when the caller knows it.
        run_dir: the run folder, named when neither ``path`` nor the error names a file.
        writing: the failure is known to be a write (a writer's own call). When false (a
            failure of unknown origin), "permission denied" is left alone: it may be a read.
    """
    found = write_errno(err)
    if found is None:
        return None
    code, filename = found
    if code in (errno.EACCES, errno.EPERM) and not writing:
        return None
    target = path if path is not None else filename
    if target is not None:
        where, place = str(target), Path(target)
    elif run_dir is not None:  # not one of hs-star's own writers, which name their file
        where, place = f"a file under {run_dir} (Lightning's logs or saved config)", Path(run_dir)
    else:
        where, place = "the run's files", Path(".")
    if code in DISK_FULL:
        reason = "No space left on device" if code == errno.ENOSPC else "Disk quota exceeded"
        return _error(
            code,
            f"the disk is full ({reason}) writing {where}{_free(place)}. Files hs-star finished (round folders, "
            f"checkpoints, HF exports) are written whole or not at all, so nothing finished was damaged: free some "
            f"space, then run the same command with --ckpt_path last to resume",
        )
    reason = "read-only file system" if code == errno.EROFS else "permission denied"
    return _error(
        code,
        f"cannot write {where}: {reason}. Point trainer.default_root_dir (and "
        f"trainer.logger.init_args.save_dir, if set) at a folder this user can write",
    )


def check_writable(path: str | os.PathLike, key: str) -> None:
    """Refuse a folder that cannot be written (nothing is written to find out).

    The folder need not exist: its nearest existing parent must then be writable.

    Raises:
        ConfigError: naming ``key``, the folder, and why (read-only file system or permission).
    """
    existing = _existing(Path(path))
    try:  # asked first: under some sandboxes (gVisor) access() grants root writes a read-only mount refuses
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    if not read_only and os.access(existing, os.W_OK | os.X_OK):
        return
    reason = "is on a read-only file system" if read_only else "is not writable by this user (permission denied)"
    shown = f"{path}" if existing == Path(path).absolute() else f"{path} (its parent {existing})"
    raise ConfigError(f"{key}={shown} {reason}: the run writes its rounds, checkpoints and logs there; "
                      f"choose a writable folder")
