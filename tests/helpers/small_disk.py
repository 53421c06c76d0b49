"""Run commands with a small (or read-only) tmpfs mounted over a folder, without root.

``unshare -Urm`` gives the shell its own user and mount namespaces (mapped to root inside),
where a tmpfs can be mounted; the mount lives as long as the shell, so one shell script runs
every step that needs it (fill the disk, fail, free, resume) and copies the result out.
Where user namespaces are unavailable (some containers and CI runners), ``available()`` is
false and the tests that need it skip. Writes to a full tmpfs fail with the kernel's real
``ENOSPC``, through Python, torch and safetensors alike.
"""

from __future__ import annotations

import functools
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.helpers.self_training import env


@functools.cache
def available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = Path("/tmp")
    out = subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe} && touch {probe}/x"],
                         capture_output=True)
    return out.returncode == 0


def hs_star(args: Sequence[str], *, module: str = "hs_star_pl", log: Path) -> str:
    """A shell command running ``python -m <module> <args>`` with output to ``log``; appends ``rc=<status>`` to it."""
    return f"{shlex.join([sys.executable, '-m', module, *map(str, args)])} > {shlex.quote(str(log))} 2>&1; " \
           f"echo rc=$? >> {shlex.quote(str(log))}"


def in_namespace(script: str, cwd: Path, timeout: float = 900, **extra_env: str) -> subprocess.CompletedProcess:
    """Run a shell ``script`` in its own user and mount namespaces (see the module docstring)."""
    return subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=cwd, env=env(**extra_env), capture_output=True,
                          text=True, timeout=timeout)


def mount_tmpfs(folder: Path, size: str = "64m", read_only: bool = False) -> str:
    options = f"size={size}" + (",ro" if read_only else "")
    return f"mkdir -p {shlex.quote(str(folder))} && mount -t tmpfs -o {options} tmpfs {shlex.quote(str(folder))}"


def bind_read_only(folder: Path) -> str:
    q = shlex.quote(str(folder))
    return f"mount --bind {q} {q} && mount -o remount,bind,ro {q}"


def status(log: Path) -> int:
    """The exit status ``hs_star`` appended to ``log``."""
    return int(log.read_text(errors="replace").rsplit("rc=", 1)[1])
