"""Tokenising (prompt, response) text and padding it into batches (torch only; no Lightning).

Shared by ``MathDataModule`` (training batches) and ``HSStarModule.compute_reference_logps``
(reference batches), so both see exactly the same tokens.

Conventions:

* Prompt and response are tokenised *separately* and concatenated, because that is how a
  sampled response sits after its prompt; BPE merges never cross the boundary.
* The tokenizer's EOS is appended to every response and is a trained token: the model learns
  to stop.
* Too long: the response is cut from the right to fit ``max_length`` (the EOS goes with it, so
  a cut response never teaches stopping), and the example counts as *truncated*. A prompt that
  leaves no room for one response token is *dropped*.
* Padding uses the tokenizer's pad id but masks come from lengths only: for Qwen2.5 base
  models (and ``hs_star_pl.tensors.tiny``) pad == EOS, so comparing ids with the pad id would mask out
  the trained EOS.

Batches are SFT batches (``collate_sequences``), DPO batches (``collate_pairs``) or the one
placeholder of an iteration without examples (``empty_iteration_batch``): Lightning ends
training on an epoch with zero batches, so such an iteration serves this batch and the module
trains on nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

PaddingSide = Literal["right", "left"]


@dataclass(frozen=True)
class EncodedSequence:
    """One tokenised example.

    Attributes:
        ids: prompt tokens followed by response tokens (EOS included unless truncated).
        n_prompt: how many of ``ids`` belong to the prompt.
        truncated: the response was cut to fit ``max_length``.
    """

    ids: tuple[int, ...]
    n_prompt: int
    truncated: bool = False

    @property
    def n_response(self) -> int:
        return len(self.ids) - self.n_prompt


def encode_example(
    tokenizer, prompt: str, response: str, max_length: int, eos: bool = True
) -> EncodedSequence | None:
    """Tokenise ``prompt`` + ``response`` + EOS; ``None`` when the prompt alone does not fit
    or there is no response token to score.

    Args:
        tokenizer: a Hugging Face tokenizer with an ``eos_token_id``.
        prompt: the rendered prompt (see ``hs_star_pl.core.templates``).
        response: the response text, without EOS.
        max_length: the longest allowed sequence in tokens.
        eos: append EOS. ``False`` for a response that is a prefix (a rejected response cut
            after its first failing step), which did not end there.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; responses cannot be terminated")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    response_ids = tokenizer.encode(response, add_special_tokens=False) + ([tokenizer.eos_token_id] if eos else [])
    if not response_ids:
        return None  # nothing to score
    if not prompt_ids or len(prompt_ids) + 1 > max_length:
        return None  # an empty prompt would leave the first response token unscorable
    room = max_length - len(prompt_ids)
    truncated = len(response_ids) > room
    return EncodedSequence(tuple(prompt_ids + response_ids[:room]), len(prompt_ids), truncated)


def encode_pair(tokenizer, pair, max_length: int) -> tuple[EncodedSequence, EncodedSequence] | None:
    """A ``PreferencePair``'s chosen and rejected sequences; ``None`` when either is dropped.

    The chosen response ends with EOS; the rejected one too, unless it is a prefix
    (``rejected_cut``: cut after its first failing step, so it did not end there).
    """
    chosen = encode_example(tokenizer, pair.prompt, pair.chosen, max_length)
    rejected = encode_example(tokenizer, pair.prompt, pair.rejected, max_length, eos=not pair.rejected_cut)
    return None if chosen is None or rejected is None else (chosen, rejected)


def collate_sequences(
    sequences: Sequence[EncodedSequence], pad_token_id: int, padding_side: PaddingSide = "right"
) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence.

    Returns:
        ``input_ids``, ``attention_mask`` and ``response_mask``, each ``(B, T)``;
        ``response_mask`` is 1 exactly on response tokens (EOS included), built from lengths.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"data.padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(s.ids) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        start = 0 if padding_side == "right" else width - len(seq.ids)
        end = start + len(seq.ids)
        input_ids[row, start:end] = torch.tensor(seq.ids, dtype=torch.long)
        attention_mask[row, start:end] = 1
        response_mask[row, start + seq.n_prompt : end] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def collate_pairs(
    pairs: Sequence[tuple[EncodedSequence, EncodedSequence]],
    pad_token_id: int,
    padding_side: PaddingSide = "right",
    ref_logps: Sequence[tuple[float, float]] | None = None,
) -> dict[str, torch.Tensor]:
    """Stack chosen then rejected into one ``(2B, T)`` batch: rows ``:B`` chosen, ``B:`` rejected.

    One forward pass serves both halves. ``ref_chosen_logps``/``ref_rejected_logps`` ``(B,)``
    are added when ``ref_logps`` is given.
    """
    batch = collate_sequences([c for c, _ in pairs] + [r for _, r in pairs], pad_token_id, padding_side)
    if ref_logps is not None:
        refs = torch.tensor(ref_logps, dtype=torch.float32).reshape(len(pairs), 2)
        batch["ref_chosen_logps"] = refs[:, 0]
        batch["ref_rejected_logps"] = refs[:, 1]
    return batch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


EMPTY_ITERATION = "empty_iteration"
"""The key of ``empty_iteration_batch``'s one entry."""


def empty_iteration_batch() -> dict[str, torch.Tensor]:
    """The placeholder batch of an iteration without examples (the module skips it)."""
    return {EMPTY_ITERATION: torch.ones(1)}


def is_empty_iteration(batch: dict[str, torch.Tensor]) -> bool:
    return EMPTY_ITERATION in batch
