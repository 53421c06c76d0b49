"""The log-prob canary: does the sampler run the weights the trainer holds?

After a weight sync, a few sequences sampled by the engine are scored twice: by the engine
(the log-prob it reports for each sampled token) and by the trainer's own model here. If
the two disagree by more than a tolerance, the sync failed (a known failure elsewhere:
weights silently not synced after sleep mode) and training must stop, not go on with
rollouts from a stale policy.

The comparison uses the *mean* absolute per-token difference against the tolerance (the max
is reported too): bf16 engines disagree with an fp32 trainer by a few hundredths on some
tokens, while stale weights shift nearly every token.

With several training processes every rank checks its own engine, and the verdict is shared
(:func:`agree_on_canary`): when any rank's check fails, every rank raises the same message,
instead of the failing rank stopping while the others wait in the next collective until its
timeout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hs_star_pl.infra.errors import HSStarError


class LogprobMismatchError(HSStarError, RuntimeError):
    """The engine's token log-probs disagree with the trainer's beyond the tolerance.

    A run stopped on purpose: ``hs-star`` prints the message (which says what to check) and
    exits with status 1, without a traceback.
    """


@dataclass(frozen=True)
class CanaryReport:
    """How far the engine's token log-probs are from the trainer's."""

    n_sequences: int
    n_tokens: int
    mean_abs_diff: float
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.mean_abs_diff <= self.tolerance


@torch.no_grad()
def sequence_token_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> list[list[float]]:
    """``log p(completion_t | prompt, completion_<t)`` for every completion token, from ``model``.

    Runs in eval mode without gradients and restores each module's mode. Sequences are right
    padded, so positions (and thus RoPE) match an unpadded forward.

    Returns:
        One list per sequence, ``len(result[i]) == len(completion_ids[i])``.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    model.eval()
    out: list[list[float]] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            prompts = prompt_ids[start : start + batch_size]
            completions = completion_ids[start : start + batch_size]
            seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
            width = max(len(s) for s in seqs)
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, : len(s)] = torch.tensor(s)
                mask[row, : len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            # (B, T-1): log-prob of token t+1 given the prefix through t
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu()
            for row, (p, c) in enumerate(zip(prompts, completions)):
                out.append(logp[row, len(p) - 1 : len(p) - 1 + len(c)].tolist())
    finally:
        for module, mode in modes.items():
            module.training = mode
    return out


def compare_logprobs(
    reference: Sequence[Sequence[float]],
    observed: Sequence[Sequence[float]],
    tolerance: float,
    *,
    what: str = "engine",
) -> CanaryReport:
    """Compare per-token log-probs; raise :class:`LogprobMismatchError` beyond ``tolerance``.

    Args:
        reference: the trainer's log-probs, one list per sequence.
        observed: the engine's log-probs for the same tokens.
        tolerance: largest allowed mean absolute difference (nats per token).
        what: names the engine in the error message.
    """
    report = measure_logprobs(reference, observed, tolerance)
    if not report.ok:
        raise LogprobMismatchError(mismatch_message(report, what))
    return report


def measure_logprobs(
    reference: Sequence[Sequence[float]], observed: Sequence[Sequence[float]], tolerance: float
) -> CanaryReport:
    """The gaps between ``reference`` and ``observed`` log-probs, without a verdict."""
    if len(reference) != len(observed) or any(len(r) != len(o) for r, o in zip(reference, observed)):
        raise ValueError("reference and observed log-probs must have the same shape")
    diffs = [abs(r - o) for rs, os_ in zip(reference, observed) for r, o in zip(rs, os_)]
    if not diffs:
        raise ValueError("the canary needs at least one token to compare")
    return CanaryReport(
        n_sequences=len(reference),
        n_tokens=len(diffs),
        mean_abs_diff=sum(diffs) / len(diffs),
        max_abs_diff=max(diffs),
        tolerance=tolerance,
    )


_HINT = (
    "The engine is most likely running stale weights (sync skipped or lost, e.g. across sleep/wake_up), or a "
    "different dtype or tokenizer; raise engine.init_args.canary_tolerance only if the gap is numeric (e.g. bf16 "
    "vs fp32)."
)


def _gaps(report: CanaryReport) -> str:
    return (f"mean |diff| {report.mean_abs_diff:.4g}, max |diff| {report.max_abs_diff:.4g} over {report.n_tokens} "
            f"tokens of {report.n_sequences} sequences (tolerance {report.tolerance:g} on the mean)")


def mismatch_message(report: CanaryReport, what: str = "engine") -> str:
    """The message of a failed check on one process."""
    return f"{what} token log-probs disagree with the trainer's: {_gaps(report)}. {_HINT}"


def agree_on_canary(
    outcome: CanaryReport | BaseException,
    gather: Callable[[object], list[object]],
    *,
    what: str = "engine",
) -> CanaryReport:
    """Share every rank's canary outcome; raise on every rank when any rank's check failed.

    Every rank must call it (``gather`` is a collective: ``all_gather_objects`` over the
    process group, or ``lambda x: [x]`` on one process). A rank whose check raised (the engine
    or the scoring failed) counts as failed: it re-raises its own error, the others raise a
    :class:`LogprobMismatchError` naming that rank.

    Args:
        outcome: this rank's report, or the exception its check raised.
        gather: every rank's value in rank order.
        what: names the engine in the message.

    Returns:
        This rank's report, when every rank's check passed.
    """
    summary = (("error", f"{type(outcome).__name__}: {outcome}") if isinstance(outcome, BaseException)
               else ("report", outcome))
    outcomes = gather(summary)
    failed = [(rank, kind, value) for rank, (kind, value) in enumerate(outcomes) if kind == "error" or not value.ok]
    if not failed:
        return outcome  # type: ignore[return-value]
    if isinstance(outcome, BaseException):
        raise outcome
    if len(outcomes) == 1:
        raise LogprobMismatchError(mismatch_message(outcome, what))
    lines = [f"rank {rank}: " + (f"the check raised {value}" if kind == "error" else _gaps(value))
             for rank, kind, value in failed]
    raise LogprobMismatchError(
        f"{what} token log-probs disagree with the trainer's on {len(failed)} of {len(outcomes)} ranks "
        f"({'; '.join(lines)}). {_HINT}"
    )
