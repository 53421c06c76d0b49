"""Failed writes as one message (``hs_star_pl.infra.storage``), from real kernel errors.

``/dev/full`` fails every write with ``ENOSPC``, so the full-disk errors here are the ones
Python and torch really raise; the same through the CLI, on a filled tmpfs, and the
read-only cases are in ``test_run_folders.py``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from hs_star_pl.infra.errors import ConfigError, StorageError
from hs_star_pl.infra.storage import check_writable, storage_error

needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")


def raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as err:  # noqa: BLE001 - the point is to look at whatever was raised
        return err
    raise AssertionError("nothing was raised")


@needs_dev_full
def test_a_full_disk_is_recognised_from_python_and_from_torch():
    import torch

    def python_write():
        with open("/dev/full", "wb") as fh:
            fh.write(b"x" * 100)

    def torch_save():
        with open("/dev/full", "wb") as fh:
            torch.save({"w": torch.zeros(1000)}, fh)

    for fn in (python_write, torch_save):
        err = raised(fn)
        assert not isinstance(err, StorageError)
        failed = storage_error(err, "/runs/a/checkpoints/last.ckpt")
        assert isinstance(failed, StorageError) and failed.errno == errno.ENOSPC and failed.exit_code == 2
        assert str(failed).startswith("the disk is full (No space left on device) writing /runs/a/checkpoints/last.ckpt")
        assert str(failed).endswith("then run the same command with --ckpt_path last to resume")


def test_other_errors_are_left_alone_and_permission_is_a_write_error_only_where_known():
    assert storage_error(RuntimeError("shape mismatch")) is None
    assert storage_error(OSError(errno.ENOENT, "No such file or directory", "x")) is None
    denied = OSError(errno.EACCES, "Permission denied", "/runs/a/logs/metrics.csv")
    assert storage_error(denied, writing=False) is None  # it may have been a read
    assert str(storage_error(denied)).startswith("cannot write /runs/a/logs/metrics.csv: permission denied.")
    read_only = OSError(errno.EROFS, "Read-only file system", "/runs/a/x")
    assert str(storage_error(read_only, writing=False)).startswith("cannot write /runs/a/x: read-only file system.")


def test_a_missing_run_folder_under_a_writable_parent_is_writable(tmp_path):
    check_writable(tmp_path / "not" / "yet" / "made", "trainer.default_root_dir")
    assert not (tmp_path / "not").exists()  # nothing written to find out


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_without_write_permission_is_refused_naming_the_key(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(ConfigError) as info:
        check_writable(locked / "run", "trainer.default_root_dir")
    assert str(info.value).startswith(f"trainer.default_root_dir={locked / 'run'} (its parent {locked}) is not writable")
