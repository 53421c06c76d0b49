"""A small process pool whose tasks can be killed: per-task deadlines, kill and respawn.

Why not ``concurrent.futures``/``multiprocessing.Pool``: neither can stop one hung task
without tearing the pool down, and the signal-based timeouts of libraries like math-verify
work only on a process's main thread. Here every worker has its own pipe, so the parent
always knows which task a worker holds; past its deadline that worker alone is killed and
replaced, and the other results of the batch are kept.

Scope: short, CPU-bound, untrusted-input tasks (answer checks). Each worker runs
``task_fn(kind, payload)`` for one task at a time; ``task_fn`` must be a module-level
function (it is pickled by reference for ``spawn``). Stdlib only.

Signals: a worker that dies of a signal meant for the run (SIGTERM or SIGINT sent to the
process group, as SLURM, Kubernetes, ``docker stop`` and Ctrl-C do) says nothing about its
task, so that task is not a result: it is handed to a fresh worker (if the parent carries
on), never reported as :data:`CRASH`. Workers die of SIGINT like of SIGTERM (instead of a
``KeyboardInterrupt`` that looks like a crash) and ignore SIGUSR1/SIGUSR2, the requeue
signals a scheduler sends to every process of a job.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import signal
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_connections
from typing import Any

from hs_star_pl.infra import faults

TIMEOUT = "timeout"
"""Result of a task killed at its deadline."""
CRASH = "crash"
"""Result of a task whose worker died (e.g. the memory limit) or raised."""

START_METHODS = ("spawn", "forkserver")

OUTSIDE_SIGNALS = frozenset(
    int(getattr(signal, name)) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)
"""Signals a worker never brings on itself: death by one is an interruption, not a crash.
(The pool's own deadline kill is SIGKILL, which the kernel's OOM killer also sends; an
answer that blows the memory limit ends in ``MemoryError`` or SIGSEGV: both crashes.)"""

MAX_INTERRUPTIONS = 3
"""A task whose worker is killed from outside this many times stops :meth:`KillablePool.run`."""


def _worker_main(conn, task_fn: Callable[[str, Any], Any], memory_limit_mb: int,
                 warm_imports: tuple[str, ...], import_hint: str) -> None:
    """Worker loop: answer ``(task_id, kind, payload)`` messages until ``None`` arrives."""
    for name, action in (("SIGINT", signal.SIG_DFL), ("SIGTERM", signal.SIG_DFL),
                         ("SIGUSR1", signal.SIG_IGN), ("SIGUSR2", signal.SIG_IGN)):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), action)
    if memory_limit_mb > 0:
        try:
            import resource

            limit = memory_limit_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):  # not on this platform; the kill still works
            pass
    try:
        for name in warm_imports:  # before "ready", so imports never count against a deadline
            importlib.import_module(name)
    except ImportError as exc:
        conn.send(("import_error", f"{import_hint} ({exc})"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        task_id, kind, payload = msg
        faults.reach("worker_task")
        try:
            result: Any = ("ok", task_fn(kind, payload))
        except Exception as exc:  # reported back as "error": the caller counts it as CRASH
            result = ("error", f"{type(exc).__name__}: {exc}"[:300])
        conn.send((task_id, result))


@dataclass
class _Worker:
    process: Any
    conn: Any
    ready: bool = False
    task: int | None = None
    deadline: float = 0.0
    started: float = 0.0  # time.monotonic() at spawn: a worker not ready by started + start_timeout_s is killed


def _kill(workers: list[_Worker]) -> None:
    """Stop every worker at once (a task in flight is abandoned)."""
    for w in workers:
        if w.process.is_alive():
            w.process.kill()
    for w in workers:
        w.process.join(timeout=5.0)
        w.conn.close()
    workers.clear()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    for w in workers:
        w.process.join(timeout=1.0)
        if w.process.is_alive():
            w.process.kill()
            w.process.join(timeout=1.0)
        w.conn.close()
    workers.clear()


class KillablePool:
    """``n_workers`` processes running ``task_fn``; a task past ``timeout_s`` is killed.

    Workers start on first use and are reused across calls. A task's clock starts when it
    is handed to a *ready* worker (after its imports), so respawn time never counts against
    a task. Workers are daemons, stopped by :meth:`close` or when the pool is collected or
    the interpreter exits.

    Args:
        task_fn: module-level function ``(kind, payload) -> result`` run in the workers.
        n_workers: worker processes.
        timeout_s: wall-clock limit of one task.
        memory_limit_mb: ``RLIMIT_AS`` of each worker; 0 for none.
        start_method: ``"spawn"`` or ``"forkserver"`` (``fork`` is unsafe next to torch threads).
        warm_imports: modules each worker imports before taking tasks.
        import_hint: message of the ``ImportError`` raised when a warm import fails.
        config_key: the config key that built this pool, named in error messages.
        start_timeout_s: a worker not ready this long after its start (its imports hang) is
            killed and counts as a start failure.

    Raises (from :meth:`run`):
        RuntimeError: when workers die or hang while starting ``MAX_START_FAILURES`` times in a
            row (typically ``memory_limit_mb`` too low for the imports), instead of respawning
            or waiting forever.
    """

    MAX_START_FAILURES = 3

    def __init__(self, task_fn: Callable[[str, Any], Any], n_workers: int, timeout_s: float,
                 memory_limit_mb: int = 0, start_method: str = "spawn",
                 warm_imports: tuple[str, ...] = (), import_hint: str = "",
                 config_key: str = "workers", start_timeout_s: float = 180.0) -> None:
        if start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
        self.task_fn = task_fn
        self.n_workers = n_workers
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.warm_imports = warm_imports
        self.import_hint = import_hint
        self.config_key = config_key
        self._start_failures = 0
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        self.n_timeouts = 0
        self.n_crashes = 0
        self.n_errors = 0
        self.n_interrupted = 0
        self.last_errors: list[str] = []

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self.task_fn, self.memory_limit_mb, self.warm_imports, self.import_hint),
            daemon=True,
            name="hs-star-worker",
        )
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn, started=time.monotonic())

    def _imports_work_here(self) -> bool:
        """Whether the workers' imports succeed in this process, which has no memory limit."""
        try:
            for name in self.warm_imports:
                importlib.import_module(name)
        except ImportError:
            return False
        return self.memory_limit_mb > 0

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(timeout=5.0)
        worker.conn.close()
        self._workers[self._workers.index(worker)] = self._spawn()

    def close(self) -> None:
        """Stop all workers; a later :meth:`run` starts fresh ones."""
        _shutdown(self._workers)

    def run(self, tasks: Sequence[tuple[str, Any]], progress: str | None = None) -> list[Any]:
        """Results in task order: ``task_fn``'s value, :data:`TIMEOUT` or :data:`CRASH`.

        ``progress``: a progress bar's label, counting finished tasks; ``None`` shows none.

        Raises:
            RuntimeError: a task's worker was killed by an outside signal ``MAX_INTERRUPTIONS``
                times, or workers keep dying while starting.

        An exception raised while waiting (a ``KeyboardInterrupt``, a stop request) kills the
        workers, so that no answer to an abandoned task can reach a later call.
        """
        results: list[Any] = [None] * len(tasks)
        if not tasks:
            return results
        from tqdm.auto import tqdm  # here, not at the top: every worker process imports this module

        try:
            with tqdm(total=len(tasks), desc=progress, unit="check", disable=progress is None) as bar:
                return self._run(tasks, results, bar)
        except BaseException:
            _kill(self._workers)
            raise

    def _start_failed(self, how: str) -> None:
        """Count a worker lost while starting (it died, or ``how`` it hung); the
        ``MAX_START_FAILURES``-th in a row closes the pool and raises one message with the causes."""
        self._start_failures += 1
        if self._start_failures < self.MAX_START_FAILURES:
            return
        self.close()
        key, limit = self.config_key, self.memory_limit_mb
        raise RuntimeError(
            f"{key} worker processes failed to start {self._start_failures} times in a row (the last {how}); "
            + (f"{key}.memory_limit_mb={limit} may be too low for their imports, " if limit > 0 else "")
            + f"their imports ({', '.join(self.warm_imports) or 'none'}) may hang, or the main script lacks an "
            "`if __name__ == \"__main__\":` guard (spawned workers import it)"
        )

    def _interrupted(self, worker: _Worker) -> bool:
        """Whether a worker that closed its pipe was killed by a signal from outside."""
        worker.process.join(timeout=5.0)
        code = worker.process.exitcode
        return code is not None and code < 0 and -code in OUTSIDE_SIGNALS

    def _run(self, tasks: Sequence[tuple[str, Any]], results: list[Any], bar: Any) -> list[Any]:
        while len(self._workers) < min(self.n_workers, len(tasks)):
            self._workers.append(self._spawn())
        pending: deque[int] = deque(range(len(tasks)))
        interruptions: dict[int, int] = {}
        n_done = 0
        while n_done < len(tasks):
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and w.task is None and pending:
                    task_id = pending.popleft()
                    kind, payload = tasks[task_id]
                    try:
                        w.conn.send((task_id, kind, payload))
                    except OSError:  # the worker died while idle (e.g. a signal to the group): it never saw the task
                        pending.appendleft(task_id)
                        self._replace(w)
                        continue
                    w.task, w.deadline = task_id, now + self.timeout_s
            deadlines = [w.deadline for w in self._workers if w.task is not None]
            deadlines += [w.started + self.start_timeout_s for w in self._workers if not w.ready]
            wait_s = max(0.0, min(deadlines, default=now + 30.0) - now)
            ready_conns = wait_connections([w.conn for w in self._workers], timeout=wait_s)
            for w in list(self._workers):
                if w.conn not in ready_conns:
                    continue
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):  # died: memory limit, a crash, or killed from outside
                    interrupted = self._interrupted(w)
                    if w.task is not None and interrupted:
                        # not a verdict on the task: hand it to a fresh worker
                        self.n_interrupted += 1
                        interruptions[w.task] = interruptions.get(w.task, 0) + 1
                        if interruptions[w.task] >= MAX_INTERRUPTIONS:
                            raise RuntimeError(
                                f"{self.config_key} worker processes were killed by a signal from outside "
                                f"(exit status {w.process.exitcode}) {interruptions[w.task]} times on the same task; "
                                "something outside hs-star keeps killing them (a signal sent to the process "
                                "group every few seconds?)"
                            )
                        pending.appendleft(w.task)
                    elif w.task is not None:
                        results[w.task], n_done = CRASH, n_done + 1
                        self.n_crashes += 1
                    if not w.ready and not interrupted:
                        self._start_failed("died")
                    self._replace(w)
                    continue
                if msg[0] == "ready":
                    w.ready = True
                    self._start_failures = 0
                elif msg[0] == "import_error":
                    self.close()
                    if self._imports_work_here():  # the worker's memory limit broke an import midway
                        raise RuntimeError(
                            f"{self.config_key} worker processes could not import their modules although "
                            f"this process can ({msg[1]}); {self.config_key}.memory_limit_mb="
                            f"{self.memory_limit_mb} is likely too low for their imports"
                        )
                    raise ImportError(msg[1])
                else:
                    task_id, (status, value) = msg
                    if status == "error":
                        self.n_errors += 1
                        self.last_errors = (self.last_errors + [value])[-10:]
                        value = CRASH
                    results[task_id], n_done = value, n_done + 1
                    w.task = None
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now >= w.deadline:
                    results[w.task], n_done = TIMEOUT, n_done + 1
                    self.n_timeouts += 1
                    self._replace(w)
                elif not w.ready and now >= w.started + self.start_timeout_s:
                    # stuck before "ready" (an import that never returns): without this deadline
                    # no task would ever be sent to it and the run would wait forever
                    self._start_failed(f"was not ready within {self.start_timeout_s:g} s")
                    self._replace(w)
            bar.update(n_done - bar.n)
        return results
