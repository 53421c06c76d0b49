"""Learned PRMs in two public checkpoint formats, loaded from a local folder.

Supported layouts (a folder with ``config.json`` of a Qwen2 model, tokenizer files, and
weights as ``model.safetensors``, sharded ``*.safetensors`` with an index, or
``pytorch_model*.bin``):

* :class:`SkyworkPRM` (Skywork-o1-Open-PRM-Qwen-2.5-1.5B/7B): ``model.*`` (a ``Qwen2Model``)
  plus ``v_head.summary.{weight,bias}`` (a ``Linear(hidden, 1)``). Keys under
  ``pretrained_model.`` are accepted as well; ``lm_head.*`` is ignored. A score is
  ``sigmoid(value)`` at a separator token. Two input modes:

  - ``"reference"`` (default): the HS-STaR reference's Skywork scoring, on which the paper's
    thresholds were fitted. ``encode(bos + question + "\\n")``, then the *raw* response split
    on ``step_separator`` (``"\\n\\n"``, not stripped): each piece, empty ones included, is
    encoded on its own and followed by the last token of ``encode(step_separator)``, and
    every piece gets a score. Pieces that splitting into steps drops (blank ones) hand their
    score to the step before them (the first step for leading ones) as a minimum, so a
    step's score is the lowest score seen up to the next step and the minimum over steps is
    the reference's minimum over pieces. Needs ``StepScoringRequest.response``; without it
    each given step is one piece.
  - ``"steps"``: each step the caller gives (stripped, blank blocks dropped) encoded without
    special tokens and followed by the separator's last token (Skywork's own examples use
    ``"\\n"``).
* :class:`QwenMathPRM` (Qwen2.5-Math-PRM-7B/72B): ``model.*`` plus ``score.0`` (a
  ``Linear(hidden, hidden)``), ReLU, ``score.2`` (a ``Linear(hidden, 2)``). The input is the
  chat template (system prompt, question, assistant turn) followed by each step's tokens and
  ``<extra_0>``; a step's score is the softmax probability of class 1 at its ``<extra_0>``.
  The real checkpoints ship remote code; we load the same tensors without it.

Both models are causal, so the tokens after the last separator (the real pipelines append
``<|im_end|>``) cannot change any step score and are not fed. Step text is tokenized with
``split_special_tokens=True``: a response that *writes* ``<extra_0>`` cannot forge a
separator. (Skywork's reference mode reads text with ``encode``'s defaults, as the reference
does; scores are read at the positions we place, never found by token id, so a written
special token still cannot add or move a score.)

**Truncation** (one score per step, always): when the prompt plus all steps exceed
``max_length`` tokens, the question is kept whole if the first step fits after it, else it
is cut from the *left* (then, if one step alone is too long, that step is cut from the left,
keeping its separator). Steps are then kept whole while they fit; the steps that do not fit
get the score of the last scored step (carried forward, which leaves the minimum over steps
unchanged) and are counted in ``n_truncated``.

Verified here only on tiny random models built with :mod:`hs_star_pl.tensors.tiny` in the same
layout (plumbing: positions, padding, truncation); no real weights were available, so the
numbers a real checkpoint produces were not compared with its reference implementation.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import os
import time
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, Qwen2Model

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4
    from transformers.modeling_utils import no_init_weights

from hs_star_pl.infra.errors import ConfigError
from hs_star_pl.infra.progress import progress
from hs_star_pl.tensors.attention import check_attn_implementation
from hs_star_pl.tensors.hub import resolve_model
from hs_star_pl.core.protocols import Offloadable, StepScoringRequest
from hs_star_pl.infra.digests import DigestCache, keys_of

_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SKYWORK_INPUT_MODES = ("reference", "steps")
QWEN_PRM_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
OFFLOAD_MODES = ("none", "cpu", "reload")
"""Where a PRM's weights wait between rounds: on its device, in host memory, or nowhere (re-read)."""


# ---------------------------------------------------------------------------------------
# Modules and checkpoint I/O
# ---------------------------------------------------------------------------------------


class _ValueHead(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)


class Qwen2ValueHeadModel(nn.Module):
    """Qwen2 body + scalar value head: the Skywork-o1-Open-PRM layout. Output ``(B, T)``."""

    architecture = "Qwen2ForPrmModel"

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.v_head = _ValueHead(config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return torch.sigmoid(self.v_head.summary(hidden).squeeze(-1).float())


class Qwen2TwoClassPRMModel(nn.Module):
    """Qwen2 body + 2-class token head: the Qwen2.5-Math-PRM layout. Output ``(B, T)``."""

    architecture = "Qwen2ForProcessRewardModel"

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        h = config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return torch.softmax(self.score(hidden).float(), dim=-1)[..., 1]


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: ``*.safetensors``, else ``pytorch_model*.bin``."""
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(
            f"prm.init_args.model_path={str(path)!r} has no *.safetensors or pytorch_model*.bin weights"
        )
    return files


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def load_prm_model(cls: type[nn.Module], path: str | Path, device: torch.device, dtype: torch.dtype,
                   attn_implementation: str | None = None):
    """Build ``cls`` from ``path/config.json`` on ``device`` in ``dtype`` and load its weights.

    ``attn_implementation`` (checked by the caller) sets the body's attention kernel; ``None``
    keeps transformers' default.

    Raises:
        ValueError: when tensors the layout needs are missing, or unknown ones are present.
    """
    path = Path(path)
    config = AutoConfig.from_pretrained(str(path))
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation  # what from_pretrained(attn_implementation=) sets
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # every tensor is loaded below (a missing one is an error), so skip the random
        # initialisation: 4-12 s for a 0.36B model on one CPU core, minutes at 7B
        with torch.device(device), no_init_weights():
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    state = {}
    for key, tensor in _read_state_dict(path).items():
        key = key.removeprefix("pretrained_model.")
        if key.startswith("lm_head.") or key.endswith("rotary_emb.inv_freq"):
            continue
        state[key] = tensor
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"prm.init_args.model_path={str(path)!r} is not in the {cls.architecture} layout: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval()


def save_prm_model(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` as ``config.json`` + ``model.safetensors`` (the layout we load)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [model.architecture]
    model.config.save_pretrained(str(path))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return path


# ---------------------------------------------------------------------------------------
# Batching and truncation
# ---------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``"auto"``: this process's GPU (``cuda:LOCAL_RANK``) when CUDA is there, else the CPU.

    The PRM is built when the config is parsed, before Lightning sets each process's device,
    so plain ``"cuda"`` would put every rank's copy on GPU 0. ``LOCAL_RANK`` is set by
    torchrun and by Lightning's launcher for the processes it starts (and unset, meaning 0,
    in the process that launches them); under SLURM ``SLURM_LOCALID`` plays that part.
    """
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def fit_to_length(
    prefix: list[int], chunks: list[list[int]], max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids within ``max_length`` and the separator position of each kept step.

    Each chunk is one step's tokens ending with its separator token. See the module
    docstring for the policy; ``len(positions) < len(chunks)`` means steps were dropped.
    """
    if chunks and len(prefix) + sum(map(len, chunks)) > max_length:
        first = chunks[0]
        if len(prefix) + len(first) > max_length:
            room = max_length - len(first)
            if room >= 0:
                prefix = prefix[len(prefix) - room :]
            else:
                prefix, first = [], first[-max_length:]
            chunks = [first, *chunks[1:]]
    ids = list(prefix)
    positions: list[int] = []
    for chunk in chunks:
        if len(ids) + len(chunk) > max_length:
            break
        ids.extend(chunk)
        positions.append(len(ids) - 1)
    return ids, positions


class _StepScorer:
    """Length-sorted, padded batches through a ``(B, T) -> (B, T)`` score function."""

    def __init__(self, pad_id: int, batch_size: int, max_length: int,
                 device: torch.device, progress: bool, name: str) -> None:
        self.pad_id, self.batch_size = pad_id, batch_size
        self.max_length, self.device, self.progress, self.name = max_length, device, progress, name
        self.n_truncated = 0

    def run(self, model: nn.Module, prefixes: list[list[int]],
            chunk_lists: list[list[list[int]]]) -> list[list[float]]:
        fitted = [fit_to_length(p, c, self.max_length) for p, c in zip(prefixes, chunk_lists)]
        out: list[list[float]] = [[] for _ in fitted]
        order = sorted((i for i, (_, pos) in enumerate(fitted) if pos), key=lambda i: -len(fitted[i][0]))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        bar = progress(len(batches), f"{self.name} scoring", "batch", shown=self.progress and len(batches) >= 8)
        for batch in batches:
            width = len(fitted[batch[0]][0])
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = fitted[i][0]
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = 1
            with torch.inference_mode():
                scores = model(input_ids.to(self.device), mask.to(self.device)).float().cpu()
            for row, i in enumerate(batch):
                out[i] = scores[row, fitted[i][1]].tolist()
            bar.update(1)
        bar.close()
        for i, (chunks, (_, positions)) in enumerate(zip(chunk_lists, fitted)):
            missing = len(chunks) - len(positions)
            if missing:
                self.n_truncated += 1
                out[i] = out[i] + [out[i][-1]] * missing
        if any(not all(0.0 <= s <= 1.0 and not math.isnan(s) for s in row) for row in out):
            raise RuntimeError(f"{self.name} produced a score outside [0, 1] (NaN weights or overflow?)")
        return out


def _check_common(model_path: str, max_length: int, batch_size: int, device: str, dtype: str,
                  attn_implementation: str | None, offload: str, revision: str | None = None) -> str:
    """Refuse bad settings (every one in one message); the folder ``model_path`` names (a hub id
    resolves to its snapshot, ``hs_star_pl.tensors.hub``)."""
    errors = []
    if offload not in OFFLOAD_MODES:
        errors.append(f"prm.init_args.offload must be one of {list(OFFLOAD_MODES)}, got {offload!r}")
    try:
        check_attn_implementation(attn_implementation, "prm.init_args.attn_implementation")
    except ValueError as err:
        errors.append(str(err))
    folder = str(model_path)
    try:
        folder = resolve_model(model_path, revision, "prm.init_args.model_path")
    except ConfigError as err:
        errors.append(str(err))
    if max_length < 8:
        errors.append(f"prm.init_args.max_length must be >= 8, got {max_length}")
    if batch_size < 1:
        errors.append(f"prm.init_args.batch_size must be >= 1, got {batch_size}")
    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        errors.append(f"prm.init_args.device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if dtype not in _DTYPES:
        errors.append(f"prm.init_args.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if errors:
        raise ValueError("; ".join(errors))
    return folder


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


# ---------------------------------------------------------------------------------------
# The two PRMs
# ---------------------------------------------------------------------------------------


class _LearnedPRM(Offloadable):
    """What both learned PRMs share: their model's loading, batching, and where it waits between rounds.

    ``offload`` (see :data:`OFFLOAD_MODES`) decides what :meth:`sleep`, which the
    self-training loop calls after each round, does with the weights: ``"none"`` leaves
    them on the scoring device; ``"cpu"`` moves them to host memory (and empties CUDA's
    cache), so DPO training has the GPU memory; ``"reload"`` drops them, freeing host
    memory as well, and reads them from ``model_path`` again. The next :meth:`score`
    brings them back first (:meth:`wake_up`); ``seconds_waking`` adds up what that took.
    """

    layout: ClassVar[type[nn.Module]]

    def _load(self, model_path: str, device: str, dtype: str, attn_implementation: str | None,
              offload: str, pad_id: int, batch_size: int, max_length: int, progress: bool) -> None:
        self.model_path, self.offload = Path(model_path), offload
        self._device = resolve_device(device)
        self._load_model = functools.partial(
            load_prm_model, self.layout, self.model_path, self._device, resolve_dtype(dtype, self._device),
            attn_implementation,
        )
        # what was read: each weight file's cache key now, its digest at the first sleep (reload)
        files = weight_files(self.model_path)
        self._weight_names, self._weight_keys = [f.name for f in files], keys_of(files)
        self._weight_digests: list[str] | None = None
        self._model: nn.Module | None = self._load_model()
        self._on_device = True
        self._scorer = _StepScorer(pad_id, batch_size, max_length, self._device, progress, type(self).__name__)
        if offload == "cpu" and self._device.type == "cpu":
            warnings.warn(
                f"prm.init_args.offload='cpu' does nothing here: {type(self).__name__} already runs on the CPU",
                stacklevel=3,
            )

    @property
    def model(self) -> nn.Module:
        """The scoring model on its device (brought back first when it sleeps)."""
        self.wake_up()
        assert self._model is not None
        return self._model

    @property
    def resident(self) -> bool:
        """Whether the weights are on the scoring device now."""
        return self._model is not None and self._on_device

    @property
    def n_truncated(self) -> int:
        """Responses so far whose last steps did not fit in ``max_length``."""
        return self._scorer.n_truncated

    def wake_up(self) -> None:
        """Bring the weights back to the scoring device (re-read them under ``offload: reload``).

        Raises:
            RuntimeError: under ``offload: reload``, when the weight files in ``model_path``
                changed since they were first read (the run would score with another PRM).
        """
        if self.resident:
            return
        started = time.perf_counter()
        if self._model is None:
            if not self._same_weights():
                raise RuntimeError(
                    f"the weight files in prm.init_args.model_path={str(self.model_path)!r} changed since this "
                    f"run first read them; prm.init_args.offload='reload' reads them again each round, so the "
                    f"run would go on with another PRM. Restore them, or resume with offload: cpu or none"
                )
            self._model = self._load_model()
        else:
            self._model.to(self._device)
        self._on_device = True
        self.seconds_waking += time.perf_counter() - started

    def _remember_weights(self) -> None:
        """Before the weights are dropped: the digests of the files as read (``infra.digests``).

        Taken only while every file's key is still the one it had when read, so the digests are
        of what is in memory; the settings record usually has them already (no second read).
        """
        if self._weight_digests is not None:
            return
        files = weight_files(self.model_path)
        if keys_of(files) == self._weight_keys:
            cache = DigestCache()
            self._weight_digests = [cache.digest(f) for f in files]

    def _same_weights(self) -> bool:
        """Whether the files hold what was first read: keys unchanged, or else the same digests."""
        try:
            files = weight_files(self.model_path)
        except FileNotFoundError:
            return False
        if keys_of(files) == self._weight_keys:
            return True
        if self._weight_digests is None or [f.name for f in files] != self._weight_names:
            return False
        cache = DigestCache()
        return [cache.digest(f) for f in files] == self._weight_digests

    def sleep(self) -> None:
        """Move the weights off the scoring device as ``offload`` says (nothing for ``"none"``)."""
        if self.offload == "none" or not self.resident:
            return
        if self.offload == "reload":
            self._remember_weights()
            weight = weakref.ref(next(self._model.parameters()))
            self._model = None
            if weight() is not None:  # held by a reference cycle: collect it now (a full gc takes ~0.2 s)
                gc.collect()
        elif self._device.type != "cpu":
            self._model.to("cpu")
        else:
            return  # offload: cpu on the CPU: already there
        self._on_device = False
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _score_tokens(self, prefixes: list[list[int]], chunk_lists: list[list[list[int]]]) -> list[list[float]]:
        return self._scorer.run(self.model, prefixes, chunk_lists)


class SkyworkPRM(_LearnedPRM):
    """Skywork-o1-Open-PRM-style scorer: ``sigmoid(value head)`` at each step separator.

    Args:
        model_path: a local folder or a hub id (``org/name``) in the Skywork layout (``model.*`` + ``v_head.summary.*`` tensors;
            see ``hs_star_pl.prm.hf``).
        max_length: token limit of one scored sequence; longer inputs keep every step's score
            (steps that do not fit repeat the last scored one; see ``hs_star_pl.prm.hf``).
        batch_size: sequences per forward pass (sorted by length, padded on the right).
        device: ``"auto"`` (this process's GPU, ``cuda:LOCAL_RANK``, when CUDA is available, else
            CPU), ``"cpu"`` or ``"cuda[:N]"``.
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        attn_implementation: the body's attention kernel (``eager``, ``sdpa``,
            ``flash_attention_2``, ...; see ``hs_star_pl.tensors.attention``); ``None`` keeps
            transformers' default (``sdpa``).
        step_separator: text whose last token ends every scored piece. In ``"reference"`` mode
            the response is also split on it, so it must equal ``self_training.step_delimiter``;
            the HS-STaR reference uses ``"\\n\\n"`` (Skywork's own examples ``"\\n"``).
        input_mode: ``"reference"``: the HS-STaR reference's input, token for token (the raw
            response split on ``step_separator``, every piece scored, empty ones included);
            ``"steps"``: the stripped, non-blank steps the caller gives, each followed by the
            separator token. See ``hs_star_pl.prm.hf``.
        progress: show a progress bar when a call has 8 batches or more.
        offload: where the weights wait between rounds, so that DPO training has their memory:
            ``"none"`` (stay on ``device``), ``"cpu"`` (host memory; moved back before the next
            round's first score), ``"reload"`` (dropped, read again from ``model_path``).
        revision: the hub revision of a hub-id ``model_path``; ``None`` for the default branch.
    """

    layout = Qwen2ValueHeadModel

    def __init__(self, model_path: str, max_length: int = 4096, batch_size: int = 8,
                 device: str = "auto", dtype: str = "auto", step_separator: str = "\n\n",
                 input_mode: str = "reference", progress: bool = True,
                 attn_implementation: str | None = None, offload: str = "none",
                 revision: str | None = None) -> None:
        model_path = _check_common(model_path, max_length, batch_size, device, dtype, attn_implementation, offload,
                                   revision)
        if not step_separator:
            raise ValueError("prm.init_args.step_separator must be a non-empty string")
        if input_mode not in SKYWORK_INPUT_MODES:
            raise ValueError(f"prm.init_args.input_mode must be one of {list(SKYWORK_INPUT_MODES)}, got {input_mode!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.step_separator, self.input_mode = step_separator, input_mode
        if input_mode == "reference":
            if self.tokenizer.bos_token is None:
                raise ValueError(
                    f"prm.init_args.input_mode='reference' starts the input with the tokenizer's "
                    f"bos_token, as the reference does, but the tokenizer in {model_path!r} has none; "
                    f"use input_mode: steps for such a model"
                )
            sep = self.tokenizer.encode(step_separator)  # the reference's own call
        else:
            sep = self.tokenizer(step_separator, add_special_tokens=False)["input_ids"]
        if not sep:
            raise ValueError(f"prm.init_args.step_separator={step_separator!r} encodes to no token")
        self.separator_id = sep[-1]
        self._warned_no_response = False
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.separator_id
        self._load(model_path, device, dtype, attn_implementation, offload, pad, batch_size, max_length, progress)

    def step_delimiter_error(self, delimiter: str) -> str | None:
        """In ``"reference"`` mode the response is split on ``step_separator``, so it must be the run's delimiter."""
        if self.input_mode != "reference" or self.step_separator == delimiter:
            return None
        return (f"prm.init_args.step_separator ({self.step_separator!r}) must equal the run's step delimiter "
                f"({delimiter!r}, self_training.step_delimiter or the template's): SkyworkPRM(input_mode='reference') "
                f"splits each response on it; set both to the same string, or input_mode: steps")

    def pieces(self, request: StepScoringRequest) -> tuple[list[str], list[int]]:
        """The texts scored for ``request`` and, for each, the index of the step it scores.

        In ``"steps"`` mode, or without ``request.response``, the pieces are the steps. In
        ``"reference"`` mode they are ``request.response.split(step_separator)`` unstripped; a
        blank piece belongs to the step before it (the first step when none is before it).
        A response with no steps has no pieces.

        Raises:
            ValueError: when the response's non-blank pieces are not ``request.steps``, i.e. the
                round split it on another delimiter than ``step_separator``.
        """
        steps = list(request.steps)
        if self.input_mode == "steps" or request.response is None:
            if self.input_mode == "reference" and not self._warned_no_response:
                self._warned_no_response = True
                warnings.warn(
                    "SkyworkPRM(input_mode='reference') got a StepScoringRequest without its response: "
                    "each step is scored as one piece, as if the response were "
                    f"{self.step_separator!r}.join(steps); blank blocks and whitespace around steps, "
                    "which the reference scores, are lost (pass response= to score its exact input)",
                    stacklevel=3,
                )
            return steps, list(range(len(steps)))
        pieces = request.response.split(self.step_separator)
        owners: list[int] = []
        blocks: list[str] = []
        for piece in pieces:
            if piece.strip():
                blocks.append(piece.strip())
            owners.append(max(len(blocks) - 1, 0))
        if blocks != steps:
            raise ValueError(
                f"SkyworkPRM(input_mode='reference') splits each response on prm.init_args.step_separator="
                f"{self.step_separator!r}; for the response to {request.question[:60]!r} that gives "
                f"{len(blocks)} non-blank blocks, not the {len(steps)} steps it was given: set "
                f"self_training.step_delimiter to the same string"
            )
        return (pieces, owners) if steps else ([], [])

    def encode(self, request: StepScoringRequest) -> tuple[list[int], list[list[int]]]:
        """The prompt tokens and, per piece (see :meth:`pieces`), its tokens and the separator token."""
        return self._encode_pieces(request.question, self.pieces(request)[0])

    def _encode_pieces(self, question: str, pieces: list[str]) -> tuple[list[int], list[list[int]]]:
        bos = self.tokenizer.bos_token or ""
        if self.input_mode == "reference":
            # as the reference: one encode() call with its defaults per text, nothing for "",
            # so special-token text in a response is read as the reference reads it
            prefix = self.tokenizer.encode(bos + question + "\n")
            return prefix, [(self.tokenizer.encode(p) if p else []) + [self.separator_id] for p in pieces]
        prefix = _encode(self.tokenizer, question + "\n")
        if bos:
            prefix = self.tokenizer(bos, add_special_tokens=False)["input_ids"] + prefix
        return prefix, [_encode(self.tokenizer, s) + [self.separator_id] for s in pieces]

    def score(self, requests: Sequence[StepScoringRequest]) -> list[list[float]]:
        """One score in [0, 1] per step (the minimum over its pieces); no steps gives ``[]``."""
        layouts = list(map(self.pieces, requests))
        encoded = [self._encode_pieces(r.question, pieces) for r, (pieces, _) in zip(requests, layouts)]
        piece_scores = self._score_tokens([e[0] for e in encoded], [e[1] for e in encoded])
        out = []
        for request, scores, (_, owner) in zip(requests, piece_scores, layouts):
            steps: list[float | None] = [None] * len(request.steps)
            for value, k in zip(scores, owner):
                steps[k] = value if steps[k] is None else min(steps[k], value)
            out.append(steps)
        return out


class QwenMathPRM(_LearnedPRM):
    """Qwen2.5-Math-PRM-style scorer: P(positive) of the 2-class head at each ``<extra_0>``.

    Args:
        model_path: a local folder or a hub id (``org/name``) in the Qwen2.5-Math-PRM layout (``model.*`` + ``score.0``/``score.2``;
            see ``hs_star_pl.prm.hf``);
            its tokenizer must have ``step_separator`` as one token.
        max_length: token limit of one scored sequence; longer inputs keep every step's score
            (steps that do not fit repeat the last scored one; see ``hs_star_pl.prm.hf``).
        batch_size: sequences per forward pass (sorted by length, padded on the right).
        device: ``"auto"`` (this process's GPU, ``cuda:LOCAL_RANK``, when CUDA is available, else
            CPU), ``"cpu"`` or ``"cuda[:N]"``.
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        attn_implementation: the body's attention kernel (``eager``, ``sdpa``,
            ``flash_attention_2``, ...; see ``hs_star_pl.tensors.attention``); ``None`` keeps
            transformers' default (``sdpa``).
        step_separator: the separator token, ``"<extra_0>"`` for the released models.
        system_prompt: system message of the chat template (the model card's by default).
        progress: show a progress bar when a call has 8 batches or more.
        offload: where the weights wait between rounds, so that DPO training has their memory:
            ``"none"`` (stay on ``device``), ``"cpu"`` (host memory; moved back before the next
            round's first score), ``"reload"`` (dropped, read again from ``model_path``).
        revision: the hub revision of a hub-id ``model_path``; ``None`` for the default branch.
    """

    layout = Qwen2TwoClassPRMModel

    def __init__(self, model_path: str, max_length: int = 4096, batch_size: int = 8,
                 device: str = "auto", dtype: str = "auto", step_separator: str = "<extra_0>",
                 system_prompt: str = QWEN_PRM_SYSTEM_PROMPT, progress: bool = True,
                 attn_implementation: str | None = None, offload: str = "none",
                 revision: str | None = None) -> None:
        model_path = _check_common(model_path, max_length, batch_size, device, dtype, attn_implementation, offload,
                                   revision)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        sep = self.tokenizer(step_separator, add_special_tokens=False)["input_ids"]
        if len(sep) != 1:
            raise ValueError(
                f"prm.init_args.step_separator={step_separator!r} must be a single token of the "
                f"tokenizer in {model_path!r}, it encodes to {len(sep)} tokens"
            )
        self.separator_id = sep[0]
        self.system_prompt = system_prompt
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._load(model_path, device, dtype, attn_implementation, offload, pad, batch_size, max_length, progress)

    def prompt_text(self, question: str) -> str:
        """The chat-formatted prompt up to the assistant turn (ChatML when no template)."""
        messages = [{"role": "system", "content": self.system_prompt},
                    {"role": "user", "content": question}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + (
            "<|im_start|>assistant\n"
        )

    def encode(self, request: StepScoringRequest) -> tuple[list[int], list[list[int]]]:
        """The prompt tokens and, per step, its tokens followed by the separator token."""
        prefix = self.tokenizer(self.prompt_text(request.question), add_special_tokens=False)["input_ids"]
        return prefix, [_encode(self.tokenizer, s) + [self.separator_id] for s in request.steps]

    def score(self, requests: Sequence[StepScoringRequest]) -> list[list[float]]:
        """One score in [0, 1] per step; a request with no steps gets ``[]``."""
        encoded = [self.encode(r) for r in requests]
        return self._score_tokens([e[0] for e in encoded], [e[1] for e in encoded])


def build_tiny_prm_dir(path: str | Path, kind: str, *, seed: int = 0, tokenizer=None, **config_kwargs: int) -> Path:
    """Save a tiny random PRM in the ``kind`` layout (``"skywork"`` or ``"qwen"``) with a tokenizer.

    For tests and benchmarks: a byte-level Qwen2 tokenizer (plus ``<extra_0>`` for ``"qwen"``;
    ``<|endoftext|>`` as BOS for ``"skywork"``, whose reference input starts with one) unless
    ``tokenizer`` is given, and a randomly initialised model sized to it, written exactly as
    the loaders above expect.
    """
    from hs_star_pl.tensors.tiny import EOS, build_byte_tokenizer, tiny_qwen2_config

    if kind not in ("skywork", "qwen"):
        raise ValueError(f"kind must be 'skywork' or 'qwen', got {kind!r}")
    if tokenizer is None:
        tokenizer = build_byte_tokenizer(["<extra_0>"] if kind == "qwen" else [])
        if kind == "skywork":
            tokenizer.bos_token = EOS
    config = tiny_qwen2_config(len(tokenizer), eos_token_id=tokenizer.eos_token_id, **config_kwargs)
    cls = Qwen2ValueHeadModel if kind == "skywork" else Qwen2TwoClassPRMModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
        for p in model.parameters():  # spread scores away from 0.5 so tests can see them
            if p.dim() == 2:
                nn.init.normal_(p, std=0.2)
    path = save_prm_model(model, path)
    tokenizer.save_pretrained(str(path))
    (path / "hs_star_tiny.json").write_text(json.dumps({"kind": kind, "seed": seed}))
    return path
