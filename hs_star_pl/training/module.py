"""``HSStarModule``: the policy, trained with DPO or SFT.

The policy is a Hugging Face causal LM, loaded from a local directory (``model_path``) or
built from a small config (``tiny``, for tests and CPU runs). There is never a second model in
memory: the reference for iteration ``t`` is the policy at the start of ``t``, and its
log-probs are computed once per iteration by ``compute_reference_logps`` (eval mode, no grad)
and carried in the batches as ``ref_chosen_logps``/``ref_rejected_logps``.

Batches come from ``MathDataModule`` (the formats are ``collate``'s): ``input_ids``/
``attention_mask``/``response_mask`` ``(B, T)`` for SFT, and the same with ``2B`` rows (chosen
first, then rejected) plus ``(B,)`` reference log-probs for DPO. The module knows nothing of
the data module: the data module asks it for its tokenizer and reference log-probs.

Evaluation (``hs-star test``) feeds ``test_step`` ``EvalBatch`` chunks of a benchmark; it
generates with ``generate_for_eval`` and the evaluation callback grades and aggregates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric

from hs_star_pl.infra import faults
from hs_star_pl.infra.digests import CACHE_NAME, DigestCache, folder_digest
from hs_star_pl.tensors.collate import is_empty_iteration, position_ids_from_mask
from hs_star_pl.core.protocols import Completion
from hs_star_pl.tensors.attention import check_attn_implementation
from hs_star_pl.core.records import PreferencePair
from hs_star_pl.infra.errors import ConfigError, NonFiniteLossError
from hs_star_pl.evaluation.protocol import EvalBatch
from hs_star_pl.tensors.hub import hub_source, resolve_model
from hs_star_pl.tensors.logps import (
    DEFAULT_CHUNK_SIZE,
    check_chunk_size,
    head_logps,
    head_route_problem,
    padded_positions,
    selected_logps,
    sum_per_sequence,
)
from hs_star_pl.tensors.lora import LoraSettings, apply_lora
from hs_star_pl.tensors.losses import chosen_nll, dpo_loss, get_dpo_loss, sequence_logps, token_averaged_nll
from hs_star_pl.tensors.packing import (
    PACKING_MODES,
    ROW_GROUPS,
    SHARED_PROMPT_KERNELS,
    VARLEN_KERNELS,
    attention_pair_cost,
    pack_batch,
    pack_batch_groups,
    packing_problem,
)
from hs_star_pl.tensors.packing import sequence_logps as packed_sequence_logps
from hs_star_pl.tensors.schedules import WarmupCosineLR
from hs_star_pl.tensors.zero import gathered, is_zero3_partitioned, needs_lockstep
from hs_star_pl.training.reference import score_pairs

OBJECTIVES = ("dpo", "sft")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DPO_METRICS = ("loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logps", "rejected_logps")
"""Logged as ``train/<name>`` and ``val/<name>``; ``chosen_logps``/``rejected_logps`` are the policy's
summed response log-probs, averaged over the batch's pairs."""


@dataclass(frozen=True)
class TinyModelConfig:
    """A Qwen2-architecture model built from config with the byte-level tokenizer (``hs_star_pl.tensors.tiny``).

    Attributes:
        hidden_size: width.
        num_hidden_layers: decoder layers.
        num_attention_heads: attention heads (must divide ``hidden_size``).
        intermediate_size: MLP width; ``None`` means twice ``hidden_size``.
        max_position_embeddings: longest sequence the model accepts.
        seed: weight initialisation seed.
    """

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int | None = None
    max_position_embeddings: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.tiny.hidden_size ({self.hidden_size}) must be a multiple of "
                f"model.tiny.num_attention_heads ({self.num_attention_heads})"
            )


# The checkpoint's hyper-parameters hold these settings objects; torch.load's weights-only
# unpickler (Lightning's default on resume) refuses classes it has not been told are plain data.
torch.serialization.add_safe_globals([TinyModelConfig, LoraSettings])


class HSStarModule(L.LightningModule):
    """The policy LM and its training objective.

    Args:
        model_path: the policy's Hugging Face model (``AutoModelForCausalLM`` and
            ``AutoTokenizer``): a local folder, or a hub id (``org/name``) resolved through the
            hub cache (``HF_HOME``, ``HF_HUB_OFFLINE``; ``hs_star_pl.tensors.hub``). Exclusive
            with ``tiny``.
        revision: the hub revision (branch, tag or commit) of a hub-id ``model_path``; ``None``
            for the default branch.
        tiny: build a small Qwen2 model from this config instead (tests, CPU runs).
        objective: ``dpo`` (preference pairs) or ``sft`` (supervised responses).
        loss_type: DPO variant, a key of ``hs_star_pl.tensors.losses.DPO_LOSSES`` (``sigmoid``, ``ipo``).
        beta: DPO KL strength (IPO's tau).
        sft_weight: weight of the length-normalised NLL on the chosen response added to the
            DPO loss (0 turns it off).
        dtype: weight dtype, ``float32`` or ``bfloat16`` (use with ``trainer.precision``
            ``bf16-true`` or ``bf16-mixed`` to halve memory).
        gradient_checkpointing: recompute activations in the backward pass (less memory,
            about a third more compute).
        attn_implementation: the attention kernel transformers runs (``eager``, ``sdpa``,
            ``flash_attention_2``, ``flash_attention_3``, ``flex_attention``; see
            ``hs_star_pl.tensors.attention``), for ``model_path`` and ``tiny`` alike; ``None`` keeps
            transformers' default (``sdpa``). Checked when the config is parsed.
        peft: train LoRA adapters instead of every weight (``hs_star_pl.tensors.lora.LoraSettings``,
            the ``peft`` extra); ``None`` trains the whole model. The base weights are frozen
            and left out of Lightning checkpoints (the adapters and the optimizer state are
            saved; the base is reloaded from ``model_path``/``tiny`` on resume). The DPO
            reference stays M_t, the policy with its adapters at the start of iteration t,
            scored once per iteration as without LoRA; disabling the adapters would give M_0
            instead from iteration 2 on. HF exports hold the merged model (docs/lora.md).
        packing: how each forward pass (training, validation, reference log-probs) lays out
            its batch (``hs_star_pl.tensors.packing``). ``sequences``: the sequences end to end
            without padding, positions restarting per sequence. ``shared_prompts``: the same,
            and a DPO pair's prompt laid down once for both responses (``eager``/``sdpa``
            only, under a 4-D mask; with a varlen flash-attention kernel it packs
            ``sequences``); it pays where prompts are long against responses (the tiny demo),
            not where responses are long (wider rows). ``off``: every batch padded to its
            longest sequence. The same log-probs and losses up to float rounding. Checked once
            on a small batch: a model whose attention does not keep packed sequences apart
            falls back to padded batches with a warning.
        logp_chunk_size: response positions whose vocabulary-wide logits exist at once when
            their log-probs are taken (``hs_star_pl.tensors.logps``): the forward pass stops at the
            last hidden states and the LM head runs on this many positions at a time (with
            grad, recomputed in the backward pass), so the full logits never exist. Under
            DeepSpeed ZeRO-3 the head's weight is gathered once per pass without grad; with
            grad there, and for a model whose logits are not its head applied to its last
            hidden state (checked once on a small batch), the model's logits are made and only
            their float32 log-softmax is chunked (``logp_route``). ``null``: the model's logits, all positions'
            log-softmax at once (about three float32 logits tensors of the batch more;
            ``benchmarks/logp_memory.py``). The same log-probs to float rounding.
        optimizer: optimizer factory (LightningCLI ``class_path``); AdamW by default.
        lr_scheduler: scheduler factory, stepped every optimizer step; a
            ``WarmupCosineLR`` without ``total_steps`` gets it from the trainer.
        nonfinite_loss: a NaN/inf training loss or gradient: ``raise`` stops training with an
            error naming the step (nothing is written after the last good checkpoint);
            ``skip`` drops that batch's update with a warning and counts it in
            ``train/nonfinite_skipped``.
    """

    def __init__(
        self,
        model_path: str | None = None,
        tiny: TinyModelConfig | None = None,
        revision: str | None = None,
        objective: str = "dpo",
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        sft_weight: float = 0.0,
        dtype: Literal["float32", "bfloat16"] = "float32",
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        peft: LoraSettings | None = None,
        packing: Literal["sequences", "shared_prompts", "off"] = "sequences",
        logp_chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        nonfinite_loss: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__()
        if (model_path is None) == (tiny is None):
            raise ValueError("set exactly one of model.model_path (a local HF folder or a hub id) and model.tiny (a config)")
        if objective not in OBJECTIVES:
            raise ValueError(f"model.objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        try:
            get_dpo_loss(loss_type)
        except ValueError as err:
            raise ValueError(f"model.loss_type: {err}") from None
        for key, value in (("beta", beta), ("sft_weight", sft_weight)):
            if not math.isfinite(value):  # NaN passes the range checks below
                raise ValueError(f"model.{key} must be a finite number, got {value}")
        if beta <= 0:
            raise ValueError(f"model.beta must be > 0, got {beta}")
        if sft_weight < 0:
            raise ValueError(f"model.sft_weight must be >= 0, got {sft_weight}")
        if dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"model.nonfinite_loss must be 'raise' or 'skip', got {nonfinite_loss!r}")
        check_attn_implementation(attn_implementation, "model.attn_implementation")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model_path = model_path
        # the folder model_path names: itself, or its hub snapshot (a missing one is refused here)
        self.model_dir = None if model_path is None else resolve_model(model_path, revision, "model.model_path")
        self.tiny = tiny
        self.objective = objective
        self.loss_type = loss_type
        self.beta = beta
        self.sft_weight = sft_weight
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.nonfinite_loss = nonfinite_loss
        if packing not in PACKING_MODES:
            raise ConfigError(f"model.packing must be one of {', '.join(PACKING_MODES)}, got {packing!r}")
        self.packing = packing
        try:
            check_chunk_size(logp_chunk_size, "model.logp_chunk_size")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.logp_chunk_size = logp_chunk_size
        self._head_route: bool | None = None  # whether log-probs come from the hidden states (checked once)
        self._packing_checked: dict[bool, bool] = {}  # by layout (prompts shared or not): the first pass's check
        self._pair_cost: float | None = None  # packing's cost model (attention_pair_cost), once
        self.n_nonfinite_skipped = 0
        self._batch_idx = 0
        self.tokenizer, self.model = self._load(self.model_dir, tiny, DTYPES[dtype], attn_implementation)
        # With LoRA, ``self.model`` stays the transformers model, adapted in place by peft (its
        # forward and generate are the policy's); the PeftModel wrapper is kept outside the
        # module tree (``__dict__``) so that its parameters are not registered twice.
        self.__dict__["peft_model"] = apply_lora(self.model, peft) if peft is not None else None
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False
            if peft is not None:
                # the frozen embeddings' output needs grad, or a reentrant checkpoint of the
                # first layer would cut the adapters off from the loss (peft's usual requirement)
                self.model.enable_input_require_grads()
        names = DPO_METRICS if objective == "dpo" else ("loss",)
        self.metrics = nn.ModuleDict(
            {f"{split}_": nn.ModuleDict({n: MeanMetric() for n in names}) for split in ("train", "val")}
        )
        self._batch_started: float | None = None

    @staticmethod
    def _load(model_path, tiny, dtype, attn_implementation=None):
        if model_path is not None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if not (Path(model_path) / "config.json").is_file():
                raise ConfigError(
                    f"model.model_path={model_path} has no config.json: a Hugging Face model folder is expected "
                    f"(config.json, weights, tokenizer files), e.g. an hf/policy_NNN export"
                )

            tokenizer = AutoTokenizer.from_pretrained(model_path)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn_implementation)
            # from_pretrained returns eval mode and Lightning 2.6 keeps a module's mode:
            # without this a loaded policy would train with dropout switched off.
            model.train()
        else:
            from hs_star_pl.tensors.tiny import build_byte_tokenizer, build_tiny_causal_lm

            tokenizer = build_byte_tokenizer()
            kwargs = {k: v for k, v in dataclasses.asdict(tiny).items() if v is not None}
            model = build_tiny_causal_lm(tokenizer, attn_implementation=attn_implementation, **kwargs).to(dtype)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # masks are built from lengths, see collate
        return tokenizer, model

    # -- LoRA: the frozen base stays out of checkpoints -------------------------------------

    def setup(self, stage: str) -> None:
        if self.peft_model is not None and getattr(self._trainer.strategy, "zero_stage_3", False):
            raise ConfigError(
                "model.peft (LoRA) does not run under DeepSpeed ZeRO-3 here (the merged export and weight sync "
                "need whole layers); use ZeRO-2 (configs/strategy/deepspeed_zero2.yaml) or DDP: with the base "
                "frozen, its optimizer state is only the adapters'"
            )

    def _frozen_keys(self) -> list[str]:
        """State-dict keys of the frozen base weights (none without LoRA)."""
        if self.peft_model is None:
            return []
        return [k for k, v in self.state_dict(keep_vars=True).items()
                if isinstance(v, nn.Parameter) and not v.requires_grad]

    def _base_source(self) -> str:
        if self.model_path is None:
            return repr(self.tiny)
        return hub_source(self.model_dir) or str(Path(self.model_path).resolve())

    def _base_weights(self) -> str | None:
        """The digest of ``model_path``'s weight files (``infra.digests``), ``None`` for ``tiny``."""
        if self.model_path is None or not Path(self.model_path).is_dir():
            return None
        cache = DigestCache(Path(self.trainer.default_root_dir) / CACHE_NAME if self._trainer is not None else None)
        return folder_digest(self.model_path, cache)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The base is what model_path / tiny loads, unchanged by training: a 7B checkpoint
        # would otherwise carry 15 GB of weights it can reload from there.
        frozen = self._frozen_keys()
        if frozen and "state_dict" in checkpoint:
            state = checkpoint["state_dict"]
            for key in frozen:
                state.pop(key, None)
            checkpoint["lora_base"] = {"omitted": frozen, "source": self._base_source(), "weights": self._base_weights()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        base = checkpoint.get("lora_base")
        if base is None or "state_dict" not in checkpoint:
            return
        if base["source"] != self._base_source():
            raise ConfigError(
                f"the checkpoint holds LoRA adapters trained on the base {base['source']}, but model.model_path/"
                f"model.tiny is {self._base_source()} now: the frozen base is not in the checkpoint, resume with "
                f"the base it was trained on"
            )
        if base.get("weights") is not None and base["weights"] != self._base_weights():
            raise ConfigError(
                f"the checkpoint holds LoRA adapters trained on the weights that were in {base['source']}, and the "
                f"weight files there changed since (another model copied over them): the frozen base is not in the "
                f"checkpoint, so restore those weight files to resume, or start a new run folder (a new "
                f"trainer.default_root_dir) from the model there now"
            )
        own = self.state_dict()
        state = checkpoint["state_dict"]
        for key in base["omitted"]:
            if key in own:  # a key the model no longer has is left for the strict load to report
                state.setdefault(key, own[key])

    def model_source_tag(self) -> str:
        """A short id of the initial weights (keys the reference-log-prob cache): the path and,
        for a folder, the digest of its weight files (``infra.digests``), so weights copied over
        the same path are another model."""
        source = (hub_source(self.model_dir) or self.model_path) if self.model_path is not None else repr(self.tiny)
        if self.model_path is not None and Path(self.model_path).is_dir():
            cache = DigestCache(Path(self.trainer.default_root_dir) / CACHE_NAME if self._trainer is not None else None)
            source += f"|{folder_digest(self.model_path, cache)}"
            cache.save()
        return hashlib.sha256(source.encode()).hexdigest()[:12]

    # -- forward -------------------------------------------------------------------------

    def response_logps(self, batch: dict[str, torch.Tensor], n_pairs: int | None = None) -> torch.Tensor:
        """Forward pass; the summed response log-probs ``(B,)`` (float32) of the batch's sequences.

        Args:
            batch: ``input_ids``/``attention_mask``/``response_mask`` ``(B, T)`` (``collate``'s).
            n_pairs: a DPO batch of this many pairs (chosen rows first): with packing, their
                shared prompts are laid down once where the attention kernel allows it.
        """
        if self.packing_active():
            kernel = self.model.config._attn_implementation
            share = n_pairs is not None and self._shares_prompts()
            layout = (batch["input_ids"], batch["attention_mask"], batch["response_mask"], self.tokenizer.pad_token_id)
            if kernel in VARLEN_KERNELS:  # they attend within sequences only: the whole batch in one row
                groups = [pack_batch(*layout, row_length=batch["input_ids"].numel())]
            else:  # dense masks: rows of the longest unit, in groups of rows of different widths
                groups = pack_batch_groups(
                    *layout, n_pairs=n_pairs if share else None, pair_cost=self._attention_pair_cost(),
                    # ZeRO-3 forward passes are collectives: every rank must run as many
                    max_groups=1 if needs_lockstep(self.model) else ROW_GROUPS,
                    mask_dtype=self._packing_mask_dtype(),
                )
            logps = None
            for packed in groups:  # each sequence's log-prob comes from one group, zeros from the others
                inputs = dict(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                              position_ids=packed.position_ids)
                if self.logp_chunk_size is None:  # the whole-vocabulary path, kept to measure against
                    group_logps = packed_sequence_logps(self.model(**inputs, use_cache=False).logits, packed, None)
                else:
                    group_logps = self._chunked_logps(inputs, packed.source, packed.target, packed.sequence,
                                                      packed.n_sequences)
                logps = group_logps if logps is None else logps + group_logps
            return logps
        mask = batch["attention_mask"]
        inputs = dict(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask))
        if self.logp_chunk_size is None:
            logits = self.model(**inputs, use_cache=False).logits
            return sequence_logps(logits, batch["input_ids"], batch["response_mask"], None)
        source, target, sequence = padded_positions(batch["input_ids"], batch["response_mask"])
        return self._chunked_logps(inputs, source, target, sequence, batch["input_ids"].shape[0])

    def _chunked_logps(self, inputs: dict, source: torch.Tensor, target: torch.Tensor, sequence: torch.Tensor,
                       n_sequences: int) -> torch.Tensor:
        """One forward pass of ``inputs``; the summed log-probs of the positions ``source`` (``hs_star_pl.tensors.logps``)."""
        route = self.logp_route()
        if route == "logits":
            logits = self.model(**inputs, use_cache=False).logits
            token = selected_logps(logits.reshape(-1, logits.shape[-1]), source, target, self.logp_chunk_size)
            return sum_per_sequence(token, sequence, n_sequences)
        hidden = self.model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        head = self.model.get_output_embeddings()
        if route == "gathered head":  # ZeRO-3, no grad: one gather per pass, the same on every rank
            with gathered([head.weight, head.bias]):
                token = head_logps(hidden, partial(F.linear, weight=head.weight, bias=head.bias), source, target,
                                   self.logp_chunk_size)
        else:
            token = head_logps(hidden, head, source, target, self.logp_chunk_size)
        return sum_per_sequence(token, sequence, n_sequences)

    def logp_route(self) -> Literal["head", "gathered head", "logits"]:
        """How this pass takes its response log-probs (``hs_star_pl.tensors.logps``).

        ``head``: the LM head on a chunk of the last hidden states at a time. ``gathered head``:
        the same under ZeRO-3 without grad (the reference pass, validation), the head's weight
        gathered once for the pass and applied per chunk. ``logits``: the model's own logits,
        chunked in float32 only; under ZeRO-3 with grad (a partitioned head called per chunk
        would gather a different number of times on each rank, and a collective one rank skips
        hangs them all), and for a model whose logits are more than its head on its last hidden
        state (soft-capping, scaling; checked once by ``head_route_problem``, with a warning).
        """
        if self._head_route is None:
            problem = head_route_problem(self.model)
            self._head_route = problem is None
            if problem is not None:
                rank_zero_warn(
                    f"model.logp_chunk_size: {problem}; log-probs are taken from the model's full logits "
                    f"(chunked in float32 only)"
                )
        if not self._head_route:
            return "logits"
        if is_zero3_partitioned(self.model):  # asked every pass: a model may be partitioned after its first
            plain = type(self.model.get_output_embeddings()) is nn.Linear
            return "gathered head" if plain and not torch.is_grad_enabled() else "logits"
        return "head"

    def _packing_mask_dtype(self) -> torch.dtype:
        """The shared-prompt layout's 4-D mask: additive, in the model's dtype.

        Not boolean, also for ``sdpa``: torch turns a boolean mask into an additive one inside
        every layer's call and keeps each layer's copy for the backward pass, where one additive
        mask serves every layer (tiny benchmark model: 3-5% faster, and 4 bytes per mask entry
        kept instead of 4 per layer). The outputs are identical (``tests/test_packing.py``)."""
        return self.model.dtype

    def _attention_pair_cost(self) -> float:
        if self._pair_cost is None:
            self._pair_cost = attention_pair_cost(self.model)
        return self._pair_cost

    def _shares_prompts(self) -> bool:
        return self.packing == "shared_prompts" and self.model.config._attn_implementation in SHARED_PROMPT_KERNELS

    def packing_active(self) -> bool:
        """Whether forward passes are packed: ``model.packing`` is not ``off``, and a small check (run
        on the first call, three forward passes of two short pairs, in the layout asked for) has
        shown that this model keeps packed sequences apart."""
        if self.packing == "off":
            return False
        share = self._shares_prompts()
        if share not in self._packing_checked:
            kernel = self.model.config._attn_implementation
            problem = packing_problem(
                self.model, self.tokenizer.pad_token_id, share_prompts=share, mask_dtype=self._packing_mask_dtype(),
            )
            self._packing_checked[share] = problem is None
            if problem is not None:
                rank_zero_warn(
                    f"model.packing: this model's attention ({kernel!r}) cannot run packed rows ({problem}); "
                    f"every batch is padded instead. Set model.packing: off to silence this"
                )
        return self._packing_checked[share]

    def compute_reference_logps(
        self,
        pairs: Sequence[PreferencePair],
        *,
        max_length: int,
        batch_size: int = 16,
        sort_by_length: bool = True,
        progress: bool = False,
    ) -> list[PreferencePair]:
        """Reference log-probs of every pair under the policy as it is now (``reference.score_pairs``).

        ``progress`` shows a bar over the pairs (rank 0, with ``trainer.enable_progress_bar``).
        """
        return score_pairs(self, pairs, max_length=max_length, batch_size=batch_size, sort_by_length=sort_by_length,
                           trainer=self._trainer if progress else None)

    def precision_context(self) -> AbstractContextManager:
        """The trainer's precision context for a forward pass outside a training step (none unattached)."""
        return self._trainer.strategy.precision_plugin.forward_context() if self._trainer else nullcontext()

    # -- steps ---------------------------------------------------------------------------

    def model_step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        n_pairs = batch["ref_chosen_logps"].shape[0] if "ref_chosen_logps" in batch else None
        logps = self.response_logps(batch, n_pairs=n_pairs)
        metrics = self.metrics[f"{split}_"]  # ModuleDict keys may not shadow nn.Module.train
        if self.objective == "sft":
            loss = token_averaged_nll(logps, batch["response_mask"])  # losses.sft_nll's value
            if split == "train" and self._nonfinite(loss, "loss"):
                return None
            metrics["loss"](loss.detach())
        else:
            if n_pairs is None:
                raise RuntimeError("DPO batch without reference log-probs: compute them before training")
            chosen, rejected = logps[:n_pairs], logps[n_pairs:]
            loss, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], self.beta, self.loss_type
            )
            if self.sft_weight > 0:
                n_tokens = batch["response_mask"][:n_pairs, 1:].sum(-1)
                loss = loss + self.sft_weight * chosen_nll(chosen, n_tokens)
            if split == "train" and self._nonfinite(loss, "loss"):
                return None
            metrics["loss"](loss.detach())
            metrics["reward_accuracy"]((chosen_rewards > rejected_rewards).float())
            metrics["margin"](chosen_rewards - rejected_rewards)
            metrics["chosen_reward"](chosen_rewards)
            metrics["rejected_reward"](rejected_rewards)
            metrics["chosen_logps"](chosen.detach())
            metrics["rejected_logps"](rejected.detach())
        batch_size = batch["input_ids"].shape[0]
        for name, metric in metrics.items():
            self.log(f"{split}/{name}", metric, on_step=split == "train", on_epoch=True, prog_bar=name == "loss",
                     batch_size=batch_size)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if is_empty_iteration(batch):  # an iteration whose round gave no examples
            return None
        self._batch_idx = batch_idx
        return self.model_step(batch, "train")

    # -- numerical faults ------------------------------------------------------------------

    def _where(self) -> str:
        trainer = self._trainer
        if trainer is None:
            return f"batch {self._batch_idx}"
        return f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"

    def _nonfinite(self, value: torch.Tensor, what: str) -> bool:
        """Whether to skip this update because ``value`` is NaN/inf on any rank; raises in ``raise`` mode."""
        bad = not bool(torch.isfinite(value.detach()).all())
        if self._trainer is not None:  # every rank must take the same decision, or DDP hangs
            bad = self._trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return False
        if self.nonfinite_loss == "raise":
            raise NonFiniteLossError(
                f"non-finite training {what} ({value.detach().float().flatten()[:4].tolist()}) at {self._where()}; "
                f"training stopped before this update, so every checkpoint and export on disk predates it. "
                f"Lower the learning rate, check the data (reference log-probs, very long responses), or set "
                f"model.nonfinite_loss: skip to drop such batches"
            )
        self.n_nonfinite_skipped += 1
        rank_zero_warn(f"non-finite training {what} at {self._where()}: update skipped (model.nonfinite_loss: skip)")
        self.log("train/nonfinite_skipped", float(self.n_nonfinite_skipped), on_step=True, on_epoch=False, batch_size=1)
        return True

    def on_before_optimizer_step(self, optimizer) -> None:
        # A finite loss can still give inf gradients (overflow in the backward pass); the
        # optimizer would write them into the weights and the next checkpoint.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
        if self._nonfinite(norm, "gradient norm"):
            for p in self.model.parameters():
                p.grad = None  # optimizers skip parameters without a gradient: no update at all
            return
        # Before clipping (Lightning clips after this hook), so a norm above
        # trainer.gradient_clip_val shows; a skipped non-finite one is counted above instead.
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "val")

    # -- evaluation ------------------------------------------------------------------------

    @torch.no_grad()
    def generate_for_eval(self, batch: EvalBatch) -> dict[str, list[Completion]]:
        """Responses to an evaluation batch: from the policy in memory (``HFEngine``), or from
        the batch's own engine when it carries one (``evaluation.engine``, e.g. vLLM, which the
        evaluation callback has pointed at this policy's weights).

        The one generation path of evaluation: ``hs-star test`` reaches it through
        ``test_step`` and the in-training evaluation calls it directly, so the two give the
        same responses for the same weights and chunks. Runs under the trainer's precision
        context when attached, as ``test_step`` does.
        """
        if batch.engine is not None:
            return batch.engine.generate(batch.requests(), batch.params)
        from hs_star_pl.engines import HFEngine

        engine = HFEngine(batch_size=batch.batch_size, progress=False, seed_scope=batch.seed_scope)
        engine.bind(self.model, self.tokenizer)
        with self.precision_context():
            return engine.generate(batch.requests(), batch.params)

    def test_step(self, batch: EvalBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, list[Completion]]:
        """Generate for one chunk of a benchmark; ``EvaluationCallback`` grades and aggregates."""
        return self.generate_for_eval(batch)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        faults.reach("training_step", epoch=self.current_epoch, batch=batch_idx)
        if self._batch_started is None or is_empty_iteration(batch):
            return
        seconds = max(time.perf_counter() - self._batch_started, 1e-9)
        n_tokens = float(batch["attention_mask"].sum())
        self.log("train/tokens_per_s", n_tokens / seconds, on_step=True, on_epoch=False, batch_size=1)

    # -- optimisation ----------------------------------------------------------------------

    def configure_optimizers(self):
        # with LoRA the frozen base weights stay out of the optimizer (and out of its state)
        optimizer = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
            total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
            scheduler.set_total_steps(int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
