"""A KV cache that ``HFEngine`` writes in place, and one prompt pass shared by a prompt's copies.

transformers' ``DynamicLayer`` appends each decoding step's keys and values with ``torch.cat``,
which copies the layer's whole cache every token: on the tiny demo's M_0 that copying took a
quarter of ``HFEngine``'s time (docs/performance.md, section 2). ``InPlaceLayer`` keeps the
same interface but writes new positions into a buffer with room to spare and returns views
of its filled part; the buffer grows (one copy) only every ``block`` tokens.

Why blocks and not one buffer sized for the whole generation (``StaticCache``): attention
reads the views, and CPU attention slows down as the rows of a view lie further apart in
memory: a view of 200 positions out of a 336-position buffer cost about 30% more per step
than a contiguous cache, more than the copy it saves. ``StaticCache`` is worse still: its
attention always covers ``max_cache_len`` positions, masked, and it cannot drop rows
(``batch_select_indices``), which the engine's pruning needs. Blocks keep the views nearly
contiguous (at most ``block`` spare positions) at 1/``block`` of the copying.

The values computed are those of a ``DynamicLayer``: the same tensors reach attention, in a
different memory layout.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

KV_BLOCK_TOKENS = 32
"""Positions a layer's buffer grows by when it is full (measured against 16, docs/performance.md)."""


class InPlaceLayer(DynamicLayer):
    """A full-attention cache layer written in place into a buffer grown ``block`` positions at a time.

    ``keys`` and ``values`` are views ``[batch, heads, length, head_dim]`` of the buffers
    ``[batch, heads, capacity, head_dim]``, as ``DynamicLayer``'s tensors are; row selection
    (pruning, beam reordering, expanding a prompt to its copies) copies the buffers once.
    """

    is_croppable = False  # crop (assisted decoding) is not implemented; the engine never crops

    def __init__(self, block: int = KV_BLOCK_TOKENS) -> None:
        super().__init__()
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.block = block
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self._values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions after the filled ones; return the filled views (new positions included)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._grow(end + self.block)
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._set_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (repeats allowed: a prompt's row copied to each of its samples)."""
        if self.length:
            indices = indices.to(self._keys.device)
            self._keys = self._keys.index_select(0, indices)
            self._values = self._values.index_select(0, indices)
            self._set_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self.batch_select_indices(torch.arange(self._keys.shape[0]).repeat_interleave(repeats))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def reset(self) -> None:
        self.length = 0
        self._keys = self._values = None
        super().reset()

    def _grow(self, capacity: int) -> None:
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], capacity, old.shape[-1]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def _set_views(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]


def in_place_cache(model: torch.nn.Module, block: int = KV_BLOCK_TOKENS) -> DynamicCache | None:
    """A ``DynamicCache`` for ``model`` whose full-attention layers are ``InPlaceLayer``.

    transformers picks each layer's kind from the model's config (sliding window, linear
    attention, ...); only its plain full-attention layers are replaced, the others keep their
    own kind. ``None`` for a model whose ``generate`` builds no standard cache.
    """
    if not getattr(model, "_supports_default_dynamic_cache", lambda: False)():
        return None
    cache = DynamicCache(config=model.config)
    if not cache.layers:  # no layer kinds known from the config: every layer is full attention
        cache.layer_class_to_replicate = lambda: InPlaceLayer(block)
    cache.layers = [InPlaceLayer(block) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def prefill_prompts_once(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         cache: DynamicCache) -> None:
    """Fill ``cache`` with all but the last prompt position, running each distinct row once.

    ``input_ids`` is a left-padded batch in which a prompt repeats once per sample. Its distinct
    rows go through the model together (positions as ``generate`` computes them from the
    mask), then the cache rows are copied to every sample (``batch_select_indices``).
    ``generate`` continues from the cache with the last prompt token, whose logits give the
    first sampled token, so each copy still draws its own samples.
    """
    # a row is its tokens and its mask: a prompt that starts with the pad token is not its padded shorter twin
    rows, inverse = torch.unique(torch.cat([input_ids, attention_mask], dim=1), dim=0, return_inverse=True)
    first = torch.full((rows.shape[0],), input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(input_ids.shape[0], device=input_ids.device), "amin")
    mask = attention_mask[first, :-1]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    model(
        input_ids=input_ids[first, :-1],
        attention_mask=None if bool(mask.all()) else mask,  # as generate: no mask without padding
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache.batch_select_indices(inverse)
