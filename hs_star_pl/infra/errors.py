"""Errors a user can act on: bad configuration, bad input files, a run stopped on purpose.

Each carries a complete message (the config key, or ``file:line``, and what to change). The
``hs-star`` command prints such an error as ``hs-star: error: <message>`` and exits with
status 2 (bad config or input) or 1 (a run stopped), without a traceback; anything else is a
bug and keeps its traceback. All of them subclass the builtin a Python caller would expect
(``ValueError``, ``RuntimeError``, ``FloatingPointError``), so ``except ValueError`` still works.

Stdlib only: the pure core (``core.problems``, ``core.artifacts``) raises these too.
"""

from __future__ import annotations


class HSStarError(Exception):
    """Base of the errors ``hs-star`` reports as one message; ``exit_code`` is the process status."""

    exit_code = 1


class ConfigError(HSStarError, ValueError):
    """A configuration value is wrong; the message names the full config key."""

    exit_code = 2


class InputFileError(HSStarError, ValueError):
    """An input file (problems, training examples, a round artifact) is unusable; the message names ``file:line``."""

    exit_code = 2


class StorageError(HSStarError, OSError):
    """A write failed because the disk is full or the folder is not writable; the message names where.

    Built by ``hs_star_pl.infra.storage.storage_error`` from the ``OSError`` (or the library error
    that hides one) of the failed write.
    """

    exit_code = 2


class EmptyRoundError(HSStarError, RuntimeError):
    """A round produced no training examples and ``self_training.on_empty_round`` is ``error``."""


class NonFiniteLossError(HSStarError, FloatingPointError):
    """The training loss or gradients became NaN/inf and ``model.nonfinite_loss`` is ``raise``."""


def check_positive_int(value: object, key: str, *, or_null: bool = False) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``value`` is an int >= 1 (a bool is not), or
    ``None`` when ``or_null``.

    >>> check_positive_int(None, "budget.pair_cap", or_null=True)
    >>> check_positive_int(True, "budget.pair_cap", or_null=True)
    Traceback (most recent call last):
    ValueError: budget.pair_cap must be a positive integer or null, got True
    """
    if value is None and or_null:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer{' or null' if or_null else ''}, got {value!r}")
