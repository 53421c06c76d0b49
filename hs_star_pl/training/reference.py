"""The DPO reference log-probs of a list of pairs: scored once, by the policy as it is, and cached.

There is never a second model in memory: the reference of iteration ``t`` is the policy at the
start of ``t`` (M_t), so whoever needs reference log-probs calls ``with_reference_logps``
before the iteration's first training step. Two callers, one function and one cache format:

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

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from hs_star_pl.infra import faults
from hs_star_pl.core.artifacts import read_jsonl, write_jsonl
from hs_star_pl.core.records import PreferencePair
from hs_star_pl.tensors.distributed import all_gather_objects


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
    module = trainer.lightning_module
    rank, world = trainer.global_rank, trainer.world_size
    mine = module.compute_reference_logps(list(pairs[rank::world]), max_length=max_length, batch_size=batch_size,
                                          progress=True)
    out = list(pairs)
    for r, part in enumerate(all_gather_objects(world, mine)):
        out[r::world] = part
    if cache is not None:
        with faults.persisting("reference_logps"):
            if trainer.is_global_zero:
                write_jsonl(cache, (p.to_dict() for p in out))
    return out
