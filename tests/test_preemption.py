"""Stop requests, worker processes that a stop signal kills, run-folder locks, and the M_0 child.

The signal cases of a whole self-training run (SIGTERM during sampling and training, to the
main process and to its group, SLURM's requeue signal, a group SIGTERM in the middle of an
answer check) are in tests/test_kill_resume.py, next to the SIGKILL cases they share a
reference run with. Here: the pieces, and the step-wise initialisation child through the CLI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from hs_star_pl.infra import preemption
from hs_star_pl.infra.run_lock import LOCK_NAME, RunDirInUseError, RunLock, is_launching_process
from hs_star_pl.infra.workers import CRASH, KillablePool
from tests.helpers.kill_resume import leftover_group
from tests.helpers.pool_tasks import echo_after
from tests.helpers.self_training import env
from tests.helpers.tiny_setup import REPO, STEPWISE_FILE

# -- worker processes killed by a signal meant for the run ---------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_task_whose_worker_a_stop_signal_killed_is_redone_not_reported_as_a_crash(signum):
    """A worker killed by SIGTERM/SIGINT (a signal to the process group) says nothing about its
    task: the task goes to a fresh worker. Before, it came back as CRASH (an ungradeable check)."""
    pool = KillablePool(echo_after, n_workers=1, timeout_s=30.0)
    try:
        assert pool.run([("echo", (0.0, "warm"))]) == ["warm"]
        worker = pool._workers[0].process
        threading.Timer(0.5, os.kill, (worker.pid, signum)).start()
        assert pool.run([("echo", (2.0, "first")), ("echo", (0.0, "second"))]) == ["first", "second"]
        assert (pool.n_interrupted, pool.n_crashes) == (1, 0)
    finally:
        pool.close()


def test_a_worker_killed_by_sigkill_is_still_a_crash():
    """SIGKILL is what the OOM killer sends: that stays a failed task (CRASH), as before."""
    pool = KillablePool(echo_after, n_workers=1, timeout_s=30.0)
    try:
        pool.run([("echo", (0.0, "warm"))])
        threading.Timer(0.5, os.kill, (pool._workers[0].process.pid, signal.SIGKILL)).start()
        assert pool.run([("echo", (2.0, "lost")), ("echo", (0.0, "kept"))]) == [CRASH, "kept"]
        assert (pool.n_interrupted, pool.n_crashes) == (0, 1)
    finally:
        pool.close()


class _Interrupt(BaseException):
    pass


def _interrupt(signum, frame):
    raise _Interrupt


def test_an_exception_while_waiting_leaves_no_answer_for_a_later_call():
    """A ``KeyboardInterrupt`` or stop request that ends ``run`` must not let the abandoned
    task's answer become the next call's result (before: the next call got "stale" for task 0)."""
    pool = KillablePool(echo_after, n_workers=1, timeout_s=30.0)
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        pool.run([("echo", (0.0, "warm"))])
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(_Interrupt):
            pool.run([("echo", (1.5, "stale"))])
        assert pool.run([("echo", (0.0, "fresh"))]) == ["fresh"]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        pool.close()


# -- the stop request itself -------------------------------------------------------------------


def test_a_stop_request_drops_interruptible_work_at_once_and_waits_elsewhere():
    """Outside ``interruptible`` a SIGTERM is only recorded; inside, it raises where the main
    thread is; a request already pending raises on entry. Exit status: 128 + 15."""
    before = signal.getsignal(signal.SIGTERM)
    preemption.reset()
    preemption.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert preemption.requested() == signal.SIGTERM  # recorded, nothing raised
        with pytest.raises(preemption.Preempted) as info:
            with preemption.interruptible("during round 3"):
                pass
        assert (info.value.where, info.value.exit_code) == ("during round 3", 143)

        preemption.reset()
        with pytest.raises(preemption.Preempted, match="during sampling"):
            with preemption.interruptible("during sampling"):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # interrupted long before this ends
    finally:
        preemption.uninstall()
        preemption.reset()
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigusr1_outside_slurm_is_a_stop_request_with_a_message():
    """SIGUSR1's default action ended the run on the spot, with no message and exit -10; it is
    a stop request like SIGTERM (exit status 138), without SLURM's requeue."""
    code = ("import os, signal, time\n"
            "from hs_star_pl.infra import preemption\n"
            "preemption.install()\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "time.sleep(0.2)\n"
            "print(preemption.requested(), preemption.requeue_requested(), preemption.exit_status(preemption.requested()))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr)
    assert out.stdout.split() == [str(int(signal.SIGUSR1)), "False", "138"]
    assert out.stderr.strip() == ("hs-star: received SIGUSR1; stopping at the next safe point (everything finished "
                                  "is kept)")


# -- one run per folder --------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(directory, **owner) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "argv": ["hs-star", "fit"],
                                                   "started": time.time(), **owner}))


def test_a_lock_held_by_a_live_process_is_refused_with_what_to_do(tmp_path):
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as owner:
        try:
            _write_lock(tmp_path, pid=owner.pid)
            with pytest.raises(RunDirInUseError) as info:
                RunLock(tmp_path).acquire()
        finally:
            owner.kill()
    message = str(info.value)
    assert f"trainer.default_root_dir={tmp_path} is in use by another hs-star run (PID {owner.pid}" in message
    assert f"kill -TERM {owner.pid}" in message and "--trainer.default_root_dir" in message
    assert f"delete {tmp_path / LOCK_NAME}" in message
    assert info.value.exit_code == 2


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    """The PID is alive (it is ours) but started at another time than the lock records."""
    _write_lock(tmp_path, pid=os.getppid(), start_ticks=1)
    RunLock(tmp_path).acquire().release()


def test_a_lock_from_another_host_is_respected_unless_an_earlier_run_of_this_slurm_job_left_it(tmp_path, monkeypatch):
    _write_lock(tmp_path, pid=1234, host="node-17", slurm_job_id="99", slurm_restart_count="0")
    with pytest.raises(RunDirInUseError, match="on host node-17"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # this job, requeued onto another node
    RunLock(tmp_path).acquire().release()


def _state(pid: int) -> str:
    stat = open(f"/proc/{pid}/stat").read()
    return stat[stat.rfind(")") + 2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process state in /proc")
def test_a_lock_held_by_a_killed_process_its_parent_has_not_reaped_is_taken(tmp_path):
    """SIGKILLed, not yet waited for (state Z): ``kill(pid, 0)`` still succeeds on a zombie, and
    the resume was refused as "in use by another hs-star run"."""
    code = ("import sys, time; from hs_star_pl.infra.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "locked"
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == owner.pid
        os.kill(owner.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _state(owner.pid) != "Z":  # killed and not reaped: a zombie
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lock = RunLock(tmp_path).acquire()
        assert _state(owner.pid) == "Z"
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        lock.release()
        assert not (tmp_path / LOCK_NAME).exists()
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()


def test_a_lock_is_held_by_the_kernel_while_its_process_lives_and_released_when_it_dies(tmp_path):
    """The lock file is held with ``flock``: a second process is refused while the first lives,
    even with the file's record damaged, and takes the lock once the first is gone."""
    code = ("import sys, time; from hs_star_pl.infra.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    with subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True) as owner:
        try:
            assert owner.stdout.readline().strip() == "locked"
            (tmp_path / LOCK_NAME).write_text("{damaged")
            with pytest.raises(RunDirInUseError, match="a process whose lock file cannot be read"):
                RunLock(tmp_path).acquire()
        finally:
            owner.kill()
            owner.wait()
    RunLock(tmp_path).acquire().release()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_lock_whose_flock_a_dead_runs_forked_helper_keeps_is_replaced(tmp_path, capfd):
    """The owner forked a helper (it shares the locked file) and was SIGKILLed: the flock lives on
    in the helper, but the recorded owner is gone, so the lock file is replaced."""
    code = ("import os, sys, time; from hs_star_pl.infra.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "child = os.fork()\nif child == 0: time.sleep(60); os._exit(0)\n"
            "print(child, flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    helper = int(owner.stdout.readline())
    try:
        owner.kill()
        owner.wait()
        lock = RunLock(tmp_path).acquire()
        assert f"taking over the stale lock {tmp_path / LOCK_NAME} (its process {owner.pid} is gone)" in capfd.readouterr().err
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        second = subprocess.run([sys.executable, "-c", "import sys; from hs_star_pl.infra.run_lock import RunLock; "
                                 "RunLock(sys.argv[1]).acquire()", str(tmp_path)], capture_output=True, text=True)
        assert second.returncode != 0 and f"in use by another hs-star run (PID {os.getpid()} " in second.stderr
        lock.release()
    finally:
        os.kill(helper, signal.SIGKILL)
        owner.stdout.close()


@pytest.mark.parametrize(("environ", "launching"), [
    ({}, True), ({"LOCAL_RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False),
    ({"RANK": "8", "LOCAL_RANK": "0"}, False), ({"SLURM_PROCID": "0"}, True), ({"NODE_RANK": "1"}, False),
])
def test_only_the_launching_process_takes_the_lock(environ, launching):
    assert is_launching_process(environ) is launching


# -- the step-wise initialisation child (M_0) through the CLI --------------------------------------


def _bootstrap_command(tmp_path) -> list[str]:
    """``hs-star fit`` whose M_0 is missing: it first trains M_0 in a child ``hs-star fit`` (long)."""
    child = tmp_path / "stepwise.yaml"
    child.write_text(
        "trainer:\n  max_epochs: 5000\n  enable_progress_bar: false\n"
        f"data:\n  problems_file: {STEPWISE_FILE}\n  template: plain\n  batch_size: 4\n"
        "model:\n  tiny:\n    hidden_size: 32\n    num_hidden_layers: 1\n    num_attention_heads: 4\n"
    )
    configs = [str(REPO / "configs" / "base.yaml"), str(REPO / "configs" / "sft" / "stepwise_init.yaml"), str(child)]
    return [sys.executable, "-m", "hs_star_pl", "fit", "-c", str(REPO / "configs" / "base.yaml"),
            "-c", str(REPO / "configs" / "debug" / "tiny_cpu.yaml"), "--model.tiny=null",
            f"--model.model_path={tmp_path / 'm0'}", f"--stepwise_init=[{', '.join(configs)}]",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--data.train_file={REPO / 'configs' / 'data' / 'arith_pairs.jsonl'}", "--trainer.enable_progress_bar=false"]


def _start(command, tmp_path, name: str) -> subprocess.Popen:
    with open(tmp_path / f"{name}.log", "wb") as log:
        return subprocess.Popen(command, cwd=tmp_path, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _training_m0(tmp_path) -> bool:
    """The M_0 child has finished an epoch (it is well into training)."""
    return (tmp_path / "m0.run" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.integration
def test_the_m0_child_dies_with_its_parent(tmp_path):
    """``hs-star fit`` SIGKILLed while its child trains M_0: the child used to train on as an
    orphan. Now it gets SIGTERM from the kernel, stops at a safe point and releases its folder."""
    parent = _start(_bootstrap_command(tmp_path), tmp_path, "parent")
    try:
        _wait_for(lambda: _training_m0(tmp_path) or parent.poll() is not None, 180, "the M_0 child to train")
        assert parent.poll() is None, (tmp_path / "parent.log").read_text()[-3000:]
        parent.kill()
        parent.wait()
        _wait_for(lambda: not leftover_group(parent.pid), 90, "the orphaned M_0 child to stop")
        assert not (tmp_path / "m0.run" / LOCK_NAME).exists()
        assert not (tmp_path / "m0").exists()
    finally:
        leftover_group(parent.pid, kill=True)


@pytest.mark.integration
def test_a_second_run_into_a_folder_in_use_is_refused_and_a_stop_reaches_the_m0_child(tmp_path):
    """A re-run while the first run trains M_0 used to start a second M_0 training into the same
    folder; now it is refused (exit 2) naming the first run. SIGTERM to the first run alone (not
    its group) is forwarded to the child: both stop, exit 143, and leave no process behind."""
    command = _bootstrap_command(tmp_path)
    first = _start(command, tmp_path, "first")
    second = None
    try:
        _wait_for(lambda: _training_m0(tmp_path) or first.poll() is not None, 180, "the M_0 child to train")
        second = _start(command, tmp_path, "second")
        _wait_for(lambda: second.poll() is not None, 180, "the second run to be refused")
        log = (tmp_path / "second.log").read_text()
        assert second.returncode == 2, log[-3000:]
        assert f"is in use by another hs-star run (PID {first.pid}" in log
        assert "Traceback" not in log
        assert first.poll() is None, "the refused run must not disturb the first"

        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143, (tmp_path / "first.log").read_text()[-3000:]
        _wait_for(lambda: not leftover_group(first.pid), 60, "the M_0 child to stop")
        assert "stopped by SIGTERM" in (tmp_path / "first.log").read_text()
        assert not (tmp_path / "run" / LOCK_NAME).exists() and not (tmp_path / "m0.run" / LOCK_NAME).exists()
    finally:
        leftover_group(first.pid, kill=True)
        if second is not None:
            leftover_group(second.pid, kill=True)


@pytest.mark.integration
def test_a_sigterm_while_the_command_starts_stops_it_at_once(tmp_path):
    """Start-up (imports, parsing, model loading) writes nothing a resume needs: a SIGTERM there
    ends the command with 143 and one line (before: it died of the signal during the imports,
    or was only noticed once training began)."""
    command = [sys.executable, "-m", "hs_star_pl", "fit", "-c", str(REPO / "configs" / "base.yaml"),
               "-c", str(REPO / "configs" / "debug" / "tiny_cpu.yaml"),
               f"--data.train_file={REPO / 'configs' / 'data' / 'arith_pairs.jsonl'}",
               f"--trainer.default_root_dir={tmp_path / 'run'}"]
    proc = _start(command, tmp_path, "run")
    try:
        time.sleep(3.0)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, (tmp_path / "run.log").read_text()[-3000:]
        assert "hs-star: stopped by SIGTERM while starting" in (tmp_path / "run.log").read_text()
        assert not (tmp_path / "run" / "checkpoints").exists()
    finally:
        leftover_group(proc.pid, kill=True)
