"""``LiveBytes``: how many bytes of the tensors an iterator handed out are still alive, and the peak.

Wrap a ``(name, tensor)`` stream with :meth:`LiveBytes.watch` before handing it to its
consumer (an engine weight sync, an export). Each tensor's storage is counted once, from the
moment it is handed out until nothing references it any more (a weak reference to the storage
tells), so the peak is the host memory the stream and its consumer held at once, whoever kept
the references: a producer that hoards copies shows up as much as a consumer that does.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any


class LiveBytes:
    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.handed_out = 0  # distinct storages
        self._alive: dict[int, int] = {}  # id(storage) -> bytes, while it lives

    def watch(self, pairs: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        for name, tensor in pairs:
            if tensor is not None:
                self._count(tensor)
            yield name, tensor
            del tensor  # hold nothing while the next one is made

    def _count(self, tensor: Any) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._alive:  # a tied name: the same storage again
            return
        self._alive[key] = storage.nbytes()
        self.handed_out += 1
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        self.live -= self._alive.pop(key)
