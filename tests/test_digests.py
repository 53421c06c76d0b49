"""Weight-file digests and their cache (``hs_star_pl.infra.digests``): read once, and never fooled by ``cp -p``."""

from __future__ import annotations

import os
import shutil

import pytest

from hs_star_pl.infra import digests
from hs_star_pl.infra.digests import DigestCache, file_key, folder_digest


@pytest.fixture
def reads(monkeypatch):
    """Every file whose bytes were hashed (the real hash, recorded), with the process cache emptied."""
    monkeypatch.setattr(digests, "_MEMO", {})
    seen = []
    real = digests.hash_file

    def recording(path):
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(digests, "hash_file", recording)
    return seen


def model(folder, **files):
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name.replace("_", ".")).write_bytes(data)
    return folder


def test_a_same_size_copy_with_the_old_times_changes_the_key_and_the_digest(tmp_path, reads):
    """``shutil.copy2`` then ``os.utime`` to the old times: what ``cp -p`` and ``rsync -a`` leave."""
    folder = model(tmp_path / "m", model_safetensors=b"A" * 4096, config_json=b"{}")
    other = model(tmp_path / "o", model_safetensors=b"B" * 4096)
    target = folder / "model.safetensors"
    first, key = folder_digest(folder), file_key(target)
    before = target.stat()
    shutil.copy2(other / "model.safetensors", target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)  # what a name/size/mtime check sees
    assert file_key(target) != key  # the status-change time moved (no user call sets it back)
    assert folder_digest(folder) != first
    assert reads == ["model.safetensors", "model.safetensors"]  # config.json is no weight file


def test_an_unchanged_file_is_read_once_per_process_and_once_per_cache_file(tmp_path, reads, monkeypatch):
    folder = model(tmp_path / "m", a_safetensors=b"1" * 100, b_safetensors=b"2" * 100)
    cache_file = tmp_path / "run" / "weight_digests.json"
    cache = DigestCache(cache_file)
    first = folder_digest(folder, cache)
    assert not cache_file.exists()  # written by the caller, once the run goes ahead
    cache.save()
    assert folder_digest(folder, DigestCache(cache_file)) == first and len(reads) == 2
    monkeypatch.setattr(digests, "_MEMO", {})  # a new process: the run folder's file answers
    assert folder_digest(folder, DigestCache(cache_file)) == first and len(reads) == 2
    os.utime(folder / "a.safetensors")  # a touch: read again, same digest
    assert folder_digest(folder, DigestCache(cache_file)) == first and reads[2:] == ["a.safetensors"]


def test_a_damaged_or_unwritable_cache_file_only_costs_a_read(tmp_path, reads):
    folder = model(tmp_path / "m", w_bin=b"x" * 10)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert folder_digest(folder, DigestCache(bad)) == folder_digest(folder)
    blocked = tmp_path / "file"
    blocked.write_text("")
    cache = DigestCache(blocked / "cache.json")  # its folder is a file
    assert folder_digest(folder, cache) == folder_digest(folder)
    cache.save()  # nothing written, nothing raised


def test_names_count_and_a_folder_without_weights_has_no_digest(tmp_path):
    a = model(tmp_path / "a", model_safetensors=b"same")
    b = model(tmp_path / "b", other_safetensors=b"same")
    assert folder_digest(a) != folder_digest(b)
    assert folder_digest(model(tmp_path / "c", config_json=b"{}")) is None
