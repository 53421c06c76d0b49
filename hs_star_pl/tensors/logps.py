"""Response log-probs without full-vocabulary copies (torch only; no Lightning).

A response token's log-prob is ``x[t] - logsumexp(x)`` over its position's logits ``x``, a row
of the vocabulary's size (152,064 for Qwen2.5). Taking every scored row to float32 and
``log_softmax``-ing them at once costs about three float32 logits tensors of the batch on top
of the forward pass (the float32 copy, the log-softmax, and in training their gradients): at
the paper's reference batch (16 sequences of up to 2,048 tokens) tens of GB.

Here the scored positions go through in chunks of ``chunk_size`` rows, so at most a few
chunks' rows exist at once (``docs/training-core.md``, ``benchmarks/logp_memory.py``). Two
routes, one result to float rounding:

* ``head_logps``, **from the last hidden states**: the LM head is applied per chunk, so the
  full logits never exist. Without grad each chunk is reduced in place and dropped; with grad
  each chunk runs under ``torch.utils.checkpoint`` (non-reentrant), so the backward pass
  recomputes its logits instead of keeping them. The head is called as the module it is, so
  a LoRA-adapted or tied head works unchanged (the idea of Liger's fused linear cross-entropy,
  in plain torch and with autograd doing the head's gradients).
* ``selected_logps``, **from the model's logits**: for a model whose logits are not its head
  applied to its last hidden state (soft-capped or scaled logits: ``head_route_problem`` runs
  one 8-token forward pass each way to tell), and for a training step under DeepSpeed ZeRO-3,
  where a partitioned head gathered once per chunk would make the number of collectives
  depend on each rank's data (without grad the module gathers the head once per pass and
  takes the first route). The logits exist (in the model's dtype); only the float32 work
  is chunked, and the backward pass writes their gradient chunk by chunk into one tensor (TRL's
  selective log-softmax, with a custom backward).

A position is named by its flat index into the forward pass's ``(rows x width)`` positions
(``source``); ``target`` is the token it predicts and ``sequence`` the sequence it belongs to
(``packing.PackedBatch`` carries all three; ``padded_positions`` makes them for a padded batch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 256
"""Positions per chunk (``model.logp_chunk_size``'s default): one chunk's float32 logits are
256 x 152,064 x 4 bytes = 156 MB at Qwen2.5's vocabulary, a few percent of a paper-scale
reference batch's, and a 256-row LM-head matmul still keeps a GPU busy."""


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or as it is when wider (float64 logits stay float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_chunk_size(chunk_size: int | None, key: str = "chunk_size") -> None:
    """Raise ``ValueError`` naming ``key`` unless ``chunk_size`` is ``None`` or a positive int."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{key} must be a positive number of positions or null (no chunking), got {chunk_size!r}")


def padded_positions(input_ids: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(source, target, sequence)`` of a padded ``(B, T)`` batch's response tokens.

    Position ``t`` of row ``b`` predicts ``input_ids[b, t + 1]``; it is scored when that token
    is a response token. ``source`` indexes the ``B * T`` flattened positions.
    """
    b, t = input_ids.shape
    rows, cols = response_mask[:, 1:].nonzero(as_tuple=True)  # cols + 1: the scored token
    return rows * t + cols, input_ids[rows, cols + 1], rows


def sum_per_sequence(token: torch.Tensor, sequence: torch.Tensor, n_sequences: int) -> torch.Tensor:
    """``(n_sequences,)``: the token log-probs summed per sequence."""
    out = torch.zeros(n_sequences, dtype=token.dtype, device=token.device)
    return out.index_add(0, sequence, token)


def _chunks(n: int, chunk_size: int) -> list[slice]:
    return [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)] or [slice(0, 0)]


def _reduce_rows_(rows: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-prob of target, logsumexp)`` per row of ``rows`` (float32+), which is overwritten."""
    picked = rows.gather(1, target[:, None]).squeeze(1)
    top = rows.amax(-1, keepdim=True)
    lse = rows.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(1))
    return picked - lse, lse


class _SelectedLogps(torch.autograd.Function):
    """Token log-probs from full logits, chunk by chunk; the backward writes one gradient tensor."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, source: torch.Tensor, target: torch.Tensor, chunk_size: int):
        out_dtype = torch.promote_types(logits.dtype, torch.float32)
        token = torch.empty(source.shape[0], dtype=out_dtype, device=logits.device)
        lse = torch.empty_like(token)
        for part in _chunks(source.shape[0], chunk_size):
            rows = logits[source[part]].to(out_dtype)  # a copy: indexing gathers
            token[part], lse[part] = _reduce_rows_(rows, target[part])
        ctx.save_for_backward(logits, source, target, lse)
        ctx.chunk_size = chunk_size
        return token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_token: torch.Tensor):
        logits, source, target, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for part in _chunks(source.shape[0], ctx.chunk_size):
            g = grad_token[part].to(lse.dtype)[:, None]
            # d(x[t] - logsumexp(x)) / dx = onehot(t) - softmax(x)
            rows = logits[source[part]].to(lse.dtype).sub_(lse[part][:, None]).exp_().mul_(-g)
            rows.scatter_add_(1, target[part][:, None], g)
            grad.index_put_((source[part],), rows.to(grad.dtype), accumulate=True)
        return grad, None, None, None


def selected_logps(logits: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Log-probs ``(N,)`` of ``target`` at the positions ``source`` of ``logits``, chunk by chunk.

    float32, or float64 for float64 logits. Differentiable in ``logits``.

    Args:
        logits: ``(M, V)``, the forward pass's logits with its positions flattened.
        source: ``(N,)`` rows of ``logits`` to score.
        target: ``(N,)`` the token each of those rows predicts.
        chunk_size: rows in float32 at once.
    """
    return _SelectedLogps.apply(logits, source, target, chunk_size)


def _chunk_logps(head: nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = at_least_float32(head(hidden))
    return logits.gather(1, target[:, None]).squeeze(1) - logits.logsumexp(-1)


def head_logps(hidden: torch.Tensor, head: nn.Module | Callable[[torch.Tensor], torch.Tensor], source: torch.Tensor,
               target: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Log-probs ``(N,)`` of ``target`` at the positions ``source``, the LM head applied per chunk.

    float32, or float64 for a float64 head. With grad, each chunk's logits are recomputed in
    the backward pass (``torch.utils.checkpoint``, non-reentrant: DDP and DeepSpeed see the
    head's parameters used once per chunk, and its gradient summed once).

    Args:
        hidden: ``(M, H)``, the decoder's last hidden states with the positions flattened.
        head: the LM head (``model.get_output_embeddings()``), called as the module it is; or
            any function of the hidden rows (a linear map of a gathered ZeRO-3 weight).
        source: ``(N,)`` rows of ``hidden`` to score.
        target: ``(N,)`` the token each of those rows predicts.
        chunk_size: positions through the head at once.
    """
    rows = hidden[source]
    parts = _chunks(source.shape[0], chunk_size)  # at least one: the head stays in the graph
    params = head.parameters() if isinstance(head, nn.Module) else ()
    if torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in params)):
        return torch.cat([checkpoint(_chunk_logps, head, rows[p], target[p], use_reentrant=False) for p in parts])
    out = []
    with torch.no_grad():
        for p in parts:
            out.append(_reduce_rows_(at_least_float32(head(rows[p])), target[p])[0])
    return torch.cat(out)


@torch.no_grad()
def head_route_problem(model: nn.Module) -> str | None:
    """Why ``model``'s logits are not ``get_output_embeddings()`` applied to ``get_decoder()``'s
    last hidden state, or ``None`` when they are (one forward pass of 8 tokens each way, eval mode)."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError) as err:
        return f"the model does not name its decoder and LM head ({err})"
    if decoder is None or head is None or decoder is model:
        return "the model does not name its decoder and LM head"
    param = next(model.parameters())
    ids = (torch.arange(8, device=param.device) * 7 % int(model.config.vocab_size))[None]
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, use_cache=False).logits
        rebuilt = head(decoder(input_ids=ids, use_cache=False).last_hidden_state)
    except Exception as err:  # an architecture whose decoder wants other inputs
        return f"its decoder could not be run on its own ({type(err).__name__}: {err})"
    finally:
        model.train(was_training)
    eps = torch.finfo(logits.dtype).eps  # the same matmul on the same input: equal, up to a kernel's rounding
    scale = 1.0 + float(logits.abs().max())
    if rebuilt.shape != logits.shape or not torch.allclose(rebuilt, logits, rtol=0.0, atol=8 * eps * scale):
        return "its logits are not its LM head applied to its last hidden state (scaled or soft-capped?)"
    return None
