"""Padding-free forward passes: a padded batch repacked into rows of whole sequences (torch only).

A padded batch of sequences of very different lengths spends most of its compute on padding
(responses of 30 to 1500 tokens in one batch: two thirds of the tokens were padding in
``benchmarks/dpo_vs_trl.py --lengths paper``). ``pack_batch`` lays the same sequences end to
end instead, several per row, each with ``position_ids`` restarting at 0, and says where each
response token's log-prob is read from. Two layouts:

* **packed** (every attention kernel): each sequence whole. Rows go to the model with
  ``attention_mask=None`` and ``use_cache=False`` (with a KV cache transformers does not look
  for packed rows, and sequences would attend to each other); transformers then finds the sequence boundaries from the
  ``position_ids`` (``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal
  causal mask for ``eager``/``sdpa``, or runs the varlen kernels of ``flash_attention_2``/``3``.
* **shared prompts** (``eager``/``sdpa`` only): a DPO pair's chosen and rejected sequences start
  with the same prompt, so the prompt is laid down once, followed by the chosen response and
  then the rejected response, whose positions restart where the prompt ended. Position ids
  cannot express "the rejected response sees the prompt but not the chosen response", so this
  layout carries its own 4-D additive mask, which transformers passes to the kernel unchanged.

Rows are filled first-fit by decreasing length, up to ``row_length`` tokens (by default the
longest unit, so no row is wider than the padded batch was). Not one row for the whole batch:
``eager`` and ``sdpa`` attend over a dense ``(row, row)`` mask, so one 12k-token row costs
the attention of 12k x 12k, and on CPU a one-row batch ran 6-11x slower than rows of the
longest sequence's width. With flash-attention's varlen kernels one row is best; the module
asks for that there.

For the dense kernels ``pack_batch_groups`` goes one step further: rows of one width pad
every unit to the longest (on the tiny task, units of 200-440 tokens left a quarter of each
row's tokens as padding, and attention grows with the width squared), so the units are split
by length into up to ``ROW_GROUPS`` groups, each packed into rows of its own width and run as
a forward pass of its own, where a cost estimate (tokens plus attention's (query, key) pairs,
``width_groups``) says the saving outweighs the extra pass. Each sequence is scored in one
group, so its log-prob is what one row would give, to float rounding.

Log-probs come out per sequence: ``sequence_logps`` takes the log-softmax of the logits that
predict each response token, a chunk of positions at a time (``logps``), and sums them per
sequence with ``index_add``; the module's forward pass goes further and never makes the full
logits (``logps.head_logps`` on ``source``/``target``/``sequence``). The same tokens as
``losses.sequence_logps`` on the padded batch, so the two agree to float rounding
(``tests/test_packing.py``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from hs_star_pl.tensors.collate import position_ids_from_mask
from hs_star_pl.tensors.logps import DEFAULT_CHUNK_SIZE, at_least_float32, selected_logps, sum_per_sequence
from hs_star_pl.tensors.losses import sequence_logps as padded_sequence_logps

PACKING_MODES = ("sequences", "shared_prompts", "off")
"""``model.packing``'s choices: whole sequences, prompts shared within a DPO pair, or padded batches."""
SHARED_PROMPT_KERNELS = ("eager", "sdpa")
"""Attention kernels that take a 4-D mask as given (the shared-prompt layout needs one)."""
VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3")
"""Attention kernels that attend within each packed sequence only: the whole batch goes in one row."""
ROW_GROUPS = 2
"""Dense-mask kernels: a batch's units go into at most this many groups of rows, one width each
(``pack_batch_groups``). A third group gained nothing measurable on the tiny task or paper-like
lengths (estimated: under 1% more)."""
GROUP_OVERHEAD = 0.05
"""What ``width_groups`` charges each extra group (a forward pass of its own), as a share of the
one-group estimate; on CPU an extra pass of the tiny benchmark model costs a few percent of a step."""


@dataclass(frozen=True)
class PackedBatch:
    """Sequences laid end to end in rows, and where to read their response log-probs.

    Attributes:
        input_ids: ``(R, W)``; row ends are filled with ``pad_token_id``.
        position_ids: ``(R, W)``, restarting at 0 for each sequence (and for each row's padding).
        attention_mask: ``(R, 1, W, W)`` for the shared-prompt layout (additive: 0 or the dtype's
            minimum, or boolean: True where a token may attend), ``None`` for the packed one.
        source: ``(N,)`` flat indices into ``R * W``: the position whose logits predict each
            scored token.
        target: ``(N,)`` the scored tokens' ids.
        sequence: ``(N,)`` which sequence (row of the padded batch) each scored token belongs to.
        n_sequences: rows of the padded batch.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    source: torch.Tensor
    target: torch.Tensor
    sequence: torch.Tensor
    n_sequences: int

    @property
    def n_tokens(self) -> int:
        """Tokens laid down (prompt, response and row-end padding)."""
        return self.input_ids.numel()


@dataclass
class _Unit:
    """One sequence, or one pair whose prompt is laid down once: ``parts`` of (sequence, start, end)."""

    parts: list[tuple[int, int, int]]
    length: int
    row: int = 0
    offset: int = 0


def _spans(attention_mask: torch.Tensor, response_mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first token, first response token, end) of each row of a right- or left-padded batch."""
    lengths = attention_mask.sum(-1).tolist()
    n_prompt = (attention_mask.bool() & ~response_mask.bool()).sum(-1).tolist()
    width = attention_mask.shape[1]
    left = attention_mask[:, 0].bool().tolist()  # the first column is real: right padding (or none)
    out = []
    for length, prompt, starts_at_0 in zip(lengths, n_prompt, left, strict=True):
        start = 0 if starts_at_0 else width - length
        out.append((start, start + prompt, start + length))
    return out


def _units(input_ids: torch.Tensor, spans, n_pairs: int | None) -> list[_Unit]:
    n = len(spans)
    units: list[_Unit] = []
    paired: set[int] = set()
    if n_pairs is not None:
        for i in range(n_pairs):
            j = i + n_pairs
            (c0, cp, c1), (r0, rp, r1) = spans[i], spans[j]
            if cp - c0 == rp - r0 and torch.equal(input_ids[i, c0:cp], input_ids[j, r0:rp]):
                # prompt + chosen response, then the rejected response alone
                units.append(_Unit([(i, c0, c1), (j, rp, r1)], (c1 - c0) + (r1 - rp)))
                paired.update((i, j))
    for i in range(n):
        if i not in paired:
            s0, _, s1 = spans[i]
            units.append(_Unit([(i, s0, s1)], s1 - s0))
    return units


def _place(units: list[_Unit], row_length: int) -> tuple[int, int]:
    """First fit by decreasing length; returns (rows, width)."""
    free: list[int] = []
    for unit in sorted(units, key=lambda u: -u.length):
        for row, room in enumerate(free):
            if unit.length <= room:
                break
        else:
            row = len(free)
            free.append(row_length)
        unit.row, unit.offset = row, row_length - free[row]
        free[row] -= unit.length
    width = max(row_length - room for room in free)
    return len(free), width


def pack_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    pad_token_id: int,
    *,
    n_pairs: int | None = None,
    row_length: int | None = None,
    mask_dtype: torch.dtype = torch.float32,
) -> PackedBatch:
    """Repack a padded batch (``collate``'s format) into rows of whole sequences.

    Args:
        input_ids: ``(B, T)``, right- or left-padded.
        attention_mask: ``(B, T)``, 1 on real tokens.
        response_mask: ``(B, T)``, 1 on response tokens; every sequence has at least one
            prompt token (``collate.encode_example`` guarantees it).
        pad_token_id: fills the row ends.
        n_pairs: a DPO batch of ``n_pairs`` pairs (rows ``:n_pairs`` chosen, ``n_pairs:`` rejected)
            whose shared prompts are laid down once (the shared-prompt layout); ``None`` packs
            every sequence whole. A pair whose two prompts differ is packed whole.
        row_length: the most tokens per row; ``None`` is the longest unit's length. A unit
            longer than it gets a row of its own.
        mask_dtype: the shared-prompt layout's mask: ``torch.bool`` (True where a token may
            attend), or a float dtype (an additive mask: 0 or the dtype's minimum).
    """
    spans = _spans(attention_mask, response_mask)
    units = _units(input_ids, spans, n_pairs)
    return _assemble(input_ids, spans, units, pad_token_id, row_length, mask_dtype)


def pack_batch_groups(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    pad_token_id: int,
    *,
    n_pairs: int | None = None,
    pair_cost: float = 0.0,
    max_groups: int = ROW_GROUPS,
    mask_dtype: torch.dtype = torch.float32,
) -> list[PackedBatch]:
    """``pack_batch`` for dense-mask kernels: the units split by length into up to ``max_groups``
    groups, each packed into rows of its own longest unit, one forward pass per group.

    A dense kernel costs every row its full width in tokens and its width squared in
    attention, so one width for units of 200 and 440 tokens pads the short ones to 440. The
    split (see ``width_groups``) is taken only where the estimated cost falls by more than an
    extra forward pass's ``GROUP_OVERHEAD``. Each group's ``sequence`` indexes the whole
    batch and its ``n_sequences`` is the batch's, so the groups' ``sequence_logps`` add up
    to the batch's (a sequence's log-prob comes from one group, plus exact zeros).

    Args:
        pair_cost: multiply-adds of one (query, key) pair of attention relative to one
            token's through the whole model (``attention_pair_cost``); 0 counts tokens only.
        max_groups: 1 packs as ``pack_batch``.
        Others: as ``pack_batch``.
    """
    spans = _spans(attention_mask, response_mask)
    units = _units(input_ids, spans, n_pairs)
    groups = width_groups([u.length for u in units], pair_cost, max_groups)
    return [_assemble(input_ids, spans, [units[k] for k in group], pad_token_id, None, mask_dtype) for group in groups]


def _row_cost(rows: int, width: int, pair_cost: float) -> float:
    """Tokens a dense forward pass costs, attention included: every row its width, plus width^2 pairs."""
    return rows * width * (1.0 + pair_cost * width)


def width_groups(lengths: list[int], pair_cost: float, max_groups: int = ROW_GROUPS) -> list[list[int]]:
    """Indices of ``lengths`` (longest first) in at most ``max_groups`` runs of decreasing length,
    each packed into rows of its own longest: the split that minimises the estimated cost.

    A run's rows are estimated as the larger of its tokens over its width and the number of
    its units longer than half the width (no two of those share a row); every run after the
    first costs ``GROUP_OVERHEAD`` of the one-run estimate (a forward pass of its own).

    Args:
        lengths: the units' tokens.
        pair_cost: as ``pack_batch_groups``.
    """
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    sizes = [lengths[k] for k in order]
    n = len(sizes)
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    negated = [-size for size in sizes]  # ascending, for bisect

    def cost(i: int, j: int) -> float:  # the run sizes[i:j]
        width = sizes[i]
        wide = bisect.bisect_left(negated, -width / 2, i, j)  # sizes[i:wide] are over half the width
        return _row_cost(max(-(-(prefix[j] - prefix[i]) // width), wide - i), width, pair_cost)

    one = cost(0, n)
    # best[g][j]: the cheapest split of sizes[:j] into g runs, and where its last run starts
    best = [[(math.inf, 0)] * (n + 1) for _ in range(max(1, max_groups) + 1)]
    best[0][0] = (0.0, 0)
    for g in range(1, len(best)):
        for j in range(g, n + 1):
            best[g][j] = min((best[g - 1][i][0] + cost(i, j), i) for i in range(g - 1, j))
    g = min(range(1, len(best)), key=lambda g: best[g][n][0] + (g - 1) * GROUP_OVERHEAD * one)
    runs, j = [], n
    while g:
        i = best[g][j][1]
        runs.append(order[i:j])
        j, g = i, g - 1
    return runs[::-1]


def attention_pair_cost(model) -> float:
    """``pack_batch_groups``'s ``pair_cost`` for a transformers model: attention's multiply-adds
    per (query, key) pair (2 x layers x heads x head size: scores and weighted values) over a
    token's (about one per weight); 0 when its config does not say."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    try:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        per_pair = 2 * int(config.num_hidden_layers) * heads * int(head_dim)
    except (AttributeError, TypeError, ValueError):
        return 0.0
    n_weights = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())  # ZeRO-3: the full size
    return per_pair / n_weights if n_weights else 0.0


def _assemble(input_ids: torch.Tensor, spans, units: list[_Unit], pad_token_id: int, row_length: int | None,
              mask_dtype: torch.dtype) -> PackedBatch:
    """``units`` placed (first fit, rows of ``row_length`` or their longest) and laid down."""
    device = input_ids.device
    longest = max(u.length for u in units)
    n_rows, width = _place(units, max(row_length or longest, longest))

    flat_from: list[torch.Tensor] = []  # indices into the padded batch, flattened
    flat_to: list[torch.Tensor] = []  # indices into the packed rows, flattened
    positions: list[torch.Tensor] = []
    source: list[torch.Tensor] = []
    target_at: list[torch.Tensor] = []
    sequence: list[torch.Tensor] = []
    shared = any(len(u.parts) == 2 for u in units)
    blocks: list[tuple[int, int, int]] = []  # (row, first column, end): a unit, attending causally within itself
    hidden: list[tuple[int, int, int, int, int]] = []  # (row, rejected columns, chosen response columns)
    row_end = [0] * n_rows
    t_width = input_ids.shape[1]
    for unit in units:
        at = unit.row * width + unit.offset
        unit_start = unit.offset
        first = None
        for part, (i, s0, s1) in enumerate(unit.parts):
            n = s1 - s0
            flat_from.append(torch.arange(i * t_width + s0, i * t_width + s1))
            flat_to.append(torch.arange(at, at + n))
            start_position = 0 if part == 0 else first[2]
            positions.append(torch.arange(start_position, start_position + n))
            prompt_end = spans[i][1]  # first response token of sequence i, in the padded batch
            if part == 0:
                first = (i, at, prompt_end - s0)
                # response tokens prompt_end..s1-1 at at+(prompt_end-s0)..; each read from the position before
                tokens = torch.arange(at + prompt_end - s0, at + n)
                source.append(tokens - 1)
                target_at.append(tokens)
                sequence.append(torch.full((n,), i)[: len(tokens)])
            else:
                # the rejected response: its first token is predicted by the shared prompt's last token
                tokens = torch.arange(at, at + n)
                before = torch.cat([torch.tensor([first[1] + first[2] - 1]), tokens[:-1]])
                source.append(before)
                target_at.append(tokens)
                sequence.append(torch.full((n,), i))
            if part == 1:  # the rejected response does not see the chosen one
                hidden.append((unit.row, unit.offset, unit.offset + n, unit_start + first[2], unit.offset))
            at += n
            unit.offset += n
        blocks.append((unit.row, unit_start, unit.offset))
        row_end[unit.row] = max(row_end[unit.row], unit.offset)

    flat_from_t = torch.cat(flat_from).to(device)
    flat_to_t = torch.cat(flat_to).to(device)
    packed_ids = torch.full((n_rows * width,), pad_token_id, dtype=input_ids.dtype, device=device)
    packed_ids[flat_to_t] = input_ids.reshape(-1)[flat_from_t]
    # row ends: positions restart at 0 (a sequence of their own, attending only to themselves)
    filled = torch.zeros(n_rows * width, dtype=torch.bool, device=device)
    filled[flat_to_t] = True
    packed_positions = torch.zeros(n_rows * width, dtype=torch.long, device=device)
    packed_positions[flat_to_t] = torch.cat(positions).to(device)
    gaps = (~filled).view(n_rows, width).long()
    gap_positions = (gaps.cumsum(-1) - 1).clamp_min(0).view(-1)
    packed_positions = torch.where(filled, packed_positions, gap_positions)

    mask = None
    if shared:
        # each row's padding is a unit of its own; everything outside the blocks is hidden
        blocks += [(row, end, width) for row, end in enumerate(row_end) if end < width]
        idx = torch.arange(width, device=device)
        causal = idx[None, :] <= idx[:, None]  # (q, k)
        if mask_dtype == torch.bool:
            mask = torch.zeros((n_rows, 1, width, width), dtype=torch.bool, device=device)
            block, off = causal, False
        else:
            off = torch.finfo(mask_dtype).min
            mask = torch.full((n_rows, 1, width, width), off, dtype=mask_dtype, device=device)
            block = torch.zeros((width, width), dtype=mask_dtype, device=device).masked_fill_(~causal, off)
        for row, start, end in blocks:
            mask[row, 0, start:end, start:end] = block[: end - start, : end - start]
        for row, q0, q1, k0, k1 in hidden:
            mask[row, 0, q0:q1, k0:k1] = off

    target_index = torch.cat(target_at).to(device)
    return PackedBatch(
        input_ids=packed_ids.view(n_rows, width),
        position_ids=packed_positions.view(n_rows, width),
        attention_mask=mask,
        source=torch.cat(source).to(device),
        target=packed_ids[target_index],
        sequence=torch.cat(sequence).to(device),
        n_sequences=len(spans),
    )


def sequence_logps(logits: torch.Tensor, packed: PackedBatch, chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Summed response log-probs per sequence, ``(n_sequences,)``, in the padded batch's order.

    float32, or float64 for float64 logits (as ``losses.sequence_logps``).

    Args:
        logits: ``(R, W, V)``, the model's outputs for ``packed.input_ids``.
        chunk_size: response positions taken to float32 at once (``logps.selected_logps``);
            ``None`` log-softmaxes them all at once, as before (kept to measure against).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    if chunk_size is None:
        rows = at_least_float32(flat[packed.source])
        token = torch.gather(rows.log_softmax(-1), 1, packed.target[:, None]).squeeze(1)
    else:
        token = selected_logps(flat, packed.source, packed.target, chunk_size)
    return sum_per_sequence(token, packed.sequence, packed.n_sequences)


def _probe_batch(vocab_size: int, pad_token_id: int, salt: int) -> dict[str, torch.Tensor]:
    """Two pairs, padded: the first pair's tokens depend on ``salt``, the second pair's do not."""
    def ids(n: int, base: int) -> list[int]:
        return [(base + 7 * k) % vocab_size for k in range(n)]

    first, second = 11 + 13 * salt, 5
    rows = [  # (prompt, response): chosen 1, chosen 2, rejected 1, rejected 2
        (ids(3, first), ids(5, first + 3)),
        (ids(2, second), ids(3, second + 2)),
        (ids(3, first), ids(4, first + 9)),
        (ids(2, second), ids(2, second + 6)),
    ]
    width = max(len(p) + len(r) for p, r in rows)
    batch = {k: torch.zeros((4, width), dtype=torch.long) for k in ("input_ids", "attention_mask", "response_mask")}
    batch["input_ids"].fill_(pad_token_id)
    for row, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        batch["input_ids"][row, :n] = torch.tensor(prompt + response)
        batch["attention_mask"][row, :n] = 1
        batch["response_mask"][row, len(prompt) : n] = 1
    return batch


@torch.no_grad()
def packing_problem(model, pad_token_id: int, *, share_prompts: bool, mask_dtype: torch.dtype) -> str | None:
    """Why ``model`` cannot run packed rows, or ``None`` when it keeps packed sequences apart.

    Runs three small forward passes (eval mode, restored after): two pairs packed into one row,
    the same with the first pair's tokens changed, and the padded batch. The second pair's
    log-probs must not move when only the first pair changes (no attention across sequences),
    and the packed log-probs must match the padded ones (positions restart per sequence).

    Args:
        model: a transformers causal LM.
        share_prompts: probe the shared-prompt layout (its 4-D mask) instead of whole sequences.
    """
    vocab = int(model.config.vocab_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        packed_logps = []
        for salt in (0, 1):
            batch = {k: v.to(device) for k, v in _probe_batch(vocab, pad_token_id, salt).items()}
            packed = pack_batch(batch["input_ids"], batch["attention_mask"], batch["response_mask"], pad_token_id,
                                n_pairs=2 if share_prompts else None, row_length=10**9, mask_dtype=mask_dtype)
            logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                           position_ids=packed.position_ids, use_cache=False).logits
            packed_logps.append(sequence_logps(logits, packed))
        mask = batch["attention_mask"]
        logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=position_ids_from_mask(mask), use_cache=False).logits
        padded_logps = padded_sequence_logps(logits, batch["input_ids"], batch["response_mask"])
    finally:
        model.train(was_training)
    second = [1, 3]  # chosen 2, rejected 2
    scale = 1.0 + float(packed_logps[0].abs().max())
    if float((packed_logps[0][second] - packed_logps[1][second]).abs().max()) > 1e-6 * scale:
        return "a packed sequence's log-probs changed with the tokens of the sequence before it in the row"
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if float((packed_logps[1] - padded_logps).abs().max()) > tolerance * scale:  # batch is salt 1's
        return "packed log-probs differ from the padded batch's (position ids not honoured?)"
    return None
