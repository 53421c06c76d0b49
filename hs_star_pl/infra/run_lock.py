"""One run per folder: ``<trainer.default_root_dir>/hs-star.lock`` names the process using it.

Two ``hs-star`` processes writing one run folder would interleave rounds, overwrite each
other's checkpoints and exports, and resume from each other's half-finished state. The first
process takes the lock and removes it when it ends, however it ends short of SIGKILL; a
second one is refused with a message naming the owner and what to do.

The lock is the kernel's: the owner holds the file with an advisory ``flock``, which the
kernel releases when the process dies, whatever kills it, before it is even reaped (a
SIGKILLed process that its parent has not waited for is a zombie, and ``kill(pid, 0)`` still
succeeds on it). Whoever gets the ``flock`` owns the folder; the file's content (PID, host,
start time, command) only serves the message. A lock file left by a process that is gone is
therefore simply taken over. Two cases remain for the recorded owner (``stale_reason``):

* the ``flock`` is held, but not by the recorded process: a helper process forked from a
  SIGKILLed run that has not exited yet holds its copy of the descriptor. On the same host a
  recorded PID that is gone, a zombie or another program (the start time recorded in the lock
  is compared on Linux) is stale, and on another host a lock written by an earlier run of this
  same SLURM job (a requeued job may restart on another node, and a dead node's lock on a
  network file system lasts until its lease ends); the file is then replaced by a new one;
* the file system has no ``flock`` (some network file systems, ``ENOLCK``): the same rules,
  with the lock created whole by a hard link, as before ``flock`` was used.

A lock written without ``flock`` (an older hs-star still running), or on another host (a
network file system may keep ``flock`` per host), is judged by the same rules even when the
``flock`` is free. Only the launching process (global rank 0) takes the lock: ranks that a
launcher starts later (``LOCAL_RANK``, ``RANK``, ``NODE_RANK``, ``SLURM_PROCID`` other than 0)
share it. Stdlib only (``fcntl``: POSIX).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
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
    """Whether ``pid`` runs: a zombie (dead, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux), or gone meanwhile: kill() said it exists
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] != "Z"


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
        self._fd: int | None = None  # the flocked lock file, while held

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
            "flock": True,
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
        if any(lock.path == self.path and lock.held for lock in _held):
            return self  # this process already holds it (a second CLI in the same Python process)
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _try_flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if locked is None:  # no flock on this file system
                os.close(fd)
                return self._acquire_by_link()
            if not _is_at(fd, self.path):  # released and removed (or replaced) meanwhile: again
                os.close(fd)
                continue
            if locked:
                previous = _read_record(fd)
                # the kernel's word holds for a flock taken on this host; a record written without
                # flock (an older hs-star) or on another host (a network file system may keep
                # flocks per host) is judged by the PID rules
                judged_by_kernel = previous.get("flock") and previous.get("host") == socket.gethostname()
                if previous and not judged_by_kernel and self.stale_reason(previous) is None:
                    os.close(fd)
                    raise RunDirInUseError(self._in_use_message(previous))
                if previous and previous.get("pid") is not None:
                    print(f"hs-star: taking over the lock {self.path} (its process {previous.get('pid')} has ended)",
                          file=sys.stderr, flush=True)
                self._hold(fd)
                return self
            owner = self._owner_while_held()
            os.close(fd)
            reason = self.stale_reason(owner) if owner else None
            if reason is None:
                raise RunDirInUseError(self._in_use_message(owner))
            print(f"hs-star: taking over the stale lock {self.path} ({reason})", file=sys.stderr, flush=True)
            if self._replace_stale():
                return self
        raise RunDirInUseError(f"could not take the lock {self.path}: other processes keep taking it")

    def _hold(self, fd: int) -> None:
        """Write this process's record into the flocked file ``fd`` and keep it open."""
        data = (json.dumps(self._record(), sort_keys=True) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd, self.held = fd, True
        _held.append(self)

    def _owner_while_held(self) -> dict[str, Any]:
        """The record of the process holding the ``flock`` (it writes it just after locking)."""
        for _ in range(20):
            owner = self.read_owner()
            if owner:
                return owner
            time.sleep(0.025)
        return {}

    def _replace_stale(self) -> bool:
        """Put a new, flocked lock file in place of one whose ``flock`` a gone owner's leftover keeps."""
        tmp = self.directory / f".{LOCK_NAME}.{self.token}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._hold(fd)
            os.replace(tmp, self.path)
        except BaseException:
            self.held = False
            if self in _held:
                _held.remove(self)
            self._fd = None
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return True

    def _acquire_by_link(self) -> RunLock:
        """The lock without ``flock``: created whole by a hard link; stale locks by the PID rules."""
        for _ in range(5):
            tmp = self.directory / f".{LOCK_NAME}.{self.token}.tmp"
            record = {**self._record(), "flock": False}
            tmp.write_text(json.dumps(record, sort_keys=True) + "\n", encoding="utf-8")
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
        fd, self._fd = self._fd, None
        try:
            if fd is None or _is_at(fd, self.path):  # still ours: remove it while holding it
                owner = self.read_owner()
                if owner is not None and owner.get("token") == self.token:
                    self.path.unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)  # releases the flock


def _try_flock(fd: int) -> bool | None:
    """``flock`` ``fd`` without waiting: taken, held by another process, or ``None`` where unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return True


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is the file at ``path`` now (not removed or replaced)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_record(fd: int) -> dict[str, Any]:
    """The record in the open lock file ``fd`` (``{}`` when empty or unreadable)."""
    try:
        size = os.fstat(fd).st_size
        value = json.loads(os.pread(fd, max(size, 1), 0).decode("utf-8")) if size else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


_held: list[RunLock] = []


def release_all() -> None:
    """Release every lock this process holds (the CLI's exit path; also run at interpreter exit)."""
    for lock in list(_held):
        lock.release()


atexit.register(release_all)
