"""Small pieces both engines share: request checks, per-request seeds, stop-string cuts.

Pure Python (no torch), so the engines agree on the same semantics:

- a request key appears once; ``n == 0`` is allowed and yields an empty list;
- a response ends at the first stop string to *complete* (vLLM's rule); the returned text
  excludes it, and the token count includes the tokens up to the one that completed it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from hs_star_pl.core.protocols import GenerationRequest


def check_requests(requests: Sequence[GenerationRequest]) -> None:
    """Raise ``ValueError`` for duplicate keys or negative counts (results are keyed by ``key``)."""
    seen: set[str] = set()
    for req in requests:
        if req.n < 0:
            raise ValueError(f"GenerationRequest {req.key!r}: n must be >= 0, got {req.n}")
        if req.key in seen:
            raise ValueError(f"GenerationRequest key {req.key!r} appears twice; keys must be unique")
        seen.add(req.key)


def request_seed(seed: int, key: str) -> int:
    """A 63-bit seed from ``(seed, key)``, stable across processes (unlike ``hash``).

    >>> request_seed(0, "a") == request_seed(0, "a") != request_seed(1, "a")
    True
    """
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def find_stop(text: str, stops: Sequence[str]) -> tuple[int, int] | None:
    """``(start, end)`` of the stop string that completes first in ``text``, or ``None``.

    >>> find_stop("a=1\\n\\nb", ["\\n\\n", "="])
    (1, 2)
    >>> find_stop("abc", ["x"]) is None
    True
    """
    best: tuple[int, int] | None = None
    for stop in stops:
        if not stop:
            continue
        start = text.find(stop)
        if start < 0:
            continue
        span = (start, start + len(stop))
        if best is None or (span[1], span[0]) < (best[1], best[0]):
            best = span
    return best
