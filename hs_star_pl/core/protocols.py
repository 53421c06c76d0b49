"""The three interfaces a round talks to: a rollout engine, an answer verifier and a PRM.

Each is a one- or two-method ``typing.Protocol``; implementations are chosen in YAML with
``class_path``. They deal in plain strings and records: the engines get their model from the
caller, and nothing here knows about Lightning or DeepSpeed.

Between rounds the self-training loop also hands an engine the current policy M_t and lets it
free memory during training: that contract is :class:`EngineLifecycle`, a base class whose
defaults do nothing, so an engine that only implements ``generate`` needs none of it. A PRM
with weights frees its memory the same way by subclassing :class:`Offloadable`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one generation call.

    Attributes:
        temperature: softmax temperature (0 means greedy).
        top_p: nucleus sampling mass.
        max_new_tokens: generation cap per response.
        stop: strings that end a response (not included in the returned text).
        seed: base seed; engines must be deterministic for a fixed seed on CPU.
    """

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        # NaN passes "< 0" (and would make sampling silently greedy): finite first.
        if not math.isfinite(self.temperature):
            raise ValueError(f"sampling.temperature must be a finite number, got {self.temperature}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class GenerationRequest:
    """Ask for ``n`` samples of ``prompt``; results come back under ``key``."""

    key: str
    prompt: str
    n: int


@dataclass(frozen=True)
class Completion:
    """One generated response."""

    text: str
    finish_reason: str = "stop"
    n_tokens: int = 0


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates responses. Counts differ per prompt: that is what reallocation means.

    Engines that take the policy from the training loop also subclass :class:`EngineLifecycle`.
    """

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams
    ) -> dict[str, list[Completion]]:
        """Return exactly ``request.n`` completions under each ``request.key``.

        Callers match results by key, never by order; a request with ``n == 0`` may be
        omitted from the result.
        """
        ...


class Offloadable:
    """A component holding model weights that the loop moves out of the way between rounds.

    After each round's sampling and scoring the self-training loop calls :meth:`sleep` on
    the engine and on the PRM when they subclass this, so that DPO training gets their
    accelerator memory back; :meth:`wake_up` undoes it (an engine's is called before the
    next round samples; a PRM wakes itself on its next ``score`` call, so a resumed round
    whose scores are on disk never brings it back). The defaults do nothing.
    ``seconds_waking`` is the time spent waking so far, which the loop records per round.
    """

    seconds_waking: float = 0.0

    def wake_up(self) -> None:
        """Get ready to run (undo :meth:`sleep`)."""

    def sleep(self) -> None:
        """Give memory back for training until the next :meth:`wake_up`."""


class EngineLifecycle(Offloadable):
    """What the self-training loop does with an engine around each round, with no-op defaults.

    Once per iteration, before round t samples, the loop calls :meth:`wake_up` and then hands
    the engine the policy M_t in one of three ways, chosen by the engine:

    - ``in_process = True`` (``HFEngine``): :meth:`bind` gives it the trainer's model and
      tokenizer by reference; nothing is copied.
    - ``sync_from == "export"`` (an engine with its own copy, e.g. ``VLLMEngine``):
      :meth:`load_from_dir` on the HF folder holding M_t (``model.model_path`` for t=0, the
      run's export of iteration t-1 after that); when there is none (t=0 with
      ``model.tiny``), :meth:`sync_weights` instead.
    - otherwise (``sync_from == "weights"``): :meth:`sync_weights` with the full weights,
      streamed one parameter at a time (under ZeRO-3 every rank calls it, in lockstep);
      except that an engine that has not :attr:`started` starts on M_t's HF folder
      (:meth:`load_from_dir`) when every rank has one.

    After the round's sampling it calls :meth:`sleep`, so training gets the memory back.
    ``load_from_dir`` and ``sync_weights`` return the engine's log-prob check against the
    trainer's model (anything with ``mean_abs_diff`` and ``max_abs_diff``, recorded in the
    round's summary) or ``None``.

    Subclass it and override what your engine needs; an engine that does not subclass it is
    treated as having none of it (see :func:`lifecycle_of`). Nothing here imports torch.
    """

    in_process: ClassVar[bool] = False
    sync_from: Literal["weights", "export"] = "weights"

    @property
    def started(self) -> bool:
        """Whether the engine serves weights already. One that has not (``VLLMEngine`` with no
        ``model_path`` before its first round) is started on the HF folder of M_t through
        :meth:`load_from_dir` when the run has one, whatever ``sync_from`` says: started from
        streamed weights it would first have to write them to a folder of its own."""
        return True

    def bind(self, model: Any, tokenizer: Any) -> Any:
        """Sample from ``model`` itself (kept by reference); called when ``in_process``."""

    def load_from_dir(self, path: str | Path, reference_model: Any = None) -> Any:
        """Serve the HF export in ``path``; compare log-probs with ``reference_model`` when given."""
        return None

    def sync_weights(self, model: Any, *, weights: Iterable[tuple[str, Any]] | None = None,
                     tokenizer: Any = None) -> Any:
        """Take ``weights`` (``(name, full tensor)`` pairs, consumed once) of ``model`` into the engine."""
        return None

    def check_world(self, world_size: int) -> None:
        """Raise ``ConfigError`` (at setup) when the engine cannot run in ``world_size`` training processes."""


def lifecycle_of(engine: object) -> EngineLifecycle:
    """``engine`` itself when it declares a lifecycle, else the do-nothing one.

    >>> class Fixed:  # samples from whatever it was built with
    ...     def generate(self, requests, params): return {}
    >>> lifecycle_of(Fixed()).sync_weights(model=None) is None
    True
    """
    return engine if isinstance(engine, EngineLifecycle) else EngineLifecycle()


@runtime_checkable
class AnswerVerifier(Protocol):
    """Checks final answers against gold answers."""

    def verify(self, responses: Sequence[str], golds: Sequence[str]) -> list[bool | None]:
        """``True``/``False`` per (response, gold); ``None`` when it cannot be graded."""
        ...

    def check_golds(self, golds: Sequence[str]) -> list[bool]:
        """Whether each gold answer can be parsed; a problem whose gold cannot is dropped."""
        ...


@dataclass(frozen=True)
class StepScoringRequest:
    """One response for the PRM: the question, its steps, and the answer check's verdict.

    ``correct`` is there for outcome-only scorers (the accuracy-only ablation); learned PRMs
    ignore it. ``response`` is the raw text the steps were split from, for a PRM that must
    see what splitting drops (blank blocks, whitespace around steps) to build its input the
    way its reference implementation does (``SkyworkPRM`` in ``input_mode="reference"``);
    ``None`` when the caller only has the steps.
    """

    question: str
    steps: tuple[str, ...]
    correct: bool | None = None
    response: str | None = None


@runtime_checkable
class StepDelimited(Protocol):
    """A component that splits responses into steps itself, so its delimiter must be the run's.

    The self-training loop resolves the run's delimiter once, when the fit is set up, and asks
    each such component whether it agrees; a disagreement stops the fit there, naming both keys,
    instead of at the first scored response.
    """

    def step_delimiter_error(self, delimiter: str) -> str | None:
        """``None`` when this component splits on ``delimiter``; else why not, naming its key."""
        ...


@runtime_checkable
class ProcessRewardModel(Protocol):
    """Scores every step of a response.

    One that holds model weights may also subclass :class:`Offloadable`: the loop then puts
    it to sleep after each round, and it wakes on its next ``score`` call.
    """

    def score(self, requests: Sequence[StepScoringRequest]) -> list[list[float]]:
        """One score in [0, 1] per step, ``len(result[i]) == len(requests[i].steps)``."""
        ...
