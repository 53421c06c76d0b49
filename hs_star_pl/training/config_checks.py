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

``self_training_errors`` checks the keys that must agree across the trainer, the model, the
data and the self-training loop once they are built (``SelfTrainingCallback.setup``).

No torch or lightning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from hs_star_pl.core.iterations import IterationClock
from hs_star_pl.core.records import Problem
from hs_star_pl.infra.errors import ConfigError
from hs_star_pl.training.policy import Policy, context_length

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
    hs_star_pl.infra.errors.ConfigError: model.beta must be a finite number, got nan
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


def self_training_errors(
    *,
    n_iterations: int,
    epochs_per_iteration: int,
    max_epochs: int | None,
    reload_dataloaders_every_n_epochs: int,
    model_objective: str | None,
    selection_objective: str,
    data: Mapping[str, Any] | None,
    step_delimiter_error: str | None,
    engine_sync_from: str,
    export_enabled: bool,
) -> list[str]:
    """What stops a self-training fit from starting, one message per problem, naming the keys.

    Checked when the fit is set up, from the built trainer, module and data module.
    ``data`` holds the data module's ``train_file``, ``problems_file`` and ``template``, or is
    ``None`` when the data module cannot take examples from the loop (not ``MathDataModule``).
    ``step_delimiter_error`` is why the run's step delimiter cannot be resolved, or why a
    component that splits steps itself disagrees with it (``None``: no problem).

    >>> self_training_errors(n_iterations=2, epochs_per_iteration=1, max_epochs=3, reload_dataloaders_every_n_epochs=1,
    ...     model_objective="dpo", selection_objective="dpo", data=None, step_delimiter_error=None,
    ...     engine_sync_from="weights", export_enabled=False)  # doctest: +NORMALIZE_WHITESPACE
    ['trainer.max_epochs (3) must equal self_training.n_iterations (2) x self_training.epochs_per_iteration (1) = 2',
     'self-training needs MathDataModule as the data module']
    """
    errors = []
    if reload_dataloaders_every_n_epochs != 1:
        errors.append(
            "trainer.reload_dataloaders_every_n_epochs must be 1 (each epoch trains on its "
            f"iteration's data), got {reload_dataloaders_every_n_epochs}"
        )
    expected = IterationClock(epochs_per_iteration).max_epochs(n_iterations)
    if max_epochs != expected:
        errors.append(
            f"trainer.max_epochs ({max_epochs}) must equal self_training.n_iterations "
            f"({n_iterations}) x self_training.epochs_per_iteration ({epochs_per_iteration}) = {expected}"
        )
    if model_objective != selection_objective:
        errors.append(
            f"model.objective ({model_objective!r}) must match self_training.selection.objective "
            f"({selection_objective!r})"
        )
    if data is None:
        errors.append("self-training needs MathDataModule as the data module")
    else:
        if data["train_file"] is not None or data["problems_file"] is not None:
            errors.append("data.train_file and data.problems_file must be unset: self-training makes its own data")
    if step_delimiter_error is not None:
        errors.append(step_delimiter_error)
    if engine_sync_from == "export" and not export_enabled:
        errors.append("self_training.engine.init_args.sync_from=export reloads the HF export of each "
                      "iteration: set export.enabled: true, or use sync_from: weights")
    return errors


def long_prompts_warning(problems: Sequence[Problem], policy: Policy, render: Callable[[str], str], max_new_tokens: int,
                         problems_file: str | None) -> str | None:
    """A warning when prompts leave no room in the policy's context for ``max_new_tokens``.

    ``render`` turns a question into its prompt (``MathDataModule.render_prompt``).

    The context is ``policy.model.config.max_position_embeddings``; without it there is
    nothing to check. Such a problem cannot be
    read whole and answered, yet is sampled like any other; usually the wrong field was taken
    as the question, or the model is not the intended one. Only prompts whose UTF-8 length
    could exceed the room are tokenized (a token covers at least one byte).
    """
    context = context_length(policy)
    if context is None:
        return None
    room = context - max_new_tokens
    prompts = {p.id: render(p.question) for p in problems}
    maybe = [pid for pid, text in prompts.items() if len(text.encode("utf-8")) + 8 > room]
    if not maybe:
        return None
    lengths = dict(zip(maybe, (len(ids) for ids in policy.tokenizer([prompts[pid] for pid in maybe])["input_ids"])))
    over = {pid: n for pid, n in lengths.items() if n > room}
    if not over:
        return None
    worst = max(over, key=over.get)
    return (
        f"{len(over)} of the {len(problems)} problems in self_training.problems_file={problems_file} have prompts "
        f"longer than the policy's context ({context} tokens, max_position_embeddings) leaves for "
        f"self_training.sampling.max_new_tokens ({max_new_tokens}); the longest, problem {worst!r}, is "
        f"{over[worst]} tokens. They cannot be read whole and answered: check the question field "
        f"(self_training.problem_fields.question_key) and the model"
    )
