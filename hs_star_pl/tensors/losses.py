"""Training losses as standalone tensor functions (torch only; no Lightning).

Notation: ``B`` batch, ``T`` sequence length, ``V`` vocabulary. A *response mask* ``(B, T)``
is 1 on the tokens of ``input_ids`` that belong to the response (including its EOS) and 0 on
prompt and padding tokens. Log-probabilities are natural logs.

Covered:

* ``sequence_logps``: summed log-probability of the response tokens (the ``log pi(y|x)`` of
  DPO, Rafailov et al. 2023, Eq. 7).
* DPO variants in a registry (``DPO_LOSSES``): ``sigmoid`` (DPO, Rafailov et al. 2023, Eq. 7)
  and ``ipo`` (IPO, Azar et al. 2023, Eq. 17), plus ``chosen_nll``, the optional
  length-normalised NLL term on the chosen response (Pang et al. 2024, "Iterative Reasoning
  Preference Optimization", Eq. 1).
* ``sft_nll``: token-averaged negative log-likelihood of the response (step-wise init; the
  maximum-likelihood objective, written out in its docstring); ``token_averaged_nll`` is the
  same from summed log-probs.

Not covered: reference models. Reference log-probs arrive as tensors (precomputed with the
policy at the start of the iteration, see ``HSStarModule.compute_reference_logps``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hs_star_pl.tensors.logps import DEFAULT_CHUNK_SIZE, at_least_float32, padded_positions, selected_logps, sum_per_sequence


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token: position ``t`` scores ``input_ids[:, t + 1]``.

    Args:
        logits: ``(B, T, V)`` model outputs for ``input_ids``.
        input_ids: ``(B, T)``.

    Returns:
        ``(B, T - 1)`` float32 (float64 for float64 logits) log-probs of tokens ``1..T-1`` given
        their prefixes.
    """
    logits = at_least_float32(logits[:, :-1])
    targets = input_ids[:, 1:].unsqueeze(-1)
    return torch.gather(logits.log_softmax(-1), 2, targets).squeeze(-1)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                   chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Summed log-probability of the response tokens, ``log pi(y | x)``.

    The first token can never be scored (nothing precedes it), so a response must start at
    position 1 or later; a prompt of at least one token guarantees that.

    Args:
        logits: ``(B, T, V)``.
        input_ids: ``(B, T)``.
        response_mask: ``(B, T)``, 1 on response tokens (see module notes).
        chunk_size: response positions taken to float32 at once (``logps.selected_logps``);
            ``None`` log-softmaxes every position's logits at once, as before (about three
            float32 logits tensors of the batch more memory; kept to measure against).

    Returns:
        ``(B,)`` float32 (float64 for float64 logits).
    """
    if chunk_size is None:
        mask = response_mask[:, 1:].to(torch.float32)
        return (token_logps(logits, input_ids) * mask).sum(-1)
    source, target, sequence = padded_positions(input_ids, response_mask)
    token = selected_logps(logits.reshape(-1, logits.shape[-1]), source, target, chunk_size)
    return sum_per_sequence(token, sequence, input_ids.shape[0])


def sft_nll(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Supervised loss: negative log-likelihood averaged over all response tokens of the batch.

    The maximum-likelihood objective of step-wise initialisation (and of the STaR/RFT
    baselines), ``L = -(1 / N) * sum_{i, t} log pi(y_{i,t} | x_i, y_{i,<t})`` with ``N`` the
    number of response tokens in the batch (prompt and padding tokens masked out).
    Token-averaged (not per-sequence-averaged), like ``F.cross_entropy`` with ignored prompt
    tokens, so long solutions weigh in proportion to their length.

    Returns:
        A scalar.
    """
    return token_averaged_nll(sequence_logps(logits, input_ids, response_mask), response_mask)


def token_averaged_nll(sequence_logps: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``sft_nll`` from the batch's summed response log-probs ``(B,)`` (padded or packed forward).

    Args:
        sequence_logps: ``(B,)`` summed response log-probs (``sequence_logps``, or
            ``packing.sequence_logps``).
        response_mask: ``(B, T)``, the padded batch's, for the count of response tokens.
    """
    n_tokens = response_mask[:, 1:].to(torch.float32).sum().clamp_min(1.0)
    return -sequence_logps.sum() / n_tokens


def _dpo_logits(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    # h = (log pi(yw|x) - log ref(yw|x)) - (log pi(yl|x) - log ref(yl|x)), without beta.
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def dpo_sigmoid_losses(h: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7): ``-log sigmoid(beta * h)`` per pair."""
    return -F.logsigmoid(beta * h)


def ipo_losses(h: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, Eq. 17): ``(h - 1 / (2 * beta)) ** 2`` per pair (``beta`` is tau)."""
    return (h - 1.0 / (2.0 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "sigmoid": dpo_sigmoid_losses,
    "ipo": ipo_losses,
}


def get_dpo_loss(name: str) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The per-pair loss called ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    try:
        return DPO_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown DPO loss type {name!r}; valid names are {sorted(DPO_LOSSES)}") from None


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preference loss over a batch of pairs, averaged over the batch.

    ``sigmoid`` is DPO (Rafailov et al. 2023, Eq. 7), ``ipo`` is IPO (Azar et al. 2023, Eq. 17),
    both on ``h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))``.

    Args:
        policy_chosen_logps: ``(B,)`` ``log pi(y_w | x)`` under the policy.
        policy_rejected_logps: ``(B,)`` ``log pi(y_l | x)`` under the policy.
        ref_chosen_logps: ``(B,)`` the same under the reference.
        ref_rejected_logps: ``(B,)`` the same under the reference.
        beta: KL strength (DPO's beta, IPO's tau).
        loss_type: a key of ``DPO_LOSSES``.

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: the scalar mean loss and the ``(B,)``
        implicit rewards ``beta * (log pi - log ref)``, detached.

    Raises:
        ValueError: unknown ``loss_type`` or ``beta <= 0``.
    """
    per_pair = get_dpo_loss(loss_type)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    h = _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = per_pair(h, beta).mean()
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return loss, chosen_rewards, rejected_rewards


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_n_tokens: torch.Tensor) -> torch.Tensor:
    """Length-normalised NLL of the chosen responses, averaged over the batch.

    Pang et al. 2024 (Iterative RPO), Eq. 1: ``-log pi(y_w | x) / |y_w|``. Added to the DPO
    loss with weight ``model.sft_weight``.

    Args:
        policy_chosen_logps: ``(B,)`` summed log-probs (``sequence_logps``).
        chosen_n_tokens: ``(B,)`` response lengths in tokens (EOS included).
    """
    return (-policy_chosen_logps / chosen_n_tokens.to(policy_chosen_logps.dtype).clamp_min(1.0)).mean()
