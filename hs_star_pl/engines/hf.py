"""``HFEngine``: sampling with ``transformers``' ``generate`` on the policy already in memory.

What it does:

- expands each request into ``n`` sequences, sorts them by (prompt length, key, copy) and
  cuts batches of ``batch_size`` sequences: batches depend on the *set* of requests, never on
  their order, and similar lengths waste little left padding;
- one ``generate`` call per batch, with the KV cache, left padding, EOS and stop strings
  (``stop_strings`` stops a sequence early; the text is then cut at the stop string, which
  is excluded, as vLLM does);
- with ``kv_cache: in_place`` (the default) runs each distinct prompt of a batch through the
  model once and copies its KV cache to the prompt's samples, writes the cache in place
  (``hs_star_pl.engines.kv_cache``) instead of concatenating it at every token, and samples
  with its own loop over the model's forward pass (``_decode``: ``generate``'s steps, without
  its bookkeeping); stop strings and ZeRO-3 lockstep still go through ``generate``;
- seeds each batch from ``(params.seed, batch index)`` inside ``torch.random.fork_rng``, so
  a fixed seed gives the same samples and the caller's global RNG is untouched;
- puts the model in eval mode while sampling and restores every module's mode afterwards.

Under DeepSpeed ZeRO-3 on several ranks (parameters partitioned, ``hs_star_pl.tensors.zero``) it samples
in lockstep: every rank makes as many ``generate`` calls as the busiest one and each runs with
``synced_gpus``, because each forward pass gathers the layers' parameters collectively. That is
correct but slow (an all-gather per layer per token); at scale use ``VLLMEngine``. There each
copy of a prompt runs its own prompt pass inside the synced call (the shared pass would be
one more forward that the ranks' dummy batches would have to match); the cache is still
written in place.

Sampling follows the protocol's settings only: a fresh ``GenerationConfig`` is built and the
model's own is hidden during the call (``generate`` would fill unset fields from it), so a
checkpoint's ``generation_config.json`` (``top_k``, repetition penalty, ``min_new_tokens``)
is ignored, and ``top_k`` is off, as in vLLM. Only its extra EOS ids are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from typing import Any, Literal

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from hs_star_pl.core.protocols import Completion, EngineLifecycle, GenerationRequest, SamplingParams
from hs_star_pl.engines.common import check_requests, find_stop, request_seed
from hs_star_pl.engines.kv_cache import in_place_cache, prefill_prompts_once
from hs_star_pl.infra.progress import progress
from hs_star_pl.tensors.zero import max_over_ranks, needs_lockstep


class HFEngine(EngineLifecycle):
    """Rollout engine on a ``transformers`` causal LM, with no copy of the model.

    Args:
        batch_size: sequences per ``generate`` call (prompt copies count separately).
        progress: show a tqdm bar over sequences (without it, a run with ``ProgressLog`` still
            gets a line at most every ``every_n_seconds``).
        seed_scope: ``batch`` (fastest): batches mix prompts, sorted by length, each seeded
            from (seed, batch index), so a prompt's samples depend on the other prompts in
            the call. ``request``: each prompt's copies are generated on their own, seeded
            from (seed, key), so its samples are the same whichever prompts share the call
            (and so however many ranks the round is sharded over), at the cost of smaller
            batches. vLLM always seeds per request.
        prune_every_tokens: generate in chunks of this many new tokens and drop the sequences
            that ended (EOS) from the batch between chunks, so finished rows stop costing
            compute; 0 runs each batch in one ``generate`` call. Responses with stop strings
            always take one call.
        kv_cache: ``in_place`` (fastest): each distinct prompt of a batch is run once and its
            KV cache copied to its samples, the cache is written in place, grown in blocks
            (``hs_star_pl.engines.kv_cache``), and the engine's own decoding loop samples
            from it. ``dynamic``: ``generate`` with its own ``DynamicCache``, which runs each
            sample's prompt and concatenates the whole cache at every token (the engine as
            it was; kept for comparison). Greedy tokens are the same with both; sampled
            tokens too, up to float rounding.
    """

    def __init__(
        self,
        batch_size: int = 64,
        progress: bool = True,
        seed_scope: Literal["batch", "request"] = "batch",
        prune_every_tokens: int = 16,
        kv_cache: Literal["in_place", "dynamic"] = "in_place",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"engine.init_args.batch_size must be >= 1, got {batch_size}")
        if prune_every_tokens < 0:
            raise ValueError(f"engine.init_args.prune_every_tokens must be >= 0, got {prune_every_tokens}")
        if seed_scope not in ("batch", "request"):
            raise ValueError(f"engine.init_args.seed_scope must be 'batch' or 'request', got {seed_scope!r}")
        if kv_cache not in ("in_place", "dynamic"):
            raise ValueError(f"engine.init_args.kv_cache must be 'in_place' or 'dynamic', got {kv_cache!r}")
        self.batch_size = batch_size
        self.progress = progress
        self.seed_scope = seed_scope
        self.prune_every_tokens = prune_every_tokens
        self.kv_cache = kv_cache
        self.model: Any = None
        self.tokenizer: Any = None

    # ------------------------------------------------------------------ lifecycle

    in_process = True  # the self-training loop binds the policy; there is nothing to sync, wake or put to sleep

    def bind(self, model: torch.nn.Module, tokenizer: Any) -> HFEngine:
        """Use ``model`` (kept by reference: training updates are seen at once) and ``tokenizer``."""
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad or an EOS token for left padding")
        self.model = model
        self.tokenizer = tokenizer
        return self

    def close(self) -> None:
        """Drop the references to model and tokenizer."""
        self.model = None
        self.tokenizer = None

    def __enter__(self) -> HFEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sampling

    def eos_token_ids(self) -> list[int]:
        """The tokenizer's EOS plus any the model's generation config lists (e.g. ``<|im_end|>``)."""
        ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        extra = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for i in [extra] if isinstance(extra, int) else list(extra or []):
            if i not in ids:
                ids.append(i)
        return ids

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest], params: SamplingParams) -> dict[str, list[Completion]]:
        """Return exactly ``request.n`` completions under each key (``[]`` when ``n == 0``)."""
        if self.model is None:
            raise RuntimeError("HFEngine.generate called before bind(model, tokenizer)")
        check_requests(requests)
        results: dict[str, list[Completion]] = {req.key: [] for req in requests}
        live = [req for req in requests if req.n > 0]
        # ZeRO-3 on several ranks: every forward pass gathers parameters collectively, so all
        # ranks make the same number of generate() calls (padding with a one-token dummy) and
        # each call runs with synced_gpus (finished ranks keep stepping until all are done).
        lockstep = needs_lockstep(self.model)
        if not live and not lockstep:
            return results

        prompt_ids = {req.key: self.tokenizer(req.prompt).input_ids for req in live}
        for key, ids in prompt_ids.items():
            if not ids:
                raise ValueError(f"GenerationRequest {key!r}: the prompt encodes to no tokens")
        # (length, key, copy): independent of the order the requests came in.
        items = sorted(((len(prompt_ids[r.key]), r.key, i) for r in live for i in range(r.n)))
        slots: dict[str, list[Completion | None]] = {r.key: [None] * r.n for r in live}

        model = self.model
        device = next(model.parameters()).device
        modes = {m: m.training for m in model.modules()}
        config = self._generation_config(params)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else config.eos_token_id[0]
        batches = list(self._batches(items, params.seed))
        n_dummy = max_over_ranks(len(batches), device) - len(batches) if lockstep else 0
        # a bar when asked for, else the run's time-based lines (ProgressLog), else nothing
        bar = progress(len(items), "HFEngine sampling", "sequence", shown=self.progress)
        # generate() fills every unset field of our config from model.generation_config (a
        # checkpoint's repetition_penalty, min_new_tokens, ...): hide it for the call.
        saved_config = getattr(model, "generation_config", None)
        model.generation_config = GenerationConfig()
        model.eval()
        try:
            for batch, seed in batches:
                seqs = [prompt_ids[key] for _, key, _ in batch]
                generated = self._generate_batch(seqs, seed, config, pad_id, device, params, lockstep)
                for (_, key, copy), completion in zip(batch, self._completions(generated, params, config.eos_token_id)):
                    slots[key][copy] = completion
                bar.update(len(batch))
            for _ in range(n_dummy):
                self._generate_batch([[pad_id]], params.seed, config, pad_id, device, params, lockstep)
        finally:
            bar.close()
            model.generation_config = saved_config
            for module, mode in modes.items():
                module.training = mode
        for key, got in slots.items():
            results[key] = [c for c in got if c is not None]
        return results

    def _generate_batch(self, seqs: list[list[int]], seed: int, config: GenerationConfig, pad_id: int,
                        device: torch.device, params: SamplingParams, synced: bool) -> torch.Tensor:
        """Sample one left-padded batch; returns the new tokens ``(B, T_new)`` on CPU.

        Rows are padded with ``pad_id`` after they end. With ``kv_cache: in_place`` sampling
        starts from a cache that holds each distinct prompt (all but its last token; not in
        lockstep, see the module docstring) and, without stop strings or lockstep, runs in
        ``_decode``. With ``prune_every_tokens`` (and no stop strings, and not in ZeRO-3
        lockstep) rows that produced an EOS leave the batch, with their rows of the KV cache,
        every that many tokens (in ``_decode``; with ``kv_cache: dynamic`` between chunks of
        ``generate``, ``_generate_pruned``). In lockstep every rank must make the same number of ``generate`` calls,
        which chunks that end early would break, so that path takes one call per batch.
        """
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):  # left padding
            input_ids[row, width - len(s) :] = torch.tensor(s)
            attention_mask[row, width - len(s) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        chunk = self.prune_every_tokens
        devices = [device] if device.type == "cuda" else []
        cache = in_place_cache(self.model) if self.kv_cache == "in_place" else None
        if cache is not None and not synced and width > 1:
            prefill_prompts_once(self.model, input_ids, attention_mask, cache)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if cache is not None and not (params.stop or synced):
                return self._decode(input_ids, attention_mask, config, pad_id, cache)
            if params.stop or synced or not chunk or chunk >= config.max_new_tokens:
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    past_key_values=cache,
                    generation_config=config,
                    tokenizer=self.tokenizer if params.stop else None,
                    synced_gpus=synced,
                )
                return out[:, width:].cpu()
            return self._generate_pruned(input_ids, attention_mask, config, pad_id, chunk)

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig, pad_id: int,
                cache: Any) -> torch.Tensor:
        """Sample a batch step by step over the model's forward pass; returns ``(B, T_new)`` on CPU.

        ``cache`` holds all but the last prompt token (``prefill_prompts_once``). Each step does
        what ``generate``'s sampling loop does for this engine's settings: the last position's
        logits in float32, the warpers ``generate`` would add (temperature, top-p; top-k is
        off), one ``multinomial`` draw over every row of the batch (argmax when greedy), and pad
        after a row's EOS; the positions and attention mask continue as ``generate`` continues
        them. So it gives ``generate``'s tokens (tested against ``kv_cache: dynamic``), without
        its per-step and per-call bookkeeping (about 7% of the time on the demo's M_0), and
        finished rows leave the batch every ``prune_every_tokens`` steps as in
        ``_generate_pruned``, without restarting ``generate``.
        """
        n_rows, max_new, device = input_ids.shape[0], config.max_new_tokens, input_ids.device
        eos = torch.tensor(config.eos_token_id, device=device)
        warpers = LogitsProcessorList()
        if config.do_sample and config.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.do_sample and config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(config.top_p))
        generated = torch.full((n_rows, max_new), pad_id, dtype=torch.long, device=device)
        rows = torch.arange(n_rows, device=device)  # rows of `generated` still in the batch
        running = torch.ones(n_rows, dtype=torch.bool, device=device)
        mask = None if bool(attention_mask.all()) else attention_mask  # as generate: no mask without padding
        tokens = input_ids[:, -1:]
        positions = attention_mask.sum(dim=1, keepdim=True) - 1  # left padding: the last token's position
        n_new = 0
        while n_new < max_new:
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True)
            scores = warpers(tokens, out.logits[:, -1].to(torch.float32))
            if config.do_sample:
                new = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                new = scores.argmax(dim=-1)
            new = torch.where(running, new, pad_id)
            generated[rows, n_new] = new
            n_new += 1
            running &= ~torch.isin(new, eos)
            if not bool(running.any()):
                break
            tokens, positions = new[:, None], positions + 1
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            if self.prune_every_tokens and n_new % self.prune_every_tokens == 0 and not bool(running.all()):
                keep = running.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                tokens, positions, running, rows = tokens[keep], positions[keep], running[keep], rows[keep]
                mask = mask[keep] if mask is not None else None
        return generated[:, :n_new].cpu()

    def _generate_pruned(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig,
                         pad_id: int, chunk: int) -> torch.Tensor:
        """``generate`` in chunks of ``chunk`` new tokens, dropping finished rows in between.

        One ``generate`` call runs every row until the *last* one ends; on the tiny demo's M_0
        a sixth of the row-steps went to rows that had already emitted EOS, and pruning them
        made sampling 1.06-1.12x faster on one CPU thread (docs/performance-history.md).
        Between chunks the finished rows leave ``input_ids``, the attention mask and the
        returned KV cache (``Cache.batch_select_indices``), and the next call continues the
        others from the cache (only the last sampled token is new to it). Greedy decoding gives
        the same tokens as one call; sampled tokens differ (fewer rows draw from the RNG) but
        stay seeded. Only EOS ends a row here, which is why stop strings take the one-call path.
        """
        n_rows, max_new = input_ids.shape[0], config.max_new_tokens
        eos = torch.tensor(config.eos_token_id, device=input_ids.device)
        generated = torch.full((n_rows, max_new), pad_id, dtype=torch.long)
        alive = torch.arange(n_rows)  # rows of `generated` still in the batch
        step_config = deepcopy(config)
        step_config.return_dict_in_generate = True
        cache, n_new = None, 0
        while n_new < max_new:
            step_config.max_new_tokens = min(chunk, max_new - n_new)
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, generation_config=step_config
            )
            new = out.sequences[:, input_ids.shape[1] :]
            generated[alive, n_new : n_new + new.shape[1]] = new.cpu()
            n_new += new.shape[1]
            running = ~torch.isin(new, eos).any(dim=1)
            if not bool(running.any()):
                break
            keep = running.nonzero().squeeze(1)
            cache = out.past_key_values
            if keep.numel() < running.numel():
                cache.batch_select_indices(keep)
            input_ids = out.sequences[keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(new.shape)], dim=1)[keep]
            alive = alive[keep.cpu()]
        return generated[:, :n_new]

    def _batches(self, items: list[tuple[int, str, int]], seed: int):
        """``(batch, seed)`` pairs over the sorted ``(length, key, copy)`` items (see ``seed_scope``)."""
        if self.seed_scope == "batch":
            for b, start in enumerate(range(0, len(items), self.batch_size)):
                yield items[start : start + self.batch_size], seed * 1_000_003 + b
            return
        by_key: dict[str, list[tuple[int, str, int]]] = {}
        for item in items:
            by_key.setdefault(item[1], []).append(item)
        for key in sorted(by_key):
            copies = by_key[key]
            for c, start in enumerate(range(0, len(copies), self.batch_size)):
                yield copies[start : start + self.batch_size], request_seed(seed, f"{key}#{c}")

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        eos = self.eos_token_ids()
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0],
            use_cache=True,
            num_beams=1,
        )
        if params.stop:
            kwargs["stop_strings"] = list(params.stop)
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        return GenerationConfig(**kwargs)

    def _completions(self, generated: torch.Tensor, params: SamplingParams, eos_ids: list[int]) -> list[Completion]:
        """Cut each row at its first EOS (pad == EOS, so only the *first* one counts), then at stops.

        Args:
            generated: ``(B, T_new)`` new tokens, padded with pad/EOS after a sequence ends.
        """
        is_eos = torch.isin(generated, torch.tensor(eos_ids))
        has_eos = is_eos.any(dim=1)
        first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), generated.shape[1])
        rows = [generated[i, : int(first_eos[i])].tolist() for i in range(generated.shape[0])]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        completions = []
        for ids, text, eos_hit in zip(rows, texts, has_eos.tolist()):
            span = find_stop(text, params.stop) if params.stop else None
            if span is not None:
                completions.append(Completion(text[: span[0]], "stop", self._tokens_through_stop(ids, params.stop)))
            else:
                completions.append(Completion(text, "stop" if eos_hit else "length", len(ids)))
        return completions

    def _tokens_through_stop(self, ids: list[int], stops: Sequence[str]) -> int:
        """Fewest leading tokens whose text contains a stop string (binary search, ~log2 T decodes)."""
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if find_stop(self.tokenizer.decode(ids[:mid], skip_special_tokens=True), stops) is not None:
                hi = mid
            else:
                lo = mid + 1
        return hi
