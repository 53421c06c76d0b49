"""One run per folder: ``<trainer.default_root_dir>/hs-star.lock`` names the process using it.

Two ``hs-star`` processes writing one run folder would interleave rounds, overwrite each
other's checkpoints and exports, and resume from each other's half-finished state. The first
process takes the lock (created whole, by a hard link, so a reader never sees half a file)
and removes it when it ends, however it ends short of SIGKILL; a second one is refused with
a message naming the owner and what to do.

A lock left by a process that is gone is *stale* and taken over: on the same host when its
PID no longer runs (or now belongs to another program: the start time recorded in the lock
is compared on Linux), and on another host only when it was written by an earlier run of this
same SLURM job (a requeued job may restart on another node). A lock from a live process, or
from another host that cannot be checked, is respected.

Only the launching process (global rank 0) takes the lock: ranks that a launcher starts
later (``LOCAL_RANK``, ``RANK``, ``NODE_RANK``, ``SLURM_PROCID`` other than 0) share it.
Stdlib only.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from hs_star_pl.infra.errors import HSStarError

LOCK_NAME = "hs-star.lock"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


class RunDirInUseError(HSStarError, RuntimeError):
    """Another live ``hs-star`` process is using the run folder (exit status 2)."""

    exit_code = 2


def is_launching_process(environ: dict[str, str] | None = None) -> bool:
    """Whether this process is rank 0 as far as the launchers' variables tell (no variable: yes)."""
    environ = os.environ if environ is None else environ
    return all(environ.get(name, "0").strip() in ("0", "") for name in RANK_VARIABLES)


def _start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after it
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe(owner: dict[str, Any]) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    command = " ".join(str(a) for a in owner.get("argv", []))
    if len(command) > 200:
        command = command[:197] + "..."
    return f"PID {owner.get('pid')} on host {owner.get('host')}, started {when}: {command}"


class RunLock:
    """The lock of one run folder; :meth:`acquire` it, :meth:`release` it (also done at exit)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.held = False

    def _record(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "start_ticks": _start_ticks(os.getpid()),
            "argv": sys.argv,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
            "token": self.token,
        }

    def read_owner(self) -> dict[str, Any] | None:
        """The lock's content; ``{}`` when it cannot be read, ``None`` when there is no lock."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def stale_reason(self, owner: dict[str, Any]) -> str | None:
        """Why ``owner``'s lock is stale, or ``None`` while its process may still be running."""
        pid = owner.get("pid")
        if not isinstance(pid, int):
            return None
        if owner.get("host") == socket.gethostname():
            if not _alive(pid):
                return f"its process {pid} is gone"
            recorded, now = owner.get("start_ticks"), _start_ticks(pid)
            if recorded is not None and now is not None and recorded != now:
                return f"PID {pid} now belongs to another process"
            return None
        job = os.environ.get("SLURM_JOB_ID")
        if job and owner.get("slurm_job_id") == job and \
                owner.get("slurm_restart_count") != os.environ.get("SLURM_RESTART_COUNT", "0"):
            return f"it was left by an earlier run of this SLURM job ({job}) on {owner.get('host')}"
        return None

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one.

        Raises:
            RunDirInUseError: another live process holds it (the message says what to do).
        """
        if self.held:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            tmp = self.directory / f".{LOCK_NAME}.{self.token}.tmp"
            tmp.write_text(json.dumps(self._record(), sort_keys=True) + "\n", encoding="utf-8")
            try:
                os.link(tmp, self.path)  # fails if a lock exists; never shows a half-written one
            except FileExistsError:
                pass
            else:
                self.held = True
                _held.append(self)
                return self
            finally:
                tmp.unlink(missing_ok=True)
            owner = self.read_owner()
            if owner is None:  # released meanwhile
                continue
            if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                return self  # this process already holds it (a second CLI in the same Python process)
            reason = self.stale_reason(owner)
            if reason is None:
                raise RunDirInUseError(self._in_use_message(owner))
            print(f"hs-star: taking over the stale lock {self.path} ({reason})", file=sys.stderr, flush=True)
            with contextlib.suppress(FileNotFoundError):
                # rename, then delete: of two processes taking it over, one rename wins
                stale = self.directory / f".{LOCK_NAME}.stale.{self.token}"
                os.rename(self.path, stale)
                stale.unlink()
        raise RunDirInUseError(f"could not take the lock {self.path}: other processes keep taking it")

    def _in_use_message(self, owner: dict[str, Any]) -> str:
        who = _describe(owner) if owner else "a process whose lock file cannot be read"
        pid = owner.get("pid") if owner else None
        stop = f" stop it (kill -TERM {pid}: it stops at a safe point and resumes with --ckpt_path last)," if pid else ""
        return (
            f"trainer.default_root_dir={self.directory} is in use by another hs-star run ({who}). Two runs "
            f"writing one folder would overwrite each other's rounds and checkpoints. Wait for it to end,{stop} "
            f"or pick another folder with --trainer.default_root_dir. If that process is not running (it ran on "
            f"a machine that is gone), delete {self.path} and start again."
        )

    def release(self) -> None:
        """Remove the lock if this object still holds it."""
        if not self.held:
            return
        self.held = False
        if self in _held:
            _held.remove(self)
        owner = self.read_owner()
        if owner is not None and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)


_held: list[RunLock] = []


def release_all() -> None:
    """Release every lock this process holds (the CLI's exit path; also run at interpreter exit)."""
    for lock in list(_held):
        lock.release()


atexit.register(release_all)
