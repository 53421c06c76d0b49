"""Task functions for ``KillablePool`` tests (module level: spawned workers import them by name)."""

from __future__ import annotations

import time


def echo_after(kind: str, payload: tuple[float, str]) -> str:
    """Sleep ``payload[0]`` seconds, then answer ``payload[1]``."""
    delay, value = payload
    time.sleep(delay)
    return value
