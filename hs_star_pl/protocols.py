"""The three interfaces a round talks to: a rollout engine, an answer verifier and a PRM.

Each is a one- or two-method ``typing.Protocol``; implementations are chosen in YAML with
``class_path`` and share no base class. They deal in plain strings and records: the engines
get their model from the caller, and nothing here knows about Lightning or DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


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
    """Generates responses. Counts differ per prompt: that is what reallocation means."""

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams
    ) -> dict[str, list[Completion]]:
        """Return exactly ``request.n`` completions under each ``request.key``.

        Callers match results by key, never by order; a request with ``n == 0`` may be
        omitted from the result.
        """
        ...


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
class ProcessRewardModel(Protocol):
    """Scores every step of a response."""

    def score(self, requests: Sequence[StepScoringRequest]) -> list[list[float]]:
        """One score in [0, 1] per step, ``len(result[i]) == len(requests[i].steps)``."""
        ...
