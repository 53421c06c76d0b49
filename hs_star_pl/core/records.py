"""Plain records that flow through one HS-STaR round.

Everything here is a frozen dataclass of builtins so it can be written to JSONL, compared in
tests and passed between ranks without torch. Vocabulary (paper -> ours):

* *pre-sample* (``Phase.PRESAMPLE``): the first ``n_presample`` responses per problem, used to
  estimate difficulty.
* *re-sample* (``Phase.RESAMPLE``): the reallocated rest of the budget.
* difficulty classes: the paper's *inlier* (too easy; "simple" in the reference code),
  *boundary* ("middle") and *outlier* (too hard; "hard").
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union


_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8_safe(text: str) -> str:
    r"""``text`` with every lone surrogate replaced by U+FFFD, so it always encodes as UTF-8.

    Engines built on tokenizers never produce one, but the engine protocol only promises a
    ``str``; a single lone surrogate made writing the round's JSONL raise UnicodeEncodeError.

    >>> utf8_safe("7\ud800") == "7\ufffd"
    True
    """
    return _SURROGATE.sub("\ufffd", text)


class Phase(str, enum.Enum):
    """Which sampling phase produced a rollout."""

    PRESAMPLE = "presample"
    RESAMPLE = "resample"
    ORACLE = "oracle"  # difficulty.oracle_samples: classifies only; neither counted nor trained on


class Difficulty(str, enum.Enum):
    """Difficulty class of a problem for the current policy.

    ``INLIER``: too easy (all pre-samples right and confident PRM), ``OUTLIER``: too hard
    (all wrong and low PRM), ``BOUNDARY``: everything else; the paper's learning frontier.
    """

    INLIER = "inlier"
    BOUNDARY = "boundary"
    OUTLIER = "outlier"


GoldText = Union[str, tuple[str, ...]]
"""A problem's gold answer: one text, or a tuple of acceptable alternatives."""


@dataclass(frozen=True)
class Problem:
    """One math problem.

    Attributes:
        id: stable identifier (from the data file, else a content hash; see ``problems``).
        question: the problem statement shown to the policy.
        answer: the gold final answer as text (e.g. ``"42"``, ``"\\frac{1}{2}"``), or a
            tuple of acceptable alternatives (any one is right).
        solution: an optional reference solution (steps separated by the step delimiter),
            used by step-wise initialization.
        metadata: anything else from the source row (source, level, subject, ...).
    """

    id: str
    question: str
    answer: GoldText
    solution: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer if isinstance(self.answer, str) else list(self.answer),
            "solution": self.solution,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> Problem:
        return cls(
            id=row["id"],
            question=row["question"],
            answer=row["answer"] if isinstance(row["answer"], str) else tuple(row["answer"]),
            solution=row.get("solution"),
            metadata=dict(row.get("metadata") or {}),
        )


@dataclass(frozen=True)
class Rollout:
    """One sampled response to a problem.

    Attributes:
        problem_id: the ``Problem.id`` it answers.
        sample_index: 0-based index, unique per problem within a round: pre-samples take
            ``0..n_presample-1`` and re-samples continue after them.
        phase: the sampling phase that produced it.
        text: the response text (untrusted model output).
        finish_reason: ``"stop"`` (EOS or a stop string) or ``"length"`` (hit max tokens).
        n_tokens: number of generated tokens.
    """

    problem_id: str
    sample_index: int
    phase: Phase
    text: str
    finish_reason: str = "stop"
    n_tokens: int = 0

    @property
    def key(self) -> str:
        return f"{self.problem_id}#{self.sample_index}"


@dataclass(frozen=True)
class RolloutScore:
    """The two signals HS-STaR reads from a response.

    Attributes:
        correct: ``True``/``False`` from the answer check, ``None`` when it could not be
            graded (timeout, unparseable answer). ``None`` is never counted as wrong.
        step_scores: PRM score in [0, 1] for each step of the response, in order.
    """

    correct: bool | None
    step_scores: tuple[float, ...] = ()

    @property
    def prm_min(self) -> float | None:
        """Process reward of the response: the minimum step score, ``None`` with no steps."""
        return min(self.step_scores) if self.step_scores else None


@dataclass(frozen=True)
class ScoredRollout:
    """A rollout with its scores; the unit written to ``rollouts.jsonl``."""

    rollout: Rollout
    score: RolloutScore

    @property
    def problem_id(self) -> str:
        return self.rollout.problem_id

    @property
    def text(self) -> str:
        return self.rollout.text

    @property
    def correct(self) -> bool | None:
        return self.score.correct

    @property
    def prm_min(self) -> float | None:
        return self.score.prm_min

    def to_dict(self) -> dict[str, Any]:
        r, s = self.rollout, self.score
        return {
            "problem_id": r.problem_id,
            "sample_index": r.sample_index,
            "phase": r.phase.value,
            "text": r.text,
            "finish_reason": r.finish_reason,
            "n_tokens": r.n_tokens,
            "correct": s.correct,
            "step_scores": list(s.step_scores),
        }

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> ScoredRollout:
        return cls(
            Rollout(
                problem_id=row["problem_id"],
                sample_index=int(row["sample_index"]),
                phase=Phase(row["phase"]),
                text=row["text"],
                finish_reason=row.get("finish_reason", "stop"),
                n_tokens=int(row.get("n_tokens", 0)),
            ),
            RolloutScore(
                correct=row.get("correct"),
                step_scores=tuple(float(x) for x in row.get("step_scores", ())),
            ),
        )


@dataclass(frozen=True)
class ProblemDifficulty:
    """Difficulty estimate of one problem from its pre-samples.

    Attributes:
        problem_id: the problem.
        phi_a: mean correctness over *gradeable* pre-samples; ``None`` if none was gradeable.
        phi_r: mean over pre-samples of the minimum step score; ``None`` if no pre-sample
            had a step.
        difficulty: the class assigned by ``difficulty.estimate_difficulty``.
        n_samples: pre-samples seen; n_gradeable of them had a verdict.
    """

    problem_id: str
    phi_a: float | None
    phi_r: float | None
    difficulty: Difficulty
    n_samples: int
    n_gradeable: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem_id": self.problem_id,
            "phi_a": self.phi_a,
            "phi_r": self.phi_r,
            "difficulty": self.difficulty.value,
            "n_samples": self.n_samples,
            "n_gradeable": self.n_gradeable,
        }

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> ProblemDifficulty:
        return cls(
            problem_id=row["problem_id"],
            phi_a=row.get("phi_a"),
            phi_r=row.get("phi_r"),
            difficulty=Difficulty(row["difficulty"]),
            n_samples=int(row["n_samples"]),
            n_gradeable=int(row["n_gradeable"]),
        )


@dataclass(frozen=True)
class PreferencePair:
    """A DPO training pair: a correct (chosen) and an incorrect (rejected) response.

    ``ref_chosen_logp``/``ref_rejected_logp`` are the reference model's summed response
    log-probabilities, filled in before training (``None`` until then). ``rejected_cut`` is
    true when ``rejected`` is a prefix of the sampled response, cut after its first failing
    step (``selection.truncate_rejected_below``); it is then encoded without EOS.
    """

    problem_id: str
    prompt: str
    chosen: str
    rejected: str
    chosen_key: str
    rejected_key: str
    chosen_score: float | None = None
    rejected_score: float | None = None
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None
    rejected_cut: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> PreferencePair:
        # a key absent from the row takes its field's default (rounds written before
        # ``rejected_cut`` existed have none)
        return cls(**{k: row[k] for k in cls.__dataclass_fields__ if k in row})


@dataclass(frozen=True)
class SftExample:
    """A supervised (prompt, response) example: step-wise init or an RFT/STaR baseline."""

    problem_id: str
    prompt: str
    response: str
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> SftExample:
        return cls(**{k: row.get(k) for k in cls.__dataclass_fields__})


def mean_or_none(values: list[float]) -> float | None:
    """Arithmetic mean, ``None`` for an empty list (never a silent 0)."""
    return math.fsum(values) / len(values) if values else None
