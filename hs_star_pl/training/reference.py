"""The DPO reference log-probs of a list of pairs: scored once, by the policy as it is, and cached.

There is never a second model in memory: the reference of iteration ``t`` is the policy at the
start of ``t`` (M_t), so whoever needs reference log-probs calls ``with_reference_logps``
before the iteration's first training step. ``score_pairs`` is the pass itself: the policy (any
``Policy``) in eval mode, pairs batched longest first, ZeRO-3 ranks in lockstep. Two callers,
one function and one cache format:

* the self-training callback, for a round's pairs; the cache is the round folder's
  ``reference_logps.jsonl`` phase file;
* ``MathDataModule``, for pairs from ``data.train_file``; the cache is
  ``<default_root_dir>/reference_logps/<key>.jsonl``, keyed by the file, template, length limit
  and initial model (see ``MathDataModule``).

A cache is a JSONL file of the scored pairs (``PreferencePair.to_dict``). It is read back only
when it holds this list's pairs (the same chosen and rejected keys, in order): a resumed run
must not rescore with weights that have already trained. Each rank scores its share of the
pairs (``pairs[rank::world]``) and the shares are all-gathered; rank 0 writes the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dataclasses

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from hs_star_pl.core.artifacts import read_jsonl, write_jsonl
from hs_star_pl.core.records import PreferencePair
from hs_star_pl.infra import faults
from hs_star_pl.infra.progress import phase_bar
from hs_star_pl.tensors.collate import collate_pairs, encode_example, encode_pair
from hs_star_pl.tensors.distributed import all_gather_objects
from hs_star_pl.tensors.zero import max_over_ranks, needs_lockstep
from hs_star_pl.training.policy import Policy, require_policy


def missing_reference(pairs: Sequence[PreferencePair]) -> bool:
    """Whether any pair lacks a reference log-prob."""
    return any(p.ref_chosen_logp is None or p.ref_rejected_logp is None for p in pairs)


def read_cache(cache: Path, pairs: Sequence[PreferencePair]) -> list[PreferencePair] | None:
    """The cached scores of ``pairs`` (in order), or ``None`` when ``cache`` holds other pairs or none."""
    if not cache.is_file():
        return None
    saved = read_jsonl(cache)
    keys = [(p.chosen_key, p.rejected_key) for p in pairs]
    if [(row.get("chosen_key"), row.get("rejected_key")) for row in saved] != keys:
        rank_zero_warn(f"{cache} holds the reference log-probs of other pairs; recomputing")
        return None
    return [PreferencePair.from_dict(row) for row in saved]


def with_reference_logps(
    trainer: L.Trainer,
    pairs: Sequence[PreferencePair],
    *,
    max_length: int,
    batch_size: int,
    cache: Path | None = None,
) -> list[PreferencePair]:
    """``pairs`` with ``ref_chosen_logp``/``ref_rejected_logp`` from the trainer's policy as it is now.

    Every rank must call it (the shares are all-gathered). Pairs that already carry both
    values are returned as they are.

    Args:
        trainer: the trainer whose ``lightning_module`` (an ``HSStarModule``) scores the pairs.
        pairs: prompts already rendered.
        max_length: the data's ``max_length`` (the same truncation as training).
        batch_size: pairs per forward pass.
        cache: a JSONL file to read the scores from (when it holds these pairs) and to write
            them to; ``None`` scores without caching.
    """
    if not missing_reference(pairs):
        return list(pairs)
    if cache is not None:
        cached = read_cache(cache, pairs)
        if cached is not None:
            rank_zero_info(f"reference log-probs read from {cache}")
            return cached
    rank, world = trainer.global_rank, trainer.world_size
    faults.begin("reference_pass")
    mine = score_pairs(require_policy(trainer.lightning_module, "the DPO reference pass"), list(pairs[rank::world]),
                       max_length=max_length, batch_size=batch_size, trainer=trainer)
    out = list(pairs)
    for r, part in enumerate(all_gather_objects(world, mine)):
        out[r::world] = part
    if cache is not None:
        with faults.persisting("reference_logps"):
            if trainer.is_global_zero:
                write_jsonl(cache, (p.to_dict() for p in out))
    return out


@torch.no_grad()
def score_pairs(
    policy: Policy,
    pairs: Sequence[PreferencePair],
    *,
    max_length: int,
    batch_size: int = 16,
    sort_by_length: bool = True,
    trainer: L.Trainer | None = None,
) -> list[PreferencePair]:
    """Reference log-probs of every pair under ``policy`` as it is now.

    Call it at the start of an iteration, before any training step: the policy then *is*
    that iteration's reference, so no second model is needed. Runs in eval mode with no
    grad (the previous mode is restored) and under the trainer's precision context when
    attached, so step 0 of training sees exactly these values.

    Args:
        policy: the policy being trained (``HSStarModule``).
        pairs: the iteration's pairs, prompts already rendered.
        max_length: the DataModule's ``max_length`` (same truncation as training).
        batch_size: pairs per forward pass.
        sort_by_length: batch the pairs longest first, so each batch pads to a length
            close to all of its members' (the values are written back in input order).
            In input order the tiny demo's pairs were batched with 25% more tokens than
            they hold and the pass was ~1.3x slower (``benchmarks/dpo_vs_trl.py``);
            ``False`` keeps that order.
        trainer: shows a progress bar over the pairs when given (``infra.progress.phase_bar``:
            rank 0, with ``trainer.enable_progress_bar``); ``None``: no bar.

    Returns:
        Copies of ``pairs`` in order with ``ref_chosen_logp``/``ref_rejected_logp`` set;
        pairs whose prompt does not fit ``max_length`` are returned unchanged (the
        DataModule drops them).
    """
    was_training = policy.model.training
    policy.model.eval()
    precision = policy.precision_context()
    out = list(pairs)
    try:
        encoded = [(i, encode_pair(policy.tokenizer, p, max_length)) for i, p in enumerate(pairs)]
        encoded = [(i, *e) for i, e in encoded if e is not None]
        if sort_by_length:  # a batch pads to its longest sequence, chosen or rejected
            encoded.sort(key=lambda e: (-max(len(e[1].ids), len(e[2].ids)), e[0]))
        pad_id = policy.tokenizer.pad_token_id
        n_batches = -(-len(encoded) // batch_size)
        # ZeRO-3: a forward pass gathers parameters collectively, so every rank runs as many
        # as the busiest one; the extra passes score a one-token pair and are discarded.
        if needs_lockstep(policy.model):
            n_padding = max_over_ranks(n_batches, policy.device) - n_batches
        else:
            n_padding = 0
        bar = phase_bar(trainer, len(encoded), "reference log-probs", "pair")
        with precision, bar:
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                batch = collate_pairs([(c, r) for _, c, r in chunk], pad_id)
                batch = {k: v.to(policy.device) for k, v in batch.items()}
                logps = policy.response_logps(batch, n_pairs=len(chunk)).float().cpu()
                n = len(chunk)
                for j, (i, _, _) in enumerate(chunk):
                    out[i] = dataclasses.replace(
                        out[i], ref_chosen_logp=float(logps[j]), ref_rejected_logp=float(logps[n + j])
                    )
                bar.update(n)
            if n_padding:
                filler = encode_example(policy.tokenizer, "x", "x", max_length)
                batch = {k: v.to(policy.device) for k, v in collate_pairs([(filler, filler)], pad_id).items()}
                for _ in range(n_padding):
                    policy.response_logps(batch, n_pairs=1)
    finally:
        policy.model.train(was_training)
    return out
