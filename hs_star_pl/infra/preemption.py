"""Stopping a run when the machine is taken away: SIGTERM, SLURM's requeue signal, a dead parent.

Schedulers ask a process to stop before they kill it: SLURM, Kubernetes and ``docker stop``
send SIGTERM to the whole process group (the trainer, its verifier workers, a vLLM engine
process, a step-wise initialisation child), then SIGKILL after a grace period (30 s by
default for SLURM and Kubernetes, 10 s for Docker). What this module guarantees:

* **A stop request is recorded, never ignored.** :func:`install` (called by ``hs-star``
  before anything else) turns SIGTERM into a request; ``SelfTrainingCallback``,
  ``StopRequestCallback`` and the CLI act on it at the next safe point, and the process exits
  with :func:`exit_status` (``128 + signal``: 143 for SIGTERM, what a shell reports for a
  process that signal ended).
* **Where it stops.** Work that is dropped anyway when a run is killed (sampling, answer
  checks, PRM scoring, reference log-probs: everything inside :func:`interruptible`; and
  start-up, from :func:`begin_startup` to :func:`end_startup`) is cut short at once by raising
  :class:`Preempted` from the signal handler; every unit already finished is on disk (phase
  files are written atomically), so a resume with ``--ckpt_path last`` reuses it, exactly as
  after a SIGKILL at that moment. Elsewhere the request waits for a safe point: Lightning
  stops training after the current batch (its own SIGTERM flag, which :func:`attach` also
  sets for the other stop signals); at an epoch's end the export and the checkpoint finish
  before the stop, and the held-out evaluation stops within its chunk in progress
  (``hs_star_pl.training.evaluation``: graded chunks are kept and reused on resume).
* **A check cut short is not a verdict.** Verifier workers killed by a signal meant for the
  run are recognised by ``hs_star_pl.infra.workers.KillablePool`` and their checks redone, never
  graded (see there).
* **SIGUSR1 is a stop request everywhere** (exit status 138): its default action ends a
  process with no message and nothing saved, which is never what whoever sent it wanted.
* **SLURM requeue, Lightning's convention.** Under ``SLURMEnvironment(auto_requeue=True)``
  (Lightning's default when it detects SLURM) the environment's ``requeue_signal`` (SIGUSR1
  unless set) is a stop request too, and once the run has stopped at its safe point rank 0
  runs ``scontrol requeue <job id>``. Lightning's own handler for that signal (which saves a
  mid-epoch "hpc" checkpoint from inside the handler) is not installed: an earlier handler
  keeps it off, by Lightning's own rule.
* **A child dies with its parent.** :func:`run_child` starts a child ``hs-star`` (the
  step-wise initialisation of M_0), forwards a stop to it and waits for it to stop; the
  child asks the kernel for SIGTERM when its parent dies (:func:`stop_with_parent`), so a
  SIGKILLed parent leaves no orphan training on.

What is not covered: SIGKILL (nothing can be done; the kill/resume guarantee covers it),
and a signal that reaches only some ranks of a multi-process run (SLURM, torchrun and
Kubernetes signal every rank). Stdlib only; the signal handler runs in the main thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

STOP_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that are a stop request in every ``hs-star`` process. SIGUSR1 is SLURM's usual
warning before the time limit (``--signal=SIGUSR1@300``) and Lightning's requeue signal;
outside SLURM (or without ``auto_requeue``) its default action would end the run on the
spot with no message, so it is a stop request there too, without the requeue."""

PARENT_ENV = "HS_STAR_PARENT_PID"
"""Set by :func:`run_child`: the child stops when the process with this id is gone."""


class Preempted(BaseException):
    """The run was asked to stop by a signal; everything finished is on disk.

    A ``BaseException`` (as ``KeyboardInterrupt``): code that handles ``Exception`` to turn a
    failure into a result (a verifier's "ungradeable", a skipped batch) must not catch it.
    """

    def __init__(self, signum: int, where: str = "") -> None:
        self.signum = signum
        self.where = where
        super().__init__(f"stopped by {signal_name(signum)}" + (f" {where}" if where else ""))

    @property
    def exit_code(self) -> int:
        return exit_status(self.signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_status(signum: int) -> int:
    """The exit status of a run stopped by ``signum``: 128 + its number (143 for SIGTERM)."""
    return 128 + int(signum)


# ---------------------------------------------------------------------------------------
# The request: recorded by the handler, read by the safe points
# ---------------------------------------------------------------------------------------


@dataclass
class _State:
    signum: int | None = None  # the first stop signal received
    requeue: bool = False  # it was the SLURM requeue signal under auto_requeue
    raised: bool = False  # Preempted was raised already
    where: list[str] = field(default_factory=list)  # labels of the interruptible() blocks the main thread is in
    starting: bool = False  # between the command's start and its training (or testing) loop
    installed: set[int] = field(default_factory=set)  # signals whose handler is ours
    requeue_signals: set[int] = field(default_factory=set)
    previous: dict[int, Any] = field(default_factory=dict)  # the handlers ours replaced
    trainer: Any = None  # weakref to the attached Trainer


_state = _State()


def requested() -> int | None:
    """The signal of a pending stop request, or ``None``."""
    return _state.signum


def requeue_requested() -> bool:
    """Whether the stop came from SLURM's requeue signal (the job should go back in the queue)."""
    return _state.requeue


def installed() -> bool:
    """Whether :func:`install` took this process's stop signals."""
    return bool(_state.installed)


def reset() -> None:
    """Forget a stop request (tests, and a process that handles the stop and carries on)."""
    _state.signum, _state.requeue, _state.raised = None, False, False


def check(where: str = "") -> None:
    """Raise :class:`Preempted` if a stop was requested: call it at a safe point."""
    if _state.signum is not None:
        _state.raised = True
        raise Preempted(_state.signum, where)


@contextlib.contextmanager
def interruptible(where: str = "") -> Iterator[None]:
    """Work inside may be dropped at any moment by a stop request (it is redone on resume).

    On entry a pending request raises at once; while inside, the signal handler raises
    :class:`Preempted` where the main thread is. Only wrap work whose partial state is never
    persisted, or persisted atomically (a phase file is written whole or not at all).
    """
    check(where)
    _state.where.append(where)
    try:
        yield
    finally:
        _state.where.pop()


def begin_startup() -> None:
    """From here until :func:`end_startup` a stop request raises at once: start-up (parsing, model
    loading, checkpoint restore, M_0's bootstrap) writes nothing a resume needs."""
    _state.starting = True


def end_startup() -> None:
    """The training (or testing) loop begins: stop requests wait for its safe points from now on."""
    _state.starting = False


def _handle(signum: int, frame: Any) -> None:
    first = _state.signum is None
    if first:
        _state.signum = signum
        _state.requeue = signum in _state.requeue_signals
        # os.write, not print: the main thread may be inside a write to the same stream
        with contextlib.suppress(OSError):
            os.write(2, f"hs-star: received {signal_name(signum)}; stopping at the next safe point "
                        "(everything finished is kept)\n".encode())
    _notify_trainer()
    previous = _state.previous.get(signum)
    if callable(previous):
        previous(signum, frame)
    if (_state.where or _state.starting) and not _state.raised:
        _state.raised = True
        raise Preempted(_state.signum or signum, _state.where[-1] if _state.where else "while starting")


def install(signals: Sequence[int] = STOP_SIGNALS) -> None:
    """Make ``signals`` stop requests in this process (main thread only; idempotent).

    A Python handler already in place is still called after ours; Lightning, which installs
    its own SIGTERM handler when ``fit`` starts, calls ours too (it keeps existing handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in signals:
        current = signal.getsignal(signum)
        if current is _handle:
            continue
        _state.previous[signum] = current
        signal.signal(signum, _handle)
        _state.installed.add(signum)


def uninstall() -> None:
    """Give back the handlers :func:`install` replaced (the end of an in-process ``main``)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in list(_state.installed):
        if signal.getsignal(signum) is _handle:
            previous = _state.previous.get(signum)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    _state.installed.clear()
    _state.starting = False
    _state.requeue_signals.clear()
    _state.previous.clear()
    _state.trainer = None


# ---------------------------------------------------------------------------------------
# Lightning: its SIGTERM flag and SLURM's requeue signal
# ---------------------------------------------------------------------------------------


def attach(trainer: Any) -> None:
    """Tie stop requests to ``trainer``; under SLURM with ``auto_requeue`` also take its requeue signal.

    Only in a process whose signals :func:`install` took (the ``hs-star`` command); a Trainer
    built from Python keeps Lightning's handling.

    Lightning stops training after the current batch when ``trainer.received_sigterm`` is
    set (and, on the last batch, after the epoch's checkpoint). Its own SIGTERM handler sets
    it while ``fit`` runs; for the requeue signal, and for a request that came before ``fit``
    installed that handler, :func:`_notify_trainer` sets the same flag.
    """
    _state.trainer = weakref.ref(trainer)
    if not _state.installed:  # this process's signals are not ours (a Trainer built from Python)
        return
    environment = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and environment.requeue_signal:
        signum = int(environment.requeue_signal)
        _state.requeue_signals.add(signum)
        install((signum,))
    if _state.signum is not None:
        _notify_trainer()


def _notify_trainer() -> None:
    trainer = _state.trainer() if _state.trainer is not None else None
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and hasattr(connector, "received_sigterm"):
        # Lightning's loops read this flag (Trainer.received_sigterm) between batches.
        connector.received_sigterm = True


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (rank 0 only); returns whether it was requeued."""
    if os.environ.get("SLURM_PROCID", "0") != "0":
        return False
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        print(f"hs-star: cannot requeue: no usable SLURM job id ({job!r})", file=sys.stderr, flush=True)
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"hs-star: scontrol requeue {job} failed: {err}", file=sys.stderr, flush=True)
        return False
    if done.returncode != 0:
        print(f"hs-star: scontrol requeue {job} failed (exit {done.returncode}): {done.stderr.strip()}",
              file=sys.stderr, flush=True)
        return False
    print(f"hs-star: requeued SLURM job {job}; it resumes with --ckpt_path last", file=sys.stderr, flush=True)
    return True


# ---------------------------------------------------------------------------------------
# Child processes: forward stops, die with the parent
# ---------------------------------------------------------------------------------------

CHILD_STOP_TIMEOUT_S = 600.0
"""How long :func:`run_child` waits for a child asked to stop before killing it."""


def run_child(args: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Run a child ``hs-star`` to its end and return its exit status; a stop reaches it too.

    A stop request (or any error) while waiting is forwarded to the child as SIGTERM, the
    child is given ``CHILD_STOP_TIMEOUT_S`` to stop at its own safe point, then the request
    is raised here. The child gets :data:`PARENT_ENV`, so it stops if this process dies.
    """
    child_env = {**(env if env is not None else os.environ), PARENT_ENV: str(os.getpid())}
    proc = subprocess.Popen(list(args), env=child_env)
    try:
        with interruptible("while the child process ran"):
            return proc.wait()
    except BaseException:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=CHILD_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


_PR_SET_PDEATHSIG = 1


def stop_with_parent() -> None:
    """If started by :func:`run_child`, get SIGTERM (a stop request) when the parent dies.

    Linux: the kernel's parent-death signal. Elsewhere a daemon thread watches the parent id.
    """
    value = os.environ.pop(PARENT_ENV, None)
    if not value or not value.isdigit():
        return
    parent = int(value)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0:
                if os.getppid() != parent:  # the parent died before prctl took effect
                    os.kill(os.getpid(), signal.SIGTERM)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="hs-star-parent-watch", daemon=True).start()
