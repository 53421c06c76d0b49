"""``EvaluationCallback``: the benchmark evaluation, in ``hs-star test`` and after every iteration.

One group, ``evaluation``, configures both uses:

* **``hs-star test``** (Lightning's test loop): ``setup`` loads every benchmark and hands the
  data module one problem set per benchmark; ``HSStarModule.test_step`` generates for each
  chunk; this callback grades the chunk (``on_test_batch_end``), adds it to the benchmark's
  :class:`~hs_star_pl.training.benchmark_metric.BenchmarkMetric` and keeps the per-problem rows; at the end
  the metrics are reduced across ranks and the results written. Works on an HF directory
  (``--model.model_path``) or a Lightning checkpoint (``--ckpt_path``).
* **During training**: M_0 when training starts and M_{t+1} at the end of iteration t's last
  epoch (before the checkpoint is written, since Lightning runs ``ModelCheckpoint`` last), on
  ``iteration_benchmarks`` with ``iteration_max_problems`` / ``iteration_max_samples``. Ranks
  evaluate ``problems[rank::world]`` in the same chunks the test loop uses and call the same
  ``generate_for_eval``, so the numbers equal ``hs-star test`` on that checkpoint. A result
  already on disk is read, not recomputed, so a resumed run neither repeats nor loses one.

**A stop during training-time evaluation** (SIGTERM, SLURM's requeue signal) is honoured within
one chunk: every graded chunk is kept at once in ``eval/<benchmark>/<label>.chunks/`` (one
atomic JSONL per chunk, named by a digest of what decides it: the benchmark's protocol, the
rendered prompts, the verifier), the request is checked between chunks, and it also cuts the
chunk in progress short (the handler raises inside generation, as in a round) in one process
or on ranks that generate on their own (every one but ZeRO-3's lockstep and an engine process).
At an epoch's end the evaluation is then left unfinished and the epoch's checkpoint is still
written (``ModelCheckpoint`` runs after this callback), so the resumed run restores exactly
the evaluated weights, finishes the evaluation when its training starts (or, after the last
iteration, when ``fit`` ends) and reuses the kept chunks. A rerun chunk is generated as before:
sampled protocols seed each problem's samples from (seed, problem id), greedy ones need no
seed. When M_0 is evaluated (training has not started) the stop raises at once. Ranks agree on
the stop at each chunk boundary, so all stop at the same chunk.

On disk (rank 0), under ``trainer.default_root_dir``: ``eval/<benchmark>/<label>.json`` (the
summary and every problem's responses, extracted answers and verdicts), ``eval/results.json``
(one entry per evaluated policy) and ``results.md`` (the table, one row per policy). Labels
are ``policy_NNN`` during training (shown as ``M_t``) and ``evaluation.label`` or a name
derived from the checkpoint or model directory for ``hs-star test``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import time
from contextlib import nullcontext
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from hs_star_pl.core.artifacts import atomic_write_text, read_jsonl, round_dir, write_json, write_jsonl
from hs_star_pl.core.iterations import IterationClock
from hs_star_pl.core.protocols import AnswerVerifier, RolloutEngine, SamplingParams, lifecycle_of
from hs_star_pl.core.records import Problem
from hs_star_pl.tensors.distributed import all_gather_objects
from hs_star_pl.tensors.zero import needs_lockstep
from hs_star_pl.engines.sync import point_engine_at
from hs_star_pl.infra.errors import ConfigError
from hs_star_pl.evaluation.datasets import BenchmarkConfig, load_benchmark
from hs_star_pl.training.benchmark_metric import BenchmarkMetric
from hs_star_pl.evaluation.protocol import EvalBatch, grade, make_batch, policy_entry, results_table
from hs_star_pl.infra import faults, preemption
from hs_star_pl.infra.progress import phase_bar
from hs_star_pl.training.data import EvalSet, MathDataModule
from hs_star_pl.training.plots import plot_results
from hs_star_pl.training.policy import initial_weights_folder, require_policy
from hs_star_pl.training.tracking import EVAL_COLUMNS, eval_sample_rows, log_image_file, log_pairs_table, log_to_loggers


class _BenchmarkRun:
    """One benchmark within one evaluation: problems, protocol, metric, graded rows."""

    def __init__(self, config: BenchmarkConfig, problems: list[Problem], render: Callable[[str], str],
                 max_new_tokens: int, batch_size: int, engine: Any = None) -> None:
        self.config = config
        self.engine = engine
        self.problems = problems
        self.render = render  # question -> prompt: MathDataModule.render_prompt, as in training
        self.params = SamplingParams(
            temperature=config.temperature, top_p=config.top_p,
            max_new_tokens=config.max_new_tokens or max_new_tokens, seed=config.seed,
        )
        # an engine call takes batch_size sequences: that many problems when greedy, fewer
        # when each has n samples (at least one problem, all of its samples). An engine of
        # its own (vLLM) schedules its batches itself: it gets a process's whole share at once.
        self.problems_per_batch = max(1, len(problems) if engine is not None else batch_size // config.n_samples)
        self.engine_batch_size = max(batch_size, config.n_samples)
        self.metric = BenchmarkMetric(config.n_samples, config.pass_k)
        self.rows: list[dict[str, Any]] = []
        self.seconds = 0.0

    def collate(self, problems: list[Problem]) -> EvalBatch:
        return make_batch(
            self.config.name, problems, render_prompt=lambda p: self.render(p.question),
            params=self.params, n_samples=self.config.n_samples, batch_size=self.engine_batch_size,
            engine=self.engine,
        )

    def batches(self, problems: Sequence[Problem]) -> Iterator[EvalBatch]:
        """The chunks ``test_dataloader`` makes of the same shard, in the same order."""
        for start in range(0, len(problems), self.problems_per_batch):
            yield self.collate(list(problems[start : start + self.problems_per_batch]))

    def record(self, batch: EvalBatch, outputs: dict, verifier: AnswerVerifier) -> list[dict[str, Any]]:
        rows = grade(batch, outputs, verifier, self.config.pass_k)
        self.add(rows)
        return rows

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.metric.update(rows)
        self.rows.extend(rows)

    def n_chunks(self, world_size: int) -> int:
        """Chunks of the largest shard (rank 0's): every rank passes that many chunk boundaries."""
        largest = -(-len(self.problems) // world_size)
        return -(-largest // self.problems_per_batch)

    def finish(self, world_size: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The summary reduced over ranks and every rank's rows, in file order (collective)."""
        summary = self.metric.compute()
        parts = all_gather_objects(world_size, self.rows)
        order = {p.id: i for i, p in enumerate(self.problems)}
        rows = sorted((r for part in parts for r in part), key=lambda r: order[r["problem_id"]])
        if len(rows) != summary["n_problems"] or len({r["problem_id"] for r in rows}) != len(rows):
            raise RuntimeError(f"evaluation of {self.config.name}: {len(rows)} rows for {summary['n_problems']} "
                               "problems; a problem was graded twice or lost")
        return {**summary, "seconds": round(self.seconds, 3)}, rows


def _refuse_a_second_vllm_engine(engine: Any, callbacks: list) -> None:
    """vLLM runs one engine per process: an evaluation during training with a ``VLLMEngine`` of
    its own next to the self-training one would start a second (``VLLMEngine.start`` refuses
    that too, but only once training has run until the first evaluation)."""
    from hs_star_pl.engines.vllm import VLLMEngine

    if not isinstance(engine, VLLMEngine):
        return
    for callback in callbacks:
        other = getattr(callback, "engine", None)
        if getattr(callback, "active", False) and isinstance(other, VLLMEngine) and other is not engine:
            raise ConfigError(
                "evaluation.engine is a second VLLMEngine next to self_training.engine, and vLLM runs one engine per "
                "process: set evaluation.engine: rollout to evaluate with the self-training engine (or null to "
                "evaluate with transformers' generate)"
            )


class EvaluationCallback(L.Callback):
    """Benchmark evaluation for ``hs-star test`` and after every self-training iteration.

    Inactive while neither ``benchmarks`` nor ``problems_file`` is set.

    Args:
        benchmarks: the benchmarks and their protocols (``BenchmarkConfig`` items: ``name``,
            ``path``, ``format``, ``limit``, ``n_samples``, ``temperature``, ``top_p``,
            ``pass_k``, ``max_new_tokens``, ``seed``; for a data set ``split``,
            ``dataset_config``, ``data_files``, ``filters``); see configs/eval/paper.yaml.
        problems_file: a single problem file evaluated greedily as the benchmark ``name``
            (``load_problems`` format: JSONL, parquet, a ``save_to_disk`` folder or
            ``hub:<name>``), before ``benchmarks``.
        name: the benchmark name of ``problems_file``.
        max_problems: evaluate at most this many problems of every benchmark.
        iteration_benchmarks: names of the benchmarks evaluated during training (M_0 and
            after every iteration); ``None`` for all, ``[]`` for none.
        iteration_max_problems: at most this many problems per benchmark during training.
        iteration_max_samples: at most this many samples per problem during training
            (avg@n then uses the smaller n; larger pass@k are dropped).
        verifier: answer verifier (``class_path``); default ``MathVerifyVerifier()``.
        engine: what generates the responses. ``None`` (default): the policy in memory, through
            ``HFEngine`` (``transformers``' ``generate``). An engine with its own copy of the
            weights (``class_path: hs_star_pl.engines.VLLMEngine``): before each evaluation it
            gets the evaluated policy's weights (``hs-star test`` from ``model.model_path``
            loads that folder; otherwise the weights are streamed) and its log-prob canary
            runs; it then receives each process's whole share of a benchmark in one call.
            ``rollout``: the self-training engine (``self_training.engine``), so one vLLM
            instance serves rounds and evaluations (on a GPU, one share of memory instead of
            two); with an in-process rollout engine this is the same as ``None``.
        max_new_tokens: generation cap per response (a benchmark may set its own).
        batch_size: sequences per ``generate`` call.
        label: the results row of ``hs-star test``; default: from ``--ckpt_path`` (run folder
            and file name) or ``model.model_path`` (folder name).
        epochs_per_iteration: training epochs per iteration (linked to
            ``self_training.epochs_per_iteration``).
    """

    def __init__(
        self,
        benchmarks: list[BenchmarkConfig] | None = None,
        problems_file: str | None = None,
        name: str = "test",
        max_problems: int | None = None,
        iteration_benchmarks: list[str] | None = None,
        iteration_max_problems: int | None = None,
        iteration_max_samples: int | None = None,
        verifier: AnswerVerifier | None = None,
        engine: RolloutEngine | Literal["rollout"] | None = None,
        max_new_tokens: int = 512,
        batch_size: int = 128,
        label: str | None = None,
        epochs_per_iteration: int = 1,
    ) -> None:
        errors = []
        for key, value in (("max_problems", max_problems), ("iteration_max_problems", iteration_max_problems),
                           ("iteration_max_samples", iteration_max_samples)):
            if value is not None and value < 1:
                errors.append(f"evaluation.{key} must be >= 1 (or null), got {value}")
        try:
            clock = IterationClock(epochs_per_iteration)
        except ValueError as err:
            errors.append(str(err))
        if max_new_tokens < 1:
            errors.append(f"evaluation.max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            errors.append(f"evaluation.batch_size must be >= 1, got {batch_size}")
        if label is not None and not _LABEL.match(label):
            errors.append(f"evaluation.label {label!r} must be letters, digits, '_', '.' or '-' (it names files)")
        configs = ([BenchmarkConfig(name=name, path=problems_file)] if problems_file is not None else []) + list(benchmarks or [])
        names = [c.name for c in configs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            errors.append(f"evaluation: benchmark names must be unique (problems_file is named by evaluation.name), "
                          f"repeated: {duplicates}")
        unknown = [n for n in iteration_benchmarks or [] if n not in names]
        if unknown:
            errors.append(f"evaluation.iteration_benchmarks names {unknown}, not among the benchmarks {names}")
        if engine is not None and engine != "rollout" and lifecycle_of(engine).in_process:
            errors.append(f"evaluation.engine: {type(engine).__name__} samples from the policy in memory, which is what "
                          "evaluation does with engine: null; set an engine with its own weights (VLLMEngine) or null")
        if errors:
            raise ValueError("; ".join(errors))
        self.benchmarks = list(benchmarks or [])
        self.problems_file = problems_file
        self.name = name
        self.configs = configs
        self.max_problems = max_problems
        self.iteration_benchmarks = iteration_benchmarks
        self.iteration_max_problems = iteration_max_problems
        self.iteration_max_samples = iteration_max_samples
        self.verifier = verifier
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.label = label
        self.clock = clock
        self._fit_plan: list[tuple[BenchmarkConfig, list[Problem]]] = []
        self._test_runs: list[_BenchmarkRun] = []
        self._test_started: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.configs)

    @property
    def state_key(self) -> str:
        return f"EvaluationCallback[{self.name}]"

    @staticmethod
    def eval_root(trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "eval"

    def result_path(self, trainer: L.Trainer, benchmark: str, label: str) -> Path:
        return self.eval_root(trainer) / benchmark / f"{label}.json"

    def chunk_dir(self, trainer: L.Trainer, benchmark: str, label: str) -> Path:
        """Where the graded chunks of an unfinished evaluation are kept (removed once its result is written)."""
        return self.eval_root(trainer) / benchmark / f"{label}.chunks"

    # -- set-up ----------------------------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "test" and not self.active:
            raise ValueError("hs-star test evaluates the evaluation group's benchmarks: set evaluation.benchmarks "
                             "(configs/eval/paper.yaml, configs/eval/tiny.yaml) or evaluation.problems_file")
        if not self.active or stage not in ("fit", "test"):
            return
        datamodule = trainer.datamodule
        if not isinstance(datamodule, MathDataModule):
            raise ValueError("evaluation needs MathDataModule as the data module (its data.template renders the prompts)")
        if self.engine == "rollout":
            raise ValueError("evaluation.engine: rollout names the self-training engine, which hs-star fit/test "
                             "resolves when it builds the callbacks; a callback built by hand takes the engine itself")
        if self.engine is not None:
            lifecycle_of(self.engine).check_world(trainer.world_size)
        if self.verifier is None:
            from hs_star_pl.verifiers import MathVerifyVerifier

            self.verifier = MathVerifyVerifier()
        if stage == "fit":
            chosen = [c for c in self.configs if self.iteration_benchmarks is None or c.name in self.iteration_benchmarks]
            if chosen:
                _refuse_a_second_vllm_engine(self.engine, trainer.callbacks)
            caps = [n for n in (self.max_problems, self.iteration_max_problems) if n is not None]
            self._fit_plan = [
                (c.with_sample_cap(self.iteration_max_samples), load_benchmark(c, min(caps) if caps else None))
                for c in chosen
            ]
            return
        self._test_runs = []
        for config in self.configs:
            problems = load_benchmark(config, self.max_problems)
            if len(problems) < trainer.world_size:
                raise ValueError(f"evaluation.benchmarks[{config.name!r}]: {len(problems)} problems for "
                                 f"{trainer.world_size} processes; every process needs at least one")
            self._test_runs.append(_BenchmarkRun(config, problems, datamodule.render_prompt, self.max_new_tokens,
                                                 self.batch_size, self.engine))
        datamodule.set_eval_sets([EvalSet(r.config.name, r.problems, r.problems_per_batch, r.collate) for r in self._test_runs])

    # -- during training -------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # M_0 on a fresh run; on a resumed one the policy its checkpoint holds (an evaluation
        # a stop left unfinished at that epoch's end is completed here, from its kept chunks)
        if self._fit_plan:
            self.evaluate_policy(trainer, pl_module, self.clock.iteration_of(trainer.current_epoch))

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._fit_plan and self.clock.ends_iteration(trainer.current_epoch):
            # a stop leaves it unfinished: the epoch's checkpoint, written next, keeps the weights
            self.evaluate_policy(trainer, pl_module, self.clock.iteration_of(trainer.current_epoch) + 1,
                                 on_stop="return")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Finish the last policy's evaluation when a stop left it unfinished.

        The stop came while the last iteration was evaluated: its checkpoint was written, so
        the resumed ``fit`` has no epoch left to train and never starts training; here its
        evaluation is completed from the kept chunks. Lightning has moved the module to the
        CPU by now (its teardown); it is put back on the training device for the evaluation.
        """
        epoch = trainer.current_epoch - 1
        if not self._fit_plan or preemption.requested() is not None or epoch < 0 or not self.clock.ends_iteration(epoch):
            return
        policy = self.clock.iteration_of(epoch) + 1
        if all(self.result_path(trainer, c.name, f"policy_{policy:03d}").is_file() for c, _ in self._fit_plan):
            return
        device = trainer.strategy.root_device
        moved = next(pl_module.parameters()).device != device
        if moved:
            pl_module.to(device)
        try:
            self.evaluate_policy(trainer, pl_module, policy)
        finally:
            if moved:
                pl_module.cpu()
        for logger in trainer.loggers:  # they were finalized with the fit; these metrics came after
            logger.save()

    def evaluate_policy(self, trainer: L.Trainer, pl_module: L.LightningModule, policy: int,
                        on_stop: Literal["raise", "return"] = "raise") -> dict[str, Any] | None:
        """Evaluate the current policy as ``M_policy`` on the training-time benchmarks.

        A benchmark whose result file is already there is read instead, and a chunk kept by an
        evaluation that a stop cut short is reused (collective: every rank must call this).

        Args:
            on_stop: what a stop request does: ``raise`` :class:`~hs_star_pl.infra.preemption.Preempted`,
                or ``return`` ``None`` with the evaluation unfinished (its chunks kept).

        Returns:
            The results entry of ``M_policy``, or ``None`` when a stop left it unfinished.
        """
        label = f"policy_{policy:03d}"
        rank, world = trainer.global_rank, trainer.world_size
        summaries: dict[str, dict[str, Any]] = {}
        written: dict[str, tuple[BenchmarkConfig, dict, list]] = {}
        stored = {c.name: path for c, _ in self._fit_plan if (path := self.result_path(trainer, c.name, label)).is_file()}
        generates = self.engine is not None and len(stored) < len(self._fit_plan)
        where = f"during the evaluation of M_{policy}"
        try:
            if generates:
                if self._stop_agreed(trainer):
                    raise preemption.Preempted(preemption.requested() or signal.SIGTERM, where)
                # the weights are streamed: after a resume the policy in memory is whatever the
                # checkpoint holds, which no folder on disk is guaranteed to match
                self._point_engine(pl_module, None, f"M_{policy}")
            for config, problems in self._fit_plan:
                if config.name in stored:
                    summaries[config.name] = json.loads(stored[config.name].read_text())["summary"]
                    continue
                summaries[config.name], rows = self._evaluate_benchmark(trainer, pl_module, config, problems, policy,
                                                                        label, where)
                written[config.name] = (config, summaries[config.name], rows)
        except preemption.Preempted:
            if generates:
                lifecycle_of(self.engine).sleep()
            rank_zero_info(f"eval: M_{policy}'s evaluation stopped by {preemption.signal_name(preemption.requested() or signal.SIGTERM)}; "
                           f"the graded chunks are kept under {self.eval_root(trainer)}/<benchmark>/{label}.chunks/ "
                           "and reused when the run resumes")
            if on_stop == "raise":
                raise
            return None
        if generates:
            lifecycle_of(self.engine).sleep()
        entry = policy_entry(label, summaries, policy=policy, kind="iteration")
        if trainer.is_global_zero:
            for name, (config, summary, rows) in written.items():
                self._write_result(trainer, config, label, policy, None, summary, rows)
                shutil.rmtree(self.chunk_dir(trainer, name, label), ignore_errors=True)
            results_png = self._write_tables(trainer, entry)
            if results_png is not None:
                log_image_file(trainer, "eval/results", results_png)
            for name, (config, summary, rows) in written.items():
                log_pairs_table(trainer, f"eval/{name}/samples", eval_sample_rows(rows), columns=EVAL_COLUMNS)
            metrics = {"eval/policy": float(policy)}
            for name, s in summaries.items():
                metrics[f"eval/{name}_accuracy"] = s["accuracy"]
                metrics.update({f"eval/{name}_{k}": v for k, v in s["pass_at_k"].items()})
            if entry["average"] is not None:
                metrics["eval/average_accuracy"] = entry["average"]
            log_to_loggers(trainer, metrics)
        trainer.strategy.barrier("hs_star_eval_written")
        rank_zero_info(f"eval: M_{policy} " + ", ".join(f"{n} {s['metric']} {100 * s['accuracy']:.1f}%" for n, s in summaries.items()))
        return entry

    def _evaluate_benchmark(self, trainer: L.Trainer, pl_module: L.LightningModule, config: BenchmarkConfig,
                            problems: list[Problem], policy: int, label: str,
                            where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One benchmark, chunk by chunk: kept chunks read back, the others generated, graded and
        kept. A stop request raises ``Preempted`` at a chunk boundary, where the ranks agree (all
        stop at the same one), and cuts the chunk in progress short where no other rank waits on
        it: in one process, or on ranks that generate on their own (not ZeRO-3's lockstep, not an
        engine of their own); such a rank goes on to the next boundary and stops there with the others."""
        rank, world = trainer.global_rank, trainer.world_size
        run = _BenchmarkRun(config, problems, trainer.datamodule.render_prompt, self.max_new_tokens, self.batch_size,
                            self.engine)
        run.metric = run.metric.to(pl_module.device)
        mine = problems[rank::world]
        chunks = list(run.batches(mine))
        n_chunks = run.n_chunks(world)
        folder = self.chunk_dir(trainer, config.name, label)
        cut_short = not needs_lockstep(pl_module.model) and (world == 1 or self.engine is None)
        with phase_bar(trainer, len(mine), f"eval M_{policy} {config.name}", "problem") as bar:
            for index in range(n_chunks + 1):  # the boundary before each chunk, and the one after the last
                batch = chunks[index] if index < len(chunks) else None
                path = folder / f"{self._chunk_key(batch)}.jsonl" if batch is not None else None
                kept = _read_chunk(path, batch) if path is not None else None
                if world > 1 and index < n_chunks:  # reused only where every rank has its own (ZeRO-3 generates in lockstep)
                    everyone = trainer.strategy.reduce_boolean_decision(kept is not None or batch is None, all=True)
                    kept = kept if everyone else None
                if self._stop_agreed(trainer):
                    raise preemption.Preempted(preemption.requested() or signal.SIGTERM, where)
                if batch is None:
                    continue
                if kept is not None:
                    run.add(kept)
                    bar.update(len(batch.problems))
                    continue
                try:
                    with preemption.interruptible(where) if cut_short else nullcontext():
                        faults.begin("evaluating", policy=policy, benchmark=config.name, chunk=index)
                        started = time.perf_counter()
                        rows = run.record(batch, pl_module.generate_for_eval(batch), self.verifier)
                        run.seconds += time.perf_counter() - started
                        write_jsonl(path, rows)  # atomic: a chunk cut short leaves nothing
                except preemption.Preempted:
                    if world == 1:
                        raise
                    continue  # the other ranks meet this one at the next boundary and stop with it
                bar.update(len(batch.problems))
        return run.finish(world)

    def _stop_agreed(self, trainer: L.Trainer) -> bool:
        stop = preemption.requested() is not None
        if trainer.world_size > 1:  # every rank stops, or none: a lone rank would hang the others
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        return stop

    def _chunk_key(self, batch: EvalBatch) -> str:
        """A digest of what decides a chunk's rows: protocol, problems and prompts, the verifier."""
        verifier = self.verifier
        decided = {
            "benchmark": batch.benchmark, "n_samples": batch.n_samples, "params": repr(batch.params),
            "batch_size": batch.batch_size, "problems": [[p.id, p.answer] for p in batch.problems],
            "prompts": list(batch.prompts),
            "verifier": f"{type(verifier).__module__}.{type(verifier).__qualname__}",
            "extraction": getattr(verifier, "extraction", None),
        }
        return hashlib.sha256(json.dumps(decided, sort_keys=True, default=str).encode()).hexdigest()[:24]

    # -- hs-star test ----------------------------------------------------------------------

    @override
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.engine is not None:  # after a --ckpt_path restore: the weights to evaluate are in place
            folder = initial_weights_folder(require_policy(pl_module, "evaluation.engine"))
            self._point_engine(pl_module, folder if trainer.ckpt_path is None else None, "the model under test")
        for run in self._test_runs:
            run.metric = run.metric.to(pl_module.device)
            run.metric.reset()
            run.rows, run.seconds = [], 0.0

    @override
    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._test_started = time.perf_counter()

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        run = self._test_runs[dataloader_idx]
        run.record(batch, outputs, self.verifier)
        if self._test_started is not None:
            run.seconds += time.perf_counter() - self._test_started

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        label = self.label or self._test_label(trainer, pl_module)
        source = str(trainer.ckpt_path or require_policy(pl_module, "hs-star test").model_path or "model.tiny")
        summaries, results = {}, []
        for run in self._test_runs:
            summary, rows = run.finish(trainer.world_size)
            summaries[run.config.name] = summary
            results.append((run.config, summary, rows))
        if self.engine is not None:
            lifecycle_of(self.engine).sleep()
        entry = policy_entry(label, summaries, policy=None, kind="test", source=source)
        if trainer.is_global_zero:
            for config, summary, rows in results:
                self._write_result(trainer, config, label, None, source, summary, rows)
            self._write_tables(trainer, entry)
        trainer.strategy.barrier("hs_star_test_written")
        for name, s in summaries.items():
            pl_module.log(f"test/{name}_accuracy", s["accuracy"], add_dataloader_idx=False)
            for k, v in s["pass_at_k"].items():
                pl_module.log(f"test/{name}_{k}", v, add_dataloader_idx=False)
            if s["mean_tokens"] is not None:
                pl_module.log(f"test/{name}_mean_tokens", s["mean_tokens"], add_dataloader_idx=False)
        if entry["average"] is not None:
            pl_module.log("test/average_accuracy", entry["average"], add_dataloader_idx=False)
        # the table of results.md, one row per benchmark (hs-star test turns Lightning's own table
        # off: it repeats every value under each benchmark's DataLoader column and cuts the names)
        rank_zero_info(f"eval: {label}\n{results_table([entry])}")
        rank_zero_info(f"eval: {label}: results in {self.eval_root(trainer)} and {Path(trainer.default_root_dir) / 'results.md'}")

    def _point_engine(self, pl_module: L.LightningModule, folder: Path | None, what: str) -> None:
        """Give ``evaluation.engine`` the weights of ``pl_module`` (reloading ``folder`` when it holds
        exactly them, else streamed; collective under ZeRO-3). The engine's canary raises when its
        log-probs then disagree with the policy's."""
        started = time.perf_counter()
        canary = point_engine_at(self.engine, pl_module.model, pl_module.tokenizer, folder, reload_export=folder is not None)
        how = f"reloaded {folder}" if folder is not None else "weights streamed"
        check = f", canary mean |d logp| {canary.mean_abs_diff:.2e}" if canary is not None else ""
        rank_zero_info(f"eval: the engine holds {what} ({how}, {time.perf_counter() - started:.1f}s{check})")

    @staticmethod
    def _test_label(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        if trainer.ckpt_path:
            ckpt = Path(trainer.ckpt_path)
            run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
            text = f"{run.name}-{ckpt.stem}"
        elif require_policy(pl_module, "hs-star test").model_path is not None:
            folder = Path(pl_module.model_path)
            # a run's export (<run>/hf/policy_NNN) is named with its run: "policy_NNN" alone is
            # the label of that run's own evaluation of M_NNN and would replace it
            text = f"{folder.parent.parent.name}-{folder.name}" if folder.parent.name == "hf" else folder.name
        else:
            text = "tiny"
        return re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip("._-") or "model"

    # -- files -----------------------------------------------------------------------------

    def _write_result(self, trainer: L.Trainer, config: BenchmarkConfig, label: str, policy: int | None,
                      source: str | None, summary: dict, rows: list) -> None:
        write_json(self.result_path(trainer, config.name, label), {
            "label": label, "policy": policy, "source": source, "name": config.name, "problems_file": config.path,
            "benchmark": config.to_dict(), "summary": summary, "rows": rows,
        })

    def _write_tables(self, trainer: L.Trainer, entry: dict[str, Any]) -> Path | None:
        """Put ``entry`` into ``eval/results.json`` (replacing an older one of its label) and redraw
        ``results.md`` and ``results.png`` (the run's own policies M_0..M_T; returned when drawn)."""
        index = self.eval_root(trainer) / "results.json"
        entries = json.loads(index.read_text())["entries"] if index.is_file() else []
        entries = [e for e in entries if e["label"] != entry["label"]] + [entry]
        entries.sort(key=lambda e: (e.get("kind") != "iteration", e.get("policy") or 0))  # stable: tests keep their order
        for e in entries:
            if e.get("kind") == "iteration" and e["policy"] > 0:  # M_{t+1} was trained on round t's pairs
                summary_file = round_dir(trainer.default_root_dir, e["policy"] - 1) / "summary.json"
                if summary_file.is_file():
                    e["n_pairs"] = json.loads(summary_file.read_text()).get("n_pairs")
        write_json(index, {"entries": entries})
        shown = [{**e, "label": f"M_{e['policy']}" if e.get("kind") == "iteration" else e["label"]} for e in entries]
        text = (
            "# Evaluation results\n\n"
            "Headline numbers in %: greedy accuracy (acc) or the mean accuracy over n samples (avg@n); "
            "average = unweighted mean over the row's benchmarks; mean tokens = unweighted mean of the "
            "benchmarks' mean response lengths. Every response: eval/<benchmark>/<label>.json.\n\n"
        ) + results_table(shown)
        png = Path(trainer.default_root_dir) / "results.png"
        drawn = plot_results(png, entries)
        if drawn:
            text += ("\n![Held-out accuracy of M_0..M_T per benchmark, and the pairs each iteration trained on]"
                     "(results.png)\n")
        atomic_write_text(Path(trainer.default_root_dir) / "results.md", text)
        return png if drawn else None


_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _read_chunk(path: Path, batch: EvalBatch) -> list[dict[str, Any]] | None:
    """A kept chunk's rows, or ``None`` when there is none (or it is not this chunk's: then it is redone)."""
    if not path.is_file():
        return None
    rows = read_jsonl(path)
    if [r.get("problem_id") for r in rows] != [p.id for p in batch.problems]:
        return None
    return rows
