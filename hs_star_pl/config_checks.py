"""Checks over the whole parsed configuration, before any class is built.

Constructors validate their own arguments, but a few mistakes slip between them:

* a NaN or infinite float (YAML ``.nan``/``.inf``, ``--key=.nan``): ``nan > 0`` is false, so
  NaN passes every ``must be > 0`` check and turns into silent misbehaviour (a NaN sampling
  temperature made sampling greedy). No setting of hs-star or Lightning takes a non-finite
  float, so every float key refuses them, named by its full key;
* values handed to a library that rejects them without naming the key (a negative learning
  rate: torch's ``Invalid learning rate``);
* keys that are copies of another (``export.epochs_per_iteration`` follows
  ``self_training.epochs_per_iteration``): an error about the copy names the key the user set.

Stdlib only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

from hs_star_pl.errors import ConfigError

# target -> source of the CLI's ``link_arguments``: the user sets the source only.
LINKS: dict[str, str] = {
    "export.epochs_per_iteration": "self_training.epochs_per_iteration",
    "evaluation.epochs_per_iteration": "self_training.epochs_per_iteration",
}


def walk(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of a nested config as ``(dotted key, value)``; list items as ``key[i]``."""
    if isinstance(value, Mapping):
        for name, item in value.items():
            yield from walk(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from walk(item, f"{key}[{i}]")
    else:
        yield key, value


def check_config(config: Mapping[str, Any]) -> None:
    """Refuse non-finite floats anywhere and a negative learning rate (all problems at once).

    >>> check_config({"model": {"beta": float("nan")}, "self_training": {"sampling": {"temperature": 0.7}}})
    Traceback (most recent call last):
    ...
    hs_star_pl.errors.ConfigError: model.beta must be a finite number, got nan
    """
    leaves = dict(walk(config))
    errors = [f"{key} must be a finite number, got {value}" for key, value in leaves.items()
              if isinstance(value, float) and not math.isfinite(value)]
    lr = leaves.get("model.optimizer.init_args.lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr < 0:
        errors.append(f"model.optimizer.init_args.lr must be >= 0, got {lr}")
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError("configuration:\n  - " + "\n  - ".join(errors))


def name_link_sources(message: str) -> str:
    """Rewrite a linked key in an error message to the key the user sets.

    >>> name_link_sources("export.epochs_per_iteration must be >= 1, got 0")
    'self_training.epochs_per_iteration must be >= 1, got 0'
    """
    for target, source in LINKS.items():
        message = re.sub(rf"(?<![\w.]){re.escape(target)}(?![\w])", source, message)
    return message
