"""What identifies a model's weights: a digest of its weight files, read once and cached.

A run folder is tied to the models it was made with (M_0, the PRM), but those are named by
path, and a path can come to hold other weights: copied over, synced from elsewhere. So the
settings record (``core.fingerprint``) and the PRM's ``offload: reload`` keep a digest of the
files' content. Reading 15 GB on every start would cost a minute or more, so each file's
digest is cached under a key that any change of its content changes:

    (real path, device, inode, size, modification time, status-change time)   all in ns

``cp -p`` and ``rsync -a`` restore the old modification time, and a same-size copy keeps the
size; but writing a file (or renaming another over it) sets its status-change time
(``st_ctime_ns``) to now, and no user call sets it back (``os.utime`` sets it too), while a
renamed-in file also has another inode. A changed key only means "read it again": a
``touch``, a ``chmod`` or a copy of the same bytes gives the same digest after one more read.

The cache is kept twice: in this process (``_MEMO``, so the fingerprint and the PRM share one
read) and, where a caller names one, in a small JSON file (the run folder's, so the next start
reads nothing). A cache file that cannot be read or written is ignored: it only saves time.

Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""The files of a model folder whose content is its weights (the top level of the folder)."""
CACHE_NAME = "weight_digests.json"
"""The cache file's name in a run folder (``trainer.default_root_dir``)."""
CHUNK = 8 << 20
ALGORITHM = "sha256"  # hardware-accelerated (SHA-NI) on current x86: faster than blake2b here

FileKey = tuple[str, int, int, int, int, int]
_MEMO: dict[FileKey, str] = {}


def file_key(path: str | Path) -> FileKey:
    """The cache key of one file: a change of its content changes it (module docstring)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def hash_file(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes, read in 8 MiB chunks (memory stays flat)."""
    h = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            h.update(view[:n])
    return f"{ALGORITHM}:{h.hexdigest()}"


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files at the top level of a model folder (``WEIGHT_SUFFIXES``), sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


class DigestCache:
    """Digests of files by ``file_key``, in this process and in ``path`` (a JSON file) when given."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._stored: dict[str, str] = {}
        if self.path is not None:
            try:
                value = json.loads(self.path.read_text(encoding="utf-8"))
                self._stored = {str(k): str(v) for k, v in value.get("digests", {}).items()}
            except (OSError, ValueError, AttributeError):
                pass  # no cache yet, or a damaged one: the files are read again
        self._dirty = False

    @staticmethod
    def _text(key: FileKey) -> str:
        return json.dumps(list(key))

    def known(self, key: FileKey) -> str | None:
        """The digest recorded for ``key`` (in this process or the file), if any; reads no weights."""
        found = _MEMO.get(key)
        if found is None and (found := self._stored.get(self._text(key))) is not None:
            _MEMO[key] = found
        return found

    def digest(self, path: str | Path) -> str:
        """The digest of ``path``: cached when its key is known, else read (and cached)."""
        key = file_key(path)
        found = self.known(key)
        if found is None:
            found = hash_file(key[0])
            if file_key(path) != key:  # changed while read: give this read's digest, cache nothing
                return found
            _MEMO[key] = found
        if self._stored.get(self._text(key)) != found:
            self._stored[self._text(key)] = found
            self._dirty = True
        return found

    def save(self) -> None:
        """Write the file cache (atomically) if it gained entries; a failure is ignored."""
        if self.path is None or not self._dirty:
            return
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"algorithm": ALGORITHM, "digests": self._stored}, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def folder_digest(folder: str | Path, cache: DigestCache | None = None) -> str | None:
    """One digest of a model folder's weight files (names and contents), or ``None`` when it has none.

    New digests join ``cache``; writing its file is the caller's (``DigestCache.save``), so a
    run that refuses to start leaves its folder as it was.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "model.safetensors").write_bytes(b"w")
    >>> folder_digest(d) == folder_digest(d), folder_digest(d).startswith("sha256:")
    (True, True)
    """
    cache = cache if cache is not None else DigestCache()
    files = weight_files(folder)
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{cache.digest(f)}\n".encode("utf-8", "surrogateescape"))
    return f"{ALGORITHM}:{h.hexdigest()[:32]}"


def keys_of(files: Sequence[Path]) -> list[FileKey]:
    """``file_key`` of each file, in order."""
    return [file_key(f) for f in files]
