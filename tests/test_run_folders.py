"""A run folder reused or damaged, through the real CLI: each case ends in one message, exit status 2.

* Reused with edited settings: every round folder (and the checkpoint) records the settings
  that decide its content (``hs_star_pl.core.fingerprint``); re-running a finished folder, or
  resuming a killed one, with any of them changed is refused naming each key with both values,
  and the folder is left as it was. Settings that cannot change a round do not count.
* Damaged: a round file deleted, truncated, or cut inside a UTF-8 character, a truncated
  ``last.ckpt``: the message names the file.
* A full disk (a small tmpfs filled at a fault point, ``tests/helpers/disk_full.py``) or a
  read-only folder: the message says so, names where, and (full disk) that ``--ckpt_path
  last`` resumes, which it then does. These need user namespaces (``tests/helpers/small_disk.py``)
  and skip without them.

Module fixtures: one run SIGKILLed while re-sampling round 0, and the same run resumed to its
end (about 1 min on 2 cores); every test works on a copy.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from hs_star_pl.core.artifacts import completed_rounds, read_jsonl, round_dir
from hs_star_pl.core.fingerprint import SETTINGS_FILE
from hs_star_pl.infra.run_lock import LOCK_NAME
from tests.helpers import small_disk
from tests.helpers.kill_resume import KILLED, leftover_temporaries, log_tail, run, run_args

K = "self_training.budget.init_args.samples_per_problem"
N_P = "self_training.budget.init_args.n_presample"
WAYS_OUT = ("Either give this configuration a run folder of its own (a new trainer.default_root_dir), or restore "
            "the settings above to continue the run in {run}.")
# Settings that cannot change a round: changing them must not stop a resume.
HARMLESS = ["--self_training.plots=false", "--self_training.engine.init_args.progress=true", "--trainer.log_every_n_steps=2"]


@pytest.fixture(scope="module")
def killed(tiny_m0, tmp_path_factory) -> Path:
    """Round 0's pre-samples generated, scored and saved, its re-samples generated but not saved."""
    m0, problems = tiny_m0
    cwd = tmp_path_factory.mktemp("killed")
    assert run(run_args(cwd / "run", m0, problems), cwd, fault="resample@0") == KILLED, log_tail(cwd)
    assert (round_dir(cwd / "run", 0) / "presample_scored.jsonl").is_file()
    assert not (round_dir(cwd / "run", 0) / "resample_generated.jsonl").exists()
    return cwd / "run"


@pytest.fixture(scope="module")
def finished(killed, tiny_m0, tmp_path_factory) -> Path:
    """The killed run resumed to its end, with settings that cannot change a round changed."""
    m0, problems = tiny_m0
    cwd = tmp_path_factory.mktemp("finished")
    shutil.copytree(killed, cwd / "run")
    assert run([*run_args(cwd / "run", m0, problems, *HARMLESS), "--ckpt_path=last"], cwd) == 0, log_tail(cwd)
    return cwd / "run"


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def snapshot(folder: Path) -> dict[Path, tuple[bytes, int]]:
    """Every file of a run folder but the run lock (a killed run leaves a stale one, which the
    next command takes over and releases: that is the lock working, not the run changing)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def attempt(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run hs-star; returns its status and its output (stdout and stderr)."""
    (cwd / "run.log").unlink(missing_ok=True)
    rc = run(args, cwd)
    return rc, (cwd / "run.log").read_text(errors="replace")


def error_of(output: str) -> str:
    assert "Traceback" not in output, output[-3000:]
    return output[output.index("hs-star: error: ") + len("hs-star: error: "):].strip()


# -- reused with edited settings ------------------------------------------------------------


@pytest.mark.integration
def test_settings_that_cannot_change_a_round_do_not_stop_a_resume_and_every_round_records_the_same(finished):
    import torch

    assert completed_rounds(finished) == [0, 1]
    records = [json.loads((round_dir(finished, t) / SETTINGS_FILE).read_text()) for t in (0, 1)]
    assert records[0] == records[1]
    assert records[0]["settings"][K] == 4 and records[0]["settings"]["self_training.seed"] == 0
    assert "self_training.plots" not in records[0]["settings"]
    state = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]["SelfTrainingCallback"]
    assert state["settings"]["fingerprint"] == records[0]["fingerprint"]


@pytest.mark.integration
def test_a_finished_folder_run_again_after_editing_the_config_is_refused(finished, tiny_m0, tmp_path):
    """K 4 -> 6 and seed 0 -> 5, no --ckpt_path: both rounds used to read back as complete on disk."""
    m0, problems = tiny_m0
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    rc, output = attempt(run_args(run_dir, m0, problems, f"--{K}=6", "--self_training.seed=5"), tmp_path)
    assert rc == 2, output[-3000:]
    assert error_of(output).splitlines() == [
        f"{run_dir} holds rounds made with other settings, and this run would mix them with its own. The settings that differ:",
        f"  - {K}: 4 in rounds 0, 1; 6 now",
        "  - self_training.seed: 0 in rounds 0, 1; 5 now",
        WAYS_OUT.format(run=run_dir),
    ]
    assert snapshot(run_dir) == before


@pytest.mark.integration
def test_a_finished_self_training_folder_run_again_unchanged_without_ckpt_path_is_refused(finished, tiny_m0, tmp_path):
    """Same settings, no --ckpt_path: it used to train again from M_0 over the finished run
    (rounds read back) and leave last-v1.ckpt beside last.ckpt."""
    m0, problems = tiny_m0
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    rc, output = attempt(run_args(run_dir, m0, problems), tmp_path)
    assert rc == 2, output[-3000:]
    assert error_of(output).startswith(f"trainer.default_root_dir={run_dir} already holds a run "
                                       f"({run_dir / 'checkpoints' / 'last.ckpt'}): fit without --ckpt_path would ")
    assert snapshot(run_dir) == before


@pytest.mark.integration
@pytest.mark.parametrize("change", ["n_presample", "K", "seed", "problems_file"])
def test_resuming_a_killed_round_with_other_settings_is_refused(change, killed, tiny_m0, tmp_path):
    """Killed while re-sampling round 0, resumed with a changed budget, seed or pool: it used to
    finish the round with the new settings over the old pre-samples (a changed pool: KeyError)."""
    m0, problems = tiny_m0
    run_dir = copy_of(killed, tmp_path)
    if change == "problems_file":
        other = tmp_path / "other_pool.jsonl"
        other.write_text("".join(problems.read_text().splitlines(keepends=True)[:-1]))
        extra, problems = [], other
    else:
        extra = {"n_presample": [f"--{N_P}=3"], "K": [f"--{K}=6"], "seed": ["--self_training.seed=5"]}[change]
    before = snapshot(run_dir)
    rc, output = attempt([*run_args(run_dir, m0, problems, *extra), "--ckpt_path=last"], tmp_path)
    assert rc == 2, output[-3000:]
    lines = error_of(output).splitlines()
    assert lines[0].startswith(f"{run_dir} holds rounds made with other settings")
    assert lines[-1] == WAYS_OUT.format(run=run_dir)
    if change == "problems_file":
        (line,) = lines[1:-1]
        assert line.startswith("  - self_training.problems_file: ") and "300 problems) in round 0; " in line
        assert line.endswith(f"({other}, 299 problems) now")
    else:
        key, old, new = {"n_presample": (N_P, 2, 3), "K": (K, 4, 6), "seed": ("self_training.seed", 0, 5)}[change]
        assert lines[1:-1] == [f"  - {key}: {old} in round 0; {new} now"]
    assert snapshot(run_dir) == before


def test_a_finished_folder_run_again_without_ckpt_path_is_refused_naming_both_ways(tmp_path, capsys, monkeypatch):
    """It used to train again from the start over the finished run and leave last-v1.ckpt
    beside last.ckpt; now it is refused, and --ckpt_path last extends the run in place."""
    from hs_star_pl.cli import main
    from tests.helpers.tiny_setup import REPO

    monkeypatch.chdir(REPO)  # the config's data file is repo-relative
    monkeypatch.setattr(sys, "argv", ["hs-star"])
    run_dir = tmp_path / "run"
    args = ["fit", "-c", "configs/base.yaml", "-c", "configs/debug/tiny_cpu.yaml", "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false"]
    main(args)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    before = snapshot(run_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"hs-star: error: trainer.default_root_dir={run_dir} already holds a run ({checkpoints / 'last.ckpt'}): fit "
        "without --ckpt_path would train it again from the start and write its checkpoints beside the old ones "
        "(last-v1.ckpt). To continue that run (resume it, or extend it with more epochs or iterations), add "
        "--ckpt_path last; to start another, give it a new trainer.default_root_dir.")
    assert snapshot(run_dir) == before
    main([*args[:-3], "--trainer.max_epochs=2", *args[-2:], "--ckpt_path=last"])
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]


@pytest.mark.integration
def test_resuming_after_other_weights_were_copied_over_m0_is_refused(killed, tiny_m0, tmp_path):
    """Other weights copied over ``model.model_path`` as ``cp -p`` does (same size, old modification
    time): the resume used to finish round 0 with re-samples of the new model over pre-samples of
    the old one, exit 0."""
    import os

    import torch
    from safetensors.torch import load_file, save_file

    m0, problems = tiny_m0
    run_dir = copy_of(killed, tmp_path)
    weights = m0 / "model.safetensors"
    backup = tmp_path / "m0_backup.safetensors"
    shutil.copy2(weights, backup)
    other = tmp_path / "other.safetensors"
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in load_file(weights).items()}, other,
              metadata={"format": "pt"})
    assert other.stat().st_size == weights.stat().st_size
    before = snapshot(run_dir)
    try:
        old = weights.stat()
        shutil.copy2(other, weights)
        os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns))
        rc, output = attempt([*run_args(run_dir, m0, problems), "--ckpt_path=last"], tmp_path)
    finally:
        shutil.copy2(backup, weights)
    assert rc == 2, output[-3000:]
    lines = error_of(output).splitlines()
    assert lines[0].startswith(f"{run_dir} holds rounds made with other settings")
    assert lines[1:-1] == [line for line in lines[1:-1] if line.startswith("  - model.model_path (weights): ")] != []
    assert lines[-1] == ("Either give this configuration a run folder of its own (a new trainer.default_root_dir), or "
                         f"restore the settings above (and the weight files the run was made with in {m0}) to continue "
                         f"the run in {run_dir}.")
    assert snapshot(run_dir) == before


@pytest.mark.integration
def test_a_checkpoint_made_with_other_settings_is_refused(finished, tiny_m0, tmp_path):
    """A new folder, a checkpoint of another run, another seed: the checkpoint's own record refuses it."""
    m0, problems = tiny_m0
    checkpoint = finished / "checkpoints" / "last.ckpt"
    rc, output = attempt([*run_args(tmp_path / "new", m0, problems, "--self_training.seed=5"),
                          f"--ckpt_path={checkpoint}"], tmp_path)
    assert rc == 2, output[-3000:]
    lines = error_of(output).splitlines()
    assert lines[0] == (f"the checkpoint {checkpoint} was made with other settings, and this run would mix them with "
                        "its own. The settings that differ:")
    assert lines[1:] == ["  - self_training.seed: 0 in the checkpoint; 5 now", WAYS_OUT.format(run=tmp_path / "new")]
    assert completed_rounds(tmp_path / "new") == []


# -- damaged files ----------------------------------------------------------------------------


def damage(run_dir: Path, how: str) -> str:
    """Damage round 0 of a finished run; returns the start of the message expected."""
    round0 = round_dir(run_dir, 0)
    if how == "pairs_deleted":
        (round0 / "pairs.jsonl").unlink()
        return (f"{round0}: the round is marked complete (DONE) but pairs.jsonl is missing; restore the folder, or "
                "delete its DONE marker to redo the round")
    if how == "summary_truncated":
        path = round0 / "summary.json"
        path.write_bytes(path.read_bytes()[:100])
        return f"{path}: invalid JSON in a round artifact ("
    path = round0 / "rollouts.jsonl"
    n = len(read_jsonl(path))
    with path.open("ab") as fh:  # a last line cut in the middle of a two-byte character
        fh.write('{"text": "Start with 5. Add 3. ré'.encode()[:-1])
    return f"{path}:{n + 1}: not valid UTF-8 (unexpected end of data at byte 32) in a round artifact; the file was changed"


@pytest.mark.parametrize("how", ["pairs_deleted", "summary_truncated", "jsonl_cut_inside_a_utf8_character"])
def test_a_damaged_round_file_is_one_message_naming_it(how, finished, tiny_m0, tmp_path):
    m0, problems = tiny_m0
    run_dir = copy_of(finished, tmp_path)
    expected = damage(run_dir, how)
    # without its checkpoints (a run killed before the first one) the folder's rounds are read
    # back from round 0 (a folder with last.ckpt is refused without --ckpt_path, and resumed
    # with it at its end, where nothing is read)
    shutil.rmtree(run_dir / "checkpoints")
    rc, output = attempt(run_args(run_dir, m0, problems), tmp_path)  # round 0 is read back first
    assert rc == 2, output[-3000:]
    assert error_of(output).startswith(expected)


def test_a_truncated_checkpoint_is_one_message_naming_it(finished, tiny_m0, tmp_path):
    m0, problems = tiny_m0
    run_dir = copy_of(finished, tmp_path)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    rc, output = attempt([*run_args(run_dir, m0, problems), "--ckpt_path=last"], tmp_path)
    assert rc == 2, output[-3000:]
    message = error_of(output)
    assert message.startswith(f"{checkpoint}: cannot be read as a checkpoint, it is damaged or cut short (")
    assert message.endswith("Resume from another checkpoint (--ckpt_path <file>), or move it away and run without "
                            "--ckpt_path to start over")


# -- a full disk, a read-only folder ----------------------------------------------------------

needs_namespaces = pytest.mark.skipif(not small_disk.available(), reason="needs unshare -Urm (user namespaces) for a tmpfs")
# The free space is measured when the message is made: the run lock, released by then, may
# have given back one block of the filled disk.
FULL = r"the disk is full \(No space left on device\) writing {where}; (0 bytes|4096 bytes|4.0 KiB) free there now\. Files hs-star finished"
RESUME = "free some space, then run the same command with --ckpt_path last to resume"


@needs_namespaces
@pytest.mark.parametrize(("fill_at", "where"), [
    ("presample@0", "rounds/round_000/presample_generated.jsonl"),  # a round's phase file
    ("round_write@1", "rounds/round_001/summary.json"),  # a round's artifacts
    ("export@0", "checkpoints/last.ckpt"),  # torch's checkpoint writer
    ("training_step@0", None),  # Lightning's CSV logs
])
@pytest.mark.integration
def test_a_full_disk_is_one_message_and_the_run_resumes_once_space_is_freed(fill_at, where, tiny_m0, tmp_path):
    m0, problems = tiny_m0
    disk = tmp_path / "disk"
    run_dir, first, second = disk / "run", tmp_path / "first.log", tmp_path / "second.log"
    args = run_args(run_dir, m0, problems)
    resume = fill_at == "export@0"  # the resume after a failed checkpoint write, the most delicate
    # never fill the real disk: nothing runs unless the tmpfs is mounted
    script = f"{small_disk.mount_tmpfs(disk)} || exit 99; " + small_disk.hs_star(
        args, module="tests.helpers.disk_full", log=first)
    if resume:
        script += f"; rm {disk / 'filler'}; " + small_disk.hs_star([*args, "--ckpt_path=last"], log=second)
    script += f"; cp -a {run_dir} {tmp_path / 'out'}"
    done = small_disk.in_namespace(script, tmp_path, HS_STAR_FILL_AT=fill_at, HS_STAR_FILL_FILE=str(disk / "filler"))
    assert done.returncode == 0, done.stderr
    output = first.read_text(errors="replace")
    assert small_disk.status(first) == 2, output[-3000:]
    message = error_of(output.rsplit("rc=", 1)[0])
    shown = run_dir / where if where else f"a file under {run_dir} (Lightning's logs or saved config)"
    assert re.match(FULL.format(where=re.escape(str(shown))), message) and message.endswith(RESUME), message
    if resume:
        assert small_disk.status(second) == 0, second.read_text(errors="replace")[-3000:]
        out = tmp_path / "out"
        assert completed_rounds(out) == [0, 1] and leftover_temporaries(out) == []
        assert (out / "hf" / "policy_002" / "model.safetensors").is_file()


EXPORT_ON_A_FULL_DISK = """
import sys
from pathlib import Path
from hs_star_pl.infra.errors import StorageError
from hs_star_pl.training.export import export_hf
from hs_star_pl.training.module import HSStarModule, TinyModelConfig
from tests.helpers.disk_full import fill

module = HSStarModule(tiny=TinyModelConfig())
fill(sys.argv[1] + "/filler")
try:
    export_hf(module, Path(sys.argv[1]) / "hf" / "policy_001")
except StorageError as err:
    print("StorageError:", err)
"""


@pytest.mark.integration
@needs_namespaces
def test_an_hf_export_on_a_full_disk_names_its_folder_and_leaves_no_half_export(tmp_path):
    """safetensors reports a full disk as its own error type, without an errno."""
    disk = tmp_path / "disk"
    script = (f"{small_disk.mount_tmpfs(disk, size='4m')} && {sys.executable} -c '{EXPORT_ON_A_FULL_DISK}' {disk} && "
              f"echo ==== && ls -A {disk / 'hf'}")
    done = small_disk.in_namespace(script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    printed, listing = done.stdout.split("====\n")
    (line,) = [line for line in printed.splitlines() if line.startswith("StorageError: ")]
    assert re.match(FULL.format(where=re.escape(str(disk / "hf" / "policy_001.tmp"))), line.removeprefix("StorageError: ")), line
    assert listing.strip() == ""  # the temporary folder was removed, nothing under the final name


@pytest.mark.integration
@needs_namespaces
def test_a_read_only_run_folder_is_one_message_naming_the_key_and_nothing_is_written(finished, tiny_m0, tmp_path):
    m0, problems = tiny_m0
    fresh, fresh_log = tmp_path / "ro", tmp_path / "fresh.log"
    run_dir, resumed_log = copy_of(finished, tmp_path), tmp_path / "resumed.log"
    before = snapshot(run_dir)
    script = "; ".join([
        small_disk.mount_tmpfs(fresh, size="1m", read_only=True) + " && " + small_disk.hs_star(
            run_args(fresh / "run", m0, problems), log=fresh_log),
        small_disk.bind_read_only(run_dir) + " && " + small_disk.hs_star(
            [*run_args(run_dir, m0, problems), "--ckpt_path=last"], log=resumed_log),
    ])
    done = small_disk.in_namespace(script, tmp_path)
    assert done.returncode == 0, done.stderr
    tail = "the run writes its rounds, checkpoints and logs there; choose a writable folder"
    output = fresh_log.read_text(errors="replace").rsplit("rc=", 1)[0]
    assert small_disk.status(fresh_log) == 2, output[-3000:]
    assert error_of(output) == f"trainer.default_root_dir={fresh / 'run'} (its parent {fresh}) is on a read-only file system: {tail}"
    output = resumed_log.read_text(errors="replace").rsplit("rc=", 1)[0]
    assert small_disk.status(resumed_log) == 2, output[-3000:]
    assert error_of(output) == f"trainer.default_root_dir={run_dir} is on a read-only file system: {tail}"
    assert snapshot(run_dir) == before
