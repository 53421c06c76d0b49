"""Training data from scored rollouts (HS-STaR step 6) for the classes chosen to train on.

DPO pairs, exactly as the paper's code builds them, per problem: pool its pre- and
re-samples; split into correct and incorrect (ungradeable responses are in neither); rank
each side by process reward (min step score, highest first; a response without steps
ranks last); keep the top ``k = min(#correct, #incorrect)`` of each; shuffle each side
(seeded) and pair them in order, so each response is used once. A pair whose chosen and
rejected texts are identical after stripping whitespace is never emitted.

Optionally (``truncate_rejected_below``, off by default, not in the paper) a rejected
response is cut after its first step whose PRM score is below the threshold, in the spirit
of step-level DPO (Lai et al., 2024, "Step-DPO"). Whole-response DPO pushes down every token
of the rejected response, including the steps after the first mistake that compute
correctly from the wrong value; on the embedded arithmetic task that unlearns arithmetic
(docs/results-tiny.md). The cut keeps the failing step and drops EOS, so the pair
contrasts the chosen continuation with the first mistake only.

SFT / RFT examples (the STaR and rejection-sampling baselines): a problem's correct
responses, best process reward first, distinct texts only, at most
``max_sft_per_problem``.

Which difficulty classes feed training is ``train_classes`` (default: boundary only; any
subset for the paper's pilot study). It is the round's *split*: the class-aware budgets
(``budget.HierarchicalBudget``, ``ProportionalBudget``) re-sample only those classes, so one
key decides both what is re-sampled and what is trained on, as the reference's split
argument does.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from hs_star_pl.infra.errors import check_positive_int
from hs_star_pl.core.records import Difficulty, PreferencePair, Problem, ProblemDifficulty, ScoredRollout, SftExample
from hs_star_pl.core.steps import DEFAULT_STEP_DELIMITER

Objective = Literal["dpo", "sft"]
CLASS_NAMES: tuple[str, ...] = tuple(d.value for d in Difficulty)


@dataclass(frozen=True)
class SelectionConfig:
    """What a round turns into training data.

    Args:
        train_classes: the split: difficulty classes whose problems are re-sampled (by the
            hierarchical and proportional budgets) and feed training; any of ``inlier``,
            ``boundary``, ``outlier`` (paper: ``[boundary]``; the pilot study: one class or
            a union of two).
        objective: ``dpo`` builds preference pairs, ``sft`` builds RFT-style examples.
        max_sft_per_problem: cap on SFT examples per problem (``objective: sft``).
        min_chosen_prm: when set, a correct response is eligible as *chosen* (or as an SFT
            example) only if its process reward (min step score) is at least this. The
            paper's rule (unset) uses the PRM only to rank; with a weak policy many correct
            answers are reached through wrong steps, and pairs then reward those steps.
        truncate_rejected_below: when set, a rejected response is cut after its first step
            whose PRM score is below this (module docstring); unset trains on whole responses
            as the paper does. A rejected response with no such step stays whole.
        max_examples: when set, a round keeps at most this many of its pairs (or SFT examples):
            the first ones of the selection's seeded shuffle, i.e. a seeded uniform subsample
            over all of the round's examples. With one epoch per iteration the number of
            examples sets the number of optimizer steps, so this compares allocators at the
            same number of updates (``experiments.compare --match-examples-to``). Unset keeps all.
    """

    train_classes: tuple[str, ...] = ("boundary",)
    objective: Objective = "dpo"
    max_sft_per_problem: int = 4
    min_chosen_prm: float | None = None
    truncate_rejected_below: float | None = None
    max_examples: int | None = None

    def __post_init__(self) -> None:
        classes = tuple(self.train_classes)
        if not classes:
            raise ValueError(f"selection.train_classes must name at least one of {list(CLASS_NAMES)}")
        unknown = [c for c in classes if c not in CLASS_NAMES]
        if unknown:
            raise ValueError(f"selection.train_classes: unknown class {unknown}; valid: {list(CLASS_NAMES)}")
        object.__setattr__(self, "train_classes", classes)
        if self.objective not in ("dpo", "sft"):
            raise ValueError(f"selection.objective must be 'dpo' or 'sft', got {self.objective!r}")
        if self.max_sft_per_problem < 1:
            raise ValueError(f"selection.max_sft_per_problem must be >= 1, got {self.max_sft_per_problem}")
        if self.min_chosen_prm is not None and not 0.0 <= self.min_chosen_prm <= 1.0:
            raise ValueError(f"selection.min_chosen_prm must be in [0, 1], got {self.min_chosen_prm}")
        if self.truncate_rejected_below is not None and not 0.0 < self.truncate_rejected_below <= 1.0:
            raise ValueError(
                f"selection.truncate_rejected_below must be in (0, 1], got {self.truncate_rejected_below}"
            )
        check_positive_int(self.max_examples, "selection.max_examples", or_null=True)


def _by_reward(rollouts: Iterable[ScoredRollout]) -> list[ScoredRollout]:
    """Highest min-step score first; no score last; ties keep the sample order."""
    return sorted(
        rollouts,
        key=lambda r: (r.prm_min is None, -(r.prm_min or 0.0), r.rollout.sample_index),
    )


def _eligible_chosen(r: ScoredRollout, min_chosen_prm: float | None) -> bool:
    if r.correct is not True:
        return False
    return min_chosen_prm is None or (r.prm_min is not None and r.prm_min >= min_chosen_prm)


def cut_after_first_failure(
    r: ScoredRollout, threshold: float, delimiter: str = DEFAULT_STEP_DELIMITER
) -> str | None:
    """``r``'s text up to the end of its first step scoring below ``threshold``.

    ``None`` when no step fails or the failing step is the last one (nothing to cut). The
    steps are the non-empty ``delimiter``-separated blocks the PRM scored
    (``hs_star_pl.core.steps.split_steps``); the text before the cut is kept verbatim.

    >>> from hs_star_pl.core.records import Rollout, RolloutScore, Phase
    >>> r = ScoredRollout(Rollout("p", 0, Phase.PRESAMPLE, "a\\n\\nb\\n\\n\\n\\nc\\n\\nd"), RolloutScore(False, (1, 1, 0, 0)))
    >>> cut_after_first_failure(r, 0.5)
    'a\\n\\nb\\n\\n\\n\\nc'
    """
    scores = r.score.step_scores
    first = next((i for i, v in enumerate(scores) if v < threshold), None)
    if first is None or first == len(scores) - 1:
        return None
    blocks = r.text.split(delimiter)
    steps = [i for i, block in enumerate(blocks) if block.strip()]  # the blocks split_steps keeps
    if len(steps) != len(scores):
        return None  # scored with another delimiter: leave it whole
    return delimiter.join(blocks[: steps[first] + 1]).rstrip()


def build_pairs_for_problem(
    prompt: str,
    rollouts: Sequence[ScoredRollout],
    rng: random.Random,
    min_chosen_prm: float | None = None,
    truncate_rejected_below: float | None = None,
    step_delimiter: str = DEFAULT_STEP_DELIMITER,
) -> list[PreferencePair]:
    """The DPO pairs of one problem (rule in the module docstring).

    >>> from hs_star_pl.core.records import Rollout, RolloutScore, Phase
    >>> def r(i, ok, s): return ScoredRollout(Rollout("p", i, Phase.PRESAMPLE, f"t{i}"), RolloutScore(ok, (s,)))
    >>> pairs = build_pairs_for_problem("Q", [r(0, True, .9), r(1, True, .2), r(2, False, .7), r(3, None, .8)], random.Random(0))
    >>> [(p.chosen, p.rejected) for p in pairs]
    [('t0', 't2')]
    """
    correct = _by_reward(r for r in rollouts if _eligible_chosen(r, min_chosen_prm))
    wrong = _by_reward(r for r in rollouts if r.correct is False)
    k = min(len(correct), len(wrong))
    if k == 0:
        return []
    chosen, rejected = correct[:k], wrong[:k]
    rng.shuffle(chosen)
    rng.shuffle(rejected)
    pairs = []
    for c, w in zip(chosen, rejected):
        cut = None if truncate_rejected_below is None else cut_after_first_failure(w, truncate_rejected_below, step_delimiter)
        rejected_text = w.text if cut is None else cut
        if c.text.strip() == rejected_text.strip():
            continue
        pairs.append(
            PreferencePair(
                problem_id=c.problem_id,
                prompt=prompt,
                chosen=c.text,
                rejected=rejected_text,
                chosen_key=c.rollout.key,
                rejected_key=w.rollout.key,
                chosen_score=c.prm_min,
                rejected_score=w.prm_min,
                rejected_cut=cut is not None,
            )
        )
    return pairs


def build_sft_for_problem(
    prompt: str, rollouts: Sequence[ScoredRollout], max_per_problem: int, min_chosen_prm: float | None = None
) -> list[SftExample]:
    """Distinct correct responses, best process reward first, at most ``max_per_problem``."""
    out: list[SftExample] = []
    seen: set[str] = set()
    for r in _by_reward(r for r in rollouts if _eligible_chosen(r, min_chosen_prm)):
        key = r.text.strip()
        if key in seen:
            continue
        seen.add(key)
        out.append(SftExample(problem_id=r.problem_id, prompt=prompt, response=r.text, score=r.prm_min))
        if len(out) == max_per_problem:
            break
    return out


def select_training_data(
    problems: Sequence[Problem],
    rollouts: Iterable[ScoredRollout],
    difficulties: Mapping[str, ProblemDifficulty],
    config: SelectionConfig,
    render_prompt: Callable[[Problem], str],
    seed: int,
    step_delimiter: str = DEFAULT_STEP_DELIMITER,
) -> list[PreferencePair] | list[SftExample]:
    """Pairs (``objective: dpo``) or SFT examples (``sft``) from the problems in ``train_classes``.

    Problems are visited in the order given; the result is one seeded shuffle of all
    examples, so a training epoch does not see one problem's pairs back to back.
    """
    wanted = set(config.train_classes)
    grouped: dict[str, list[ScoredRollout]] = defaultdict(list)
    for r in rollouts:
        grouped[r.problem_id].append(r)
    rng = random.Random(f"{seed}:selection")
    examples: list = []
    for problem in problems:
        d = difficulties.get(problem.id)
        if d is None or d.difficulty.value not in wanted:
            continue
        prompt = render_prompt(problem)
        if config.objective == "dpo":
            examples.extend(
                build_pairs_for_problem(
                    prompt, grouped[problem.id], rng, config.min_chosen_prm, config.truncate_rejected_below,
                    step_delimiter,
                )
            )
        else:
            examples.extend(
                build_sft_for_problem(prompt, grouped[problem.id], config.max_sft_per_problem, config.min_chosen_prm)
            )
    rng.shuffle(examples)
    return examples


def cap_examples(examples: Sequence, max_examples: int | None) -> list:
    """The first ``max_examples`` of ``examples`` (all of them when ``None`` or fewer).

    ``select_training_data`` returns one seeded shuffle of the round's examples, so its first
    ``n`` are a seeded uniform subsample: every problem keeps about its share of the pairs.

    >>> cap_examples(["a", "b", "c"], 2), cap_examples(["a"], 2), cap_examples(["a", "b"], None)
    (['a', 'b'], ['a'], ['a', 'b'])
    """
    return list(examples) if max_examples is None else list(examples[:max_examples])
