"""One HS-STaR iteration's sampling plan, as a pure function over three protocols.

``run_round`` performs, in order: drop problems whose gold cannot be graded -> pre-sample
``n_presample`` responses per problem -> verify + PRM-score them -> estimate difficulty ->
allocate the rest of the budget to the split -> re-sample -> verify + score -> select
training data from the split. The split is ``selection.train_classes`` (boundary for
HS-STaR; one class or a union of two for the paper's pilot study): the same classes are
re-sampled and trained on. It returns a ``RoundResult`` with everything the artifacts and
the training step need.

Resumability: the two expensive phases (generating, then scoring, each of pre- and
re-samples) go through an optional ``PhaseStore``. A phase found in the store is read back,
not redone; the cheap decisions in between are recomputed, deterministically, from the
same seed. The Lightning callback supplies a store backed by the round folder; tests use
``MemoryStore``.

Sharding across ranks: with ``shard=(rank, world_size)`` each rank generates and scores only
its slice of the problems (``sample_and_score`` is the per-rank unit, any subset with any
counts), the scored rollouts are all-gathered (``gather``), and everything else is a cheap
function of the gathered whole. The decisions (which problems are gradeable, difficulty and
budget, the training examples) are computed on every rank and then, given ``broadcast``,
replaced by rank 0's, so ranks can never act on different decisions (a verifier timeout on
one rank, say, would otherwise shift the shards).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from hs_star_pl.infra import faults
from hs_star_pl.core.budget import BudgetAllocator, BudgetLedger, SequentialBudget
from hs_star_pl.core.difficulty import DifficultyConfig, DifficultyThresholds, count_by_class, estimate_difficulty
from hs_star_pl.core.protocols import (
    AnswerVerifier,
    GenerationRequest,
    ProcessRewardModel,
    RolloutEngine,
    SamplingParams,
    StepScoringRequest,
)
from hs_star_pl.core.records import (
    Phase,
    PreferencePair,
    Problem,
    ProblemDifficulty,
    Rollout,
    RolloutScore,
    ScoredRollout,
    SftExample,
    mean_or_none,
    utf8_safe,
)
from hs_star_pl.core.selection import SelectionConfig, cap_examples, select_training_data
from hs_star_pl.core.steps import DEFAULT_STEP_DELIMITER, split_steps

log = logging.getLogger(__name__)


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed from a base seed and labels, stable across processes and platforms."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFFFFFF


class PhaseStore(Protocol):
    """Where finished phases of a round are kept (JSON-able values)."""

    def load(self, name: str) -> Any | None:
        """The saved value of phase ``name``, or ``None`` if it has not finished."""
        ...

    def save(self, name: str, value: Any) -> None:
        """Record phase ``name`` as finished with ``value``."""
        ...


@dataclass
class MemoryStore:
    """A ``PhaseStore`` in a dict (tests, notebooks)."""

    phases: dict[str, Any] = field(default_factory=dict)

    def load(self, name: str) -> Any | None:
        return self.phases.get(name)

    def save(self, name: str, value: Any) -> None:
        self.phases[name] = value


@dataclass
class _ShardStore:
    """Keeps one rank's phases apart from the others' (``<phase>.rank<r>``)."""

    store: PhaseStore
    rank: int

    def load(self, name: str) -> Any | None:
        return self.store.load(f"{name}.rank{self.rank}")

    def save(self, name: str, value: Any) -> None:
        self.store.save(f"{name}.rank{self.rank}", value)


Gather = Callable[[list[ScoredRollout]], list[list[ScoredRollout]]]
Broadcast = Callable[[Any], Any]  # returns rank 0's value of its argument on every rank


def _canonical(rollouts: list[ScoredRollout], problems: Sequence[Problem]) -> list[ScoredRollout]:
    """Rollouts in problem order, then sample order: the same for any number of shards."""
    position = {p.id: i for i, p in enumerate(problems)}
    return sorted(rollouts, key=lambda r: (position[r.problem_id], r.rollout.sample_index))


@dataclass(frozen=True)
class RoundConfig:
    """Settings of a round that are not a swappable component.

    Args:
        sampling: temperature, top_p, max_new_tokens, stop strings (paper: T=0.7, top_p=0.95).
        difficulty: classification mode and thresholds.
        selection: which classes train and how (pairs or SFT examples).
        step_delimiter: splits responses into steps for the PRM (paper: a blank line).
    """

    sampling: SamplingParams = SamplingParams()
    difficulty: DifficultyConfig = DifficultyConfig()
    selection: SelectionConfig = SelectionConfig()
    step_delimiter: str = DEFAULT_STEP_DELIMITER


@dataclass
class RoundResult:
    """Everything one round produced. ``summary()`` is what ``summary.json`` holds."""

    iteration: int
    problems: list[Problem]
    dropped: list[str]
    presamples: list[ScoredRollout]
    resamples: list[ScoredRollout]
    difficulties: dict[str, ProblemDifficulty]
    thresholds: DifficultyThresholds
    ledger: BudgetLedger
    examples: list[PreferencePair] | list[SftExample]
    seconds: dict[str, float]
    n_selected: int | None = None  # examples selected before ``selection.max_examples``; None: all kept
    oracle_total: int = 0  # samples drawn only to classify (difficulty.oracle_samples); not in the ledger

    @property
    def rollouts(self) -> list[ScoredRollout]:
        return self.presamples + self.resamples

    def summary(self) -> dict[str, Any]:
        counts = count_by_class(self.difficulties)
        verdicts = [r.correct for r in self.presamples if r.correct is not None]
        rollouts = self.rollouts
        return {
            "iteration": self.iteration,
            "n_problems": len(self.problems),
            "n_dropped_ungradeable": len(self.dropped),
            "n_inlier": counts["inlier"],
            "n_boundary": counts["boundary"],
            "n_outlier": counts["outlier"],
            "samples_presample": self.ledger.presample_total,
            "samples_resample": self.ledger.resample_total,
            "samples_total": self.ledger.total,
            "budget_total": self.ledger.budget_total,
            "samples_per_class": {c: row["total"] for c, row in self.ledger.per_class().items()},
            "budget_note": self.ledger.note,
            "n_pairs": sum(isinstance(e, PreferencePair) for e in self.examples),
            "n_sft_examples": sum(isinstance(e, SftExample) for e in self.examples),
            # what the selection made before selection.max_examples cut it (equal when uncut)
            "n_examples_selected": len(self.examples) if self.n_selected is None else self.n_selected,
            "samples_oracle": self.oracle_total,  # classified from, not counted (difficulty.oracle_samples)
            "presample_accuracy": mean_or_none([1.0 if v else 0.0 for v in verdicts]),
            "ungradeable_responses": sum(r.correct is None for r in rollouts),
            "mean_response_tokens": mean_or_none([float(r.rollout.n_tokens) for r in rollouts]),
            "truncated_responses": sum(r.rollout.finish_reason == "length" for r in rollouts),
            # texts verified and PRM-scored: a text repeated within a problem is scored once
            "distinct_responses": len({(r.problem_id, r.text) for r in rollouts}),
            "tau_low": self.thresholds.tau_low,
            "tau_high": self.thresholds.tau_high,
            "seconds": dict(self.seconds),
        }


@contextmanager
def timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block takes to ``seconds[name]`` (when it finishes without an error)."""
    start = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def generate_rollouts(
    problems: Sequence[Problem],
    counts: Mapping[str, int],
    start_index: Mapping[str, int],
    phase: Phase,
    engine: RolloutEngine,
    render_prompt: Callable[[Problem], str],
    sampling: SamplingParams,
) -> list[Rollout]:
    """Ask the engine for ``counts[id]`` samples of each problem; index them from ``start_index``."""
    requests = [
        GenerationRequest(key=p.id, prompt=render_prompt(p), n=counts.get(p.id, 0))
        for p in problems
        if counts.get(p.id, 0) > 0
    ]
    if not requests:
        return []
    faults.begin("sampling", phase=getattr(phase, "value", phase))
    outputs = engine.generate(requests, sampling)
    rollouts = []
    for req in requests:
        got = outputs.get(req.key, [])
        if len(got) != req.n:
            raise RuntimeError(
                f"{type(engine).__name__} returned {len(got)} completions for problem {req.key!r}, expected {req.n}"
            )
        first = start_index.get(req.key, 0)
        rollouts.extend(
            Rollout(
                problem_id=req.key,
                sample_index=first + i,
                phase=phase,
                text=utf8_safe(c.text),  # model output goes into JSON artifacts
                finish_reason=c.finish_reason,
                n_tokens=c.n_tokens,
            )
            for i, c in enumerate(got)
        )
    return rollouts


def score_rollouts(
    rollouts: Sequence[Rollout],
    problems: Mapping[str, Problem],
    verifier: AnswerVerifier,
    prm: ProcessRewardModel,
    step_delimiter: str = DEFAULT_STEP_DELIMITER,
    seconds: dict[str, float] | None = None,
    prefix: str = "",
    known: Mapping[tuple[str, str], RolloutScore] | None = None,
) -> list[ScoredRollout]:
    """Answer check, then PRM step scores, for every rollout (verdicts go to the PRM too).

    A response text is checked and scored once per problem: rollouts of one problem with the
    same text share the first one's verdict and step scores, and so does a text already in
    ``known`` (``(problem id, text)`` -> score, e.g. the pre-samples' when scoring the
    re-samples). Verifiers and PRMs are deterministic for a given text (a PRM in eval mode,
    up to float noise from how a batch is padded), so only the time changes: in the tiny
    demo's HS-STaR rounds, 38% of the responses repeat a text of the same problem
    (docs/performance.md).
    """
    seconds = seconds if seconds is not None else {}
    if not rollouts:
        return []
    scores: dict[tuple[str, str], RolloutScore] = dict(known or {})
    todo: dict[tuple[str, str], Rollout] = {}
    for r in rollouts:
        key = (r.problem_id, r.text)
        if key not in scores:
            todo.setdefault(key, r)
    unique = list(todo.values())
    faults.begin("checking", phase=prefix.rstrip("_"))
    with timed(seconds, f"{prefix}verify"):
        verdicts = verifier.verify([r.text for r in unique], [problems[r.problem_id].answer for r in unique]) if unique else []
    if len(verdicts) != len(unique):
        raise RuntimeError(f"{type(verifier).__name__} returned {len(verdicts)} verdicts for {len(unique)} responses")
    requests = [
        StepScoringRequest(
            question=problems[r.problem_id].question,
            steps=tuple(split_steps(r.text, step_delimiter)),
            correct=v,
            response=r.text,
        )
        for r, v in zip(unique, verdicts)
    ]
    with timed(seconds, f"{prefix}prm"):
        step_scores = prm.score(requests) if requests else []
    if len(step_scores) != len(requests):
        raise RuntimeError(f"{type(prm).__name__} returned {len(step_scores)} score lists for {len(requests)} responses")
    for (key, r), v, req, got in zip(todo.items(), verdicts, requests, step_scores):
        if len(got) != len(req.steps):
            raise RuntimeError(
                f"{type(prm).__name__} returned {len(got)} step scores for {r.key}, which has {len(req.steps)} steps"
            )
        scores[key] = RolloutScore(correct=v, step_scores=tuple(float(x) for x in got))
    return [ScoredRollout(r, scores[(r.problem_id, r.text)]) for r in rollouts]


def sample_and_score(
    problems: Sequence[Problem],
    counts: Mapping[str, int],
    start_index: Mapping[str, int],
    phase: Phase,
    *,
    engine: RolloutEngine,
    verifier: AnswerVerifier,
    prm: ProcessRewardModel,
    render_prompt: Callable[[Problem], str],
    sampling: SamplingParams,
    step_delimiter: str = DEFAULT_STEP_DELIMITER,
    store: PhaseStore | None = None,
    seconds: dict[str, float] | None = None,
    known: Sequence[ScoredRollout] = (),
    name: str | None = None,
) -> list[ScoredRollout]:
    """Generate then score one phase, reading either half back from ``store`` if finished.

    ``known``: responses scored before (the pre-samples, for the re-sample phase); a new
    response with the same text for the same problem takes their score. ``name``: the
    store's key for this part of the phase (default: the phase), e.g. one wave of re-samples.
    """
    seconds = seconds if seconds is not None else {}
    name = name or phase.value
    if store is not None and (done := store.load(f"{name}_scored")) is not None:
        return [ScoredRollout.from_dict(row) for row in done]
    raw = store.load(f"{name}_generated") if store is not None else None
    if raw is not None:
        rollouts = [ScoredRollout.from_dict(row).rollout for row in raw]
    else:
        with timed(seconds, f"{name}_generate"):
            rollouts = generate_rollouts(problems, counts, start_index, phase, engine, render_prompt, sampling)
        if store is not None:
            # the oracle phase (an experiment) shares the pre-sample fault point and each wave of
            # re-samples the re-sample point, labelled with their name
            point = "presample" if phase is Phase.ORACLE else phase.value
            labels = {} if name == point else {"phase": name}
            with faults.persisting(point, **labels):
                store.save(f"{name}_generated", [ScoredRollout(r, RolloutScore(None)).to_dict() for r in rollouts])
    by_id = {p.id: p for p in problems}
    scored = score_rollouts(rollouts, by_id, verifier, prm, step_delimiter, seconds, prefix=f"{name}_",
                            known={(r.problem_id, r.text): r.score for r in known})
    if store is not None:
        with faults.persisting("prm", phase=name):
            store.save(f"{name}_scored", [r.to_dict() for r in scored])
    return scored


def drop_ungradeable(problems: Sequence[Problem], verifier: AnswerVerifier) -> tuple[list[Problem], list[str]]:
    """Split problems into those whose gold the verifier can parse and the ids of the rest."""
    ok = verifier.check_golds([p.answer for p in problems])
    kept = [p for p, good in zip(problems, ok) if good]
    dropped = [p.id for p, good in zip(problems, ok) if not good]
    for p in problems:
        if p.id in dropped:
            log.warning("problem %s: gold answer %r cannot be parsed; dropped from this round", p.id, p.answer)
    return kept, dropped


def run_round(
    problems: Sequence[Problem],
    *,
    engine: RolloutEngine,
    verifier: AnswerVerifier,
    prm: ProcessRewardModel,
    allocator: BudgetAllocator,
    config: RoundConfig = RoundConfig(),
    render_prompt: Callable[[Problem], str] = lambda p: p.question,
    iteration: int = 0,
    seed: int = 0,
    store: PhaseStore | None = None,
    shard: tuple[int, int] = (0, 1),
    gather: Gather | None = None,
    broadcast: Broadcast | None = None,
) -> RoundResult:
    """Run one iteration's sampling plan (see the module docstring).

    Args:
        problems: this iteration's problems (e.g. ``ProblemPool.draw(iteration)``).
        engine, verifier, prm: the three components.
        allocator: decides pre- and re-sample counts (``HierarchicalBudget`` etc.).
        config: sampling, difficulty, selection and step-delimiter settings.
        render_prompt: problem -> prompt text (the prompt template).
        iteration: 0-based iteration index; with ``seed`` it fixes every random choice.
        seed: the run's base seed.
        store: optional place to keep finished phases for resumption.
        shard: ``(rank, world_size)``: this process samples and scores only
            ``problems[rank::world_size]``; every decision is taken on the gathered whole.
        gather: with ``world_size > 1``, a function that all-gathers a list of rollouts
            from every rank (one list per rank). Decisions then match a one-process run.
        broadcast: with ``world_size > 1``, a function returning rank 0's value of its
            argument; every decision goes through it. Without it each rank keeps its own
            (identical when the verifier and every step are deterministic).
    """
    rank, world_size = shard
    if not 0 <= rank < world_size:
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    if world_size > 1 and gather is None:
        raise ValueError("run_round with world_size > 1 needs a gather function")
    # ``share``: rank 0's value of a decision (every rank computes it, one rank decides)
    share: Broadcast = broadcast if world_size > 1 and broadcast is not None else (lambda value: value)
    seconds: dict[str, float] = {}

    # 1. Drop the problems whose gold answer the verifier cannot parse.
    with timed(seconds, "check_golds"):
        gradeable = drop_ungradeable(problems, verifier)
    problems, dropped = share(gradeable)
    ids = [p.id for p in problems]
    local = problems[rank::world_size]
    common = dict(
        engine=engine,
        verifier=verifier,
        prm=prm,
        render_prompt=render_prompt,
        step_delimiter=config.step_delimiter,
        store=_ShardStore(store, rank) if store is not None and world_size > 1 else store,
        seconds=seconds,
    )

    def everyone(mine: list[ScoredRollout]) -> list[ScoredRollout]:
        merged = [r for part in gather(mine) for r in part] if world_size > 1 else mine
        return _canonical(merged, problems)

    # 2. Pre-sample n_p responses per problem; verify and PRM-score them (this rank's shard).
    presample_params = dataclasses.replace(config.sampling, seed=derive_seed(seed, iteration, "presample"))
    mine = sample_and_score(
        local, {pid: allocator.n_presample for pid in ids}, {}, Phase.PRESAMPLE, sampling=presample_params, **common
    )
    presamples = everyone(mine)

    # 3. Estimate each problem's difficulty from its pre-samples (phi_a, phi_r) and classify it,
    #    or, as an experiment (difficulty.oracle_samples), from extra samples that count for nothing.
    classify_from = presamples
    oracle_total = 0
    if config.difficulty.oracle_samples:
        oracle_params = dataclasses.replace(config.sampling, seed=derive_seed(seed, iteration, "oracle"))
        mine_oracle = sample_and_score(
            local, {pid: config.difficulty.oracle_samples for pid in ids}, {}, Phase.ORACLE, sampling=oracle_params,
            **common,
        )
        classify_from = everyone(mine_oracle)
        oracle_total = len(classify_from)
    with timed(seconds, "difficulty"):
        estimated = estimate_difficulty(classify_from, config.difficulty, ids)
    difficulties, thresholds = share(estimated)

    # 4. Reallocate the rest of the budget to the classes that train (the boundary, for HS-STaR).
    with timed(seconds, "allocate"):
        allocated = allocator.allocate(difficulties, derive_seed(seed, iteration, "budget"), config.selection.train_classes)
    ledger = share(allocated)

    # 5. Re-sample those problems; verify and PRM-score the new responses (in waves, for an
    #    allocator that decides as verdicts come in: SequentialBudget).
    if isinstance(allocator, SequentialBudget):
        resamples, ledger = _resample_in_waves(
            allocator, ledger, presamples, mine, problems, local, seed, iteration, config, everyone, share, common
        )
    else:
        resample_params = dataclasses.replace(config.sampling, seed=derive_seed(seed, iteration, "resample"))
        mine = sample_and_score(
            local, ledger.resample, ledger.presample, Phase.RESAMPLE, sampling=resample_params, known=mine, **common
        )
        resamples = everyone(mine)

    # 6. Select the training data (DPO pairs or SFT examples) from all of the round's responses.
    with timed(seconds, "select"):
        selected = select_training_data(
            problems,
            presamples + resamples,
            difficulties,
            config.selection,
            render_prompt,
            derive_seed(seed, iteration, "selection"),
            config.step_delimiter,
        )
    examples = share(selected)
    kept = cap_examples(examples, config.selection.max_examples)

    return RoundResult(
        iteration=iteration,
        problems=list(problems),
        dropped=dropped,
        presamples=presamples,
        resamples=resamples,
        difficulties=difficulties,
        thresholds=thresholds,
        ledger=ledger,
        examples=kept,
        seconds=seconds,
        n_selected=len(examples),
        oracle_total=oracle_total,
    )


def _resample_in_waves(
    allocator: SequentialBudget,
    ledger: BudgetLedger,
    presamples: list[ScoredRollout],
    mine: list[ScoredRollout],
    problems: Sequence[Problem],
    local: Sequence[Problem],
    seed: int,
    iteration: int,
    config: RoundConfig,
    everyone: Callable[[list[ScoredRollout]], list[ScoredRollout]],
    share: Broadcast,
    common: dict[str, Any],
) -> tuple[list[ScoredRollout], BudgetLedger]:
    """Ask ``allocator`` for one wave at a time, from every problem's verdicts so far; sample it.

    Returns the re-samples of every wave (all ranks') and the ledger with what they spent.
    Each wave has its own sampling seed and store key (``resample_wNNN``), so a killed round
    reads back the waves it finished and goes on from there.
    """
    verdicts: dict[str, list[bool | None]] = {pid: [] for pid in ledger.presample}
    for r in presamples:
        verdicts[r.problem_id].append(r.correct)
    drawn = dict(ledger.presample)
    known = list(mine)
    resamples: list[ScoredRollout] = []
    budget_seed = derive_seed(seed, iteration, "budget")
    for wave in range(allocator.cap * len(drawn) + 1):  # each wave draws at least one sample
        plan = share(allocator.next_wave(verdicts, budget_seed, wave))
        if not plan:
            break
        params = dataclasses.replace(config.sampling, seed=derive_seed(seed, iteration, "resample", wave))
        got = sample_and_score(local, plan, drawn, Phase.RESAMPLE, sampling=params, known=known,
                               name=f"resample_w{wave:03d}", **common)
        known += got
        wave_all = everyone(got)
        for r in wave_all:
            verdicts[r.problem_id].append(r.correct)
        for pid, n in plan.items():
            drawn[pid] += n
        resamples += wave_all
    spent = {pid: drawn[pid] - ledger.presample[pid] for pid in drawn}
    return _canonical(resamples, problems), dataclasses.replace(ledger, resample=spent)


def explain_no_examples(result: RoundResult, selection: SelectionConfig) -> str:
    """Why a round produced no training examples, in one sentence for a warning or an error.

    Tells apart: every gold ungradeable (all problems dropped), no problem in
    ``selection.train_classes``, every response of each training problem the same text, and
    no training problem with both a correct and an incorrect response (DPO) or with a
    correct one (SFT).
    """
    if not result.problems:
        if result.dropped:
            return (f"all {len(result.dropped)} problems were dropped: the verifier cannot parse their gold "
                    f"answers (see the warnings naming them)")
        return "the round had no problems"
    counts = count_by_class(result.difficulties)
    classes = list(selection.train_classes)
    train_ids = {pid for pid, d in result.difficulties.items() if d.difficulty.value in classes}
    shown = ", ".join(f"{n} {c}" for c, n in counts.items())
    if not train_ids:
        return (f"no problem is in selection.train_classes {classes} ({shown}, with tau_low="
                f"{result.thresholds.tau_low:g}, tau_high={result.thresholds.tau_high:g})")
    texts: dict[str, set[str]] = {pid: set() for pid in train_ids}
    verdicts: dict[str, set[bool | None]] = {pid: set() for pid in train_ids}
    for r in result.rollouts:
        if r.problem_id in train_ids:
            texts[r.problem_id].add(r.text.strip())
            verdicts[r.problem_id].add(r.correct)
    what = f"{len(train_ids)} {'/'.join(classes)} problem{'s' if len(train_ids) != 1 else ''}"
    if all(len(t) <= 1 for t in texts.values()):
        return (f"every response of each of the {what} is the same text (greedy decoding, "
                f"self_training.sampling.temperature=0, or a collapsed policy)")
    right_only = sum(v - {None} == {True} for v in verdicts.values())
    wrong_only = sum(v - {None} == {False} for v in verdicts.values())
    ungradeable = sum(not (v - {None}) for v in verdicts.values())
    mixed = len(train_ids) - right_only - wrong_only - ungradeable
    detail = f"{right_only} only correct, {wrong_only} only incorrect, {ungradeable} only ungradeable"
    if selection.objective == "sft":
        return f"none of the {what} has a usable correct response ({detail})"
    reason = f"none of the {what} gave a pair: {mixed} had both correct and incorrect responses ({detail})"
    if selection.min_chosen_prm is not None:
        reason += f"; selection.min_chosen_prm={selection.min_chosen_prm:g} may exclude every correct one"
    return reason
