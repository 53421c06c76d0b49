"""``SelfTrainingCallback``: the HS-STaR outer loop between training epochs.

One iteration = one round (``rounds.run_round``: pre-sample, score, classify, reallocate,
re-sample, select) + reference log-probs + ``epochs_per_iteration`` training epochs.

The callback serves rounds and keeps their state; the rest lives with its owner: the checks
across trainer, model and data in ``config_checks``, the engine's lifecycle in
``protocols.EngineLifecycle`` (a learned PRM's in ``protocols.Offloadable``), each
iteration's schedule restart and optimizer reset in ``schedules.start_iteration``, and the
plots in ``plots``.

How it meets Lightning's hook order: Lightning builds the train dataloader *before*
``on_train_epoch_start`` (and ``configure_optimizers`` may build it even earlier), so instead
of pushing data at a hook, the callback gives the ``MathDataModule`` an *example source*.
When the dataloader of epoch ``e`` is built, the source returns iteration
``t = e // epochs_per_iteration``'s examples, running round ``t`` first if it is not on disk.
At that moment the policy is exactly M_t (the end of the previous iteration's training, or
the restored checkpoint), which is what both sampling and the DPO reference need.

Disk is the source of truth: each round lives in
``<default_root_dir>/rounds/round_NNN/`` (see ``artifacts``). A complete round (``DONE``)
is read back, never regenerated; an incomplete one reuses its finished phase files. That
makes ``--ckpt_path last`` resume after a kill at any point, and also covers strategies that
restore callback state late (DeepSpeed restores it after ``on_fit_start``). Each round folder
and the checkpoint record the settings that decide a round (``fingerprint``); ``setup`` (and
``load_state_dict``) refuse a run folder whose rounds were made with other settings.

Ranks: every rank samples and scores its share of the problems (``run_round``'s ``shard``),
rollouts are all-gathered, rank 0's decisions are broadcast, reference log-probs are
computed shard-wise and gathered, and rank 0 writes the artifacts behind a barrier. Under
DeepSpeed ZeRO-3 whatever touches the whole policy works in lockstep on gathered parameters
(``hs_star_pl.tensors.zero``): the engine's weight sync, ``HFEngine`` sampling, reference log-probs
and the HF export.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from hs_star_pl.infra import faults, preemption
from hs_star_pl.infra.digests import DigestCache
from hs_star_pl.training.config_checks import long_prompts_warning, self_training_errors
from hs_star_pl.core.artifacts import (
    RoundStore,
    completed_rounds,
    is_complete,
    read_json,
    read_round,
    remove_stale_temporaries,
    round_dir,
    write_round,
)
from hs_star_pl.core.budget import BudgetAllocator, HierarchicalBudget
from hs_star_pl.core.difficulty import DifficultyConfig
from hs_star_pl.core.fingerprint import (
    DIGEST_CACHE,
    SettingsRecord,
    mismatch_message,
    read_record,
    recorded_rounds,
    settings_of,
    write_record,
)
from hs_star_pl.core.iterations import IterationClock
from hs_star_pl.core.problems import FieldMap, ProblemFileError, ProblemPool, load_problems
from hs_star_pl.core.protocols import (
    AnswerVerifier, Offloadable, ProcessRewardModel, RolloutEngine, SamplingParams, StepDelimited, lifecycle_of,
)
from hs_star_pl.core.records import PreferencePair
from hs_star_pl.core.rounds import RoundConfig, RoundResult, explain_no_examples, run_round
from hs_star_pl.core.selection import SelectionConfig
from hs_star_pl.core.steps import DEFAULT_STEP_DELIMITER
from hs_star_pl.core.templates import step_delimiter_for
from hs_star_pl.training.data import MathDataModule
from hs_star_pl.tensors.distributed import all_gather_objects
from hs_star_pl.engines.sync import point_engine_at
from hs_star_pl.infra.errors import ConfigError, EmptyRoundError
from hs_star_pl.infra.progress import format_seconds
from hs_star_pl.training.export import HFExportCallback, find_export
from hs_star_pl.training.module import HSStarModule
from hs_star_pl.training.plots import plot_history, plot_round
from hs_star_pl.training.policy import initial_weights_folder
from hs_star_pl.training.reference import with_reference_logps
from hs_star_pl.tensors.schedules import start_iteration
from hs_star_pl.training.tracking import log_image_file, log_pairs_table, log_to_loggers, pair_rows

SCHEMA_VERSION = 3  # 2: the last iteration and each round's ledger totals; 3: the settings record


class SelfTrainingCallback(L.Callback):
    """Runs an HS-STaR round before each iteration's training and serves its examples.

    Inactive (a no-op) while ``problems_file`` is unset, so the same CLI serves plain SFT and
    DPO runs.

    Args:
        problems_file: the problem pool (``problems.load_problems``): a JSONL or parquet
            file, a folder written by ``Dataset.save_to_disk``, or ``hub:<owner>/<name>``.
        problem_fields: which row fields hold the question, gold answer, id and solution
            (``question_key``, ``answer_key``, ``id_key``, ``solution_key``, ``answer_from``,
            ``default_id``; dotted paths reach nested fields), which part of a data set
            (``split``, ``dataset_config``, ``data_files``) and which rows (``filters``,
            ``max_rows``); see ``problems.FieldMap``. Unset keys are detected from the
            usual names (``question``/``problem``/``query``/``prompt``, ``answer``/
            ``final_answer``/``gold``/``expected_answer``, ``id``/``unique_id``/...).
        prm: process reward model (``class_path``); required when active.
        engine: rollout engine (``class_path``); default ``HFEngine()`` on the policy.
        verifier: answer verifier (``class_path``); default ``MathVerifyVerifier()``.
        budget: sampling-budget allocator (``class_path``); default
            ``HierarchicalBudget()`` (K=8, n_p=3, the paper).
        difficulty: classification mode and PRM thresholds.
        selection: which difficulty classes train, and ``dpo`` pairs or ``sft`` examples.
        sampling: temperature, top_p, max_new_tokens, stop strings (paper: 0.7, 0.95).
        n_iterations: self-training iterations; ``trainer.max_epochs`` must equal
            ``n_iterations * epochs_per_iteration`` (the CLI derives it when unset).
        epochs_per_iteration: training epochs per iteration (paper: 1).
        problems_per_iteration: problems drawn per iteration, without replacement across
            iterations (paper: 7500); unset uses the whole pool every iteration.
        on_exhausted: ``error`` or ``reshuffle`` when the pool runs out (see ``ProblemPool``).
        step_delimiter: splits responses into steps for the PRM (paper: a blank line); unset,
            the delimiter ``data.template`` asks for (a blank line for ``qwen25-step-cot``), or
            a blank line when the template names none. A set value the template contradicts
            is refused.
        seed: fixes every random choice of every round (draws, sampling, budget, pairs).
        plots: write ``difficulty.png`` per round and ``rounds/accuracy.png`` at the end (needs
            matplotlib; skipped without it); a TensorBoard or W&B logger also gets them as
            images (``round/difficulty``, ``rounds/accuracy``; ``hs_star_pl.training.tracking``).
        restart_lr_schedule: give each iteration's training the whole learning-rate schedule
            (a ``WarmupCosineLR``'s warmup and decay span that iteration's optimizer steps,
            counted once its round is known), as the paper trains each iteration as a new run.
            When false the schedule spans the whole fit, whose length is only estimated from
            round 0, so later, larger rounds would train their extra steps at the final rate.
        reset_optimizer_state: clear the optimizer's moments (AdamW's running averages and
            step count) at the start of every iteration after the first, so M_t -> M_{t+1}
            starts from a fresh optimizer like a new run; when false they carry over.
        on_empty_round: what to do when a round yields no training examples (no boundary
            problem, no pair, every gold ungradeable): ``skip`` trains on nothing that
            iteration (M_{t+1} = M_t) with a warning saying why; ``error`` stops the run with
            that message. The round's artifacts are kept either way.
    """

    def __init__(
        self,
        problems_file: str | None = None,
        problem_fields: FieldMap = FieldMap(),
        prm: ProcessRewardModel | None = None,
        engine: RolloutEngine | None = None,
        verifier: AnswerVerifier | None = None,
        budget: BudgetAllocator | None = None,
        difficulty: DifficultyConfig = DifficultyConfig(),
        selection: SelectionConfig = SelectionConfig(),
        sampling: SamplingParams = SamplingParams(),
        n_iterations: int = 3,
        epochs_per_iteration: int = 1,
        problems_per_iteration: int | None = None,
        on_exhausted: Literal["error", "reshuffle"] = "error",
        step_delimiter: str | None = None,
        seed: int = 0,
        plots: bool = True,
        restart_lr_schedule: bool = True,
        reset_optimizer_state: bool = False,
        on_empty_round: Literal["skip", "error"] = "skip",
    ) -> None:
        if n_iterations < 1:
            raise ValueError(f"self_training.n_iterations must be >= 1, got {n_iterations}")
        if problems_file is not None and prm is None:
            raise ValueError("self_training.prm is required when self_training.problems_file is set")
        if problems_per_iteration is not None and problems_per_iteration < 1:
            raise ValueError(f"self_training.problems_per_iteration must be >= 1, got {problems_per_iteration}")
        if on_empty_round not in ("skip", "error"):
            raise ValueError(f"self_training.on_empty_round must be 'skip' or 'error', got {on_empty_round!r}")
        if step_delimiter is not None and (not isinstance(step_delimiter, str) or not step_delimiter):
            raise ValueError(f"self_training.step_delimiter must be a non-empty string, got {step_delimiter!r}")
        self.problems_file = problems_file
        self.problem_fields = problem_fields
        self.prm = prm
        self.engine = engine
        self.verifier = verifier
        self.budget = budget if budget is not None else HierarchicalBudget()
        self.step_delimiter = step_delimiter  # as configured; setup resolves the run's with the template
        self.round_config = RoundConfig(sampling, difficulty, selection)
        self.n_iterations = n_iterations
        self.clock = IterationClock(epochs_per_iteration)  # epochs -> iterations (validates it)
        self.problems_per_iteration = problems_per_iteration
        self.on_exhausted = on_exhausted
        self.seed = seed
        self.preloaded_pool: ProblemPool | None = None  # set by hs-star, which checks the pool before the model loads
        self.plots = plots
        self.on_empty_round = on_empty_round
        self.restart_lr_schedule = restart_lr_schedule
        self.reset_optimizer_state = reset_optimizer_state
        self._pool: ProblemPool | None = None
        self._trainer: L.Trainer | None = None
        self._served: dict[int, list] = {}
        self._restored: dict[int, dict[str, Any]] = {}
        self._unlogged: dict[int, _RoundLog] = {}
        self.history: list[dict[str, Any]] = []
        # The whole parsed config (``HSStarCLI`` sets it), from which the settings that decide a
        # round are recorded (``fingerprint``); without it, this callback's own settings are.
        self.run_config: dict[str, Any] | None = None
        self._settings: SettingsRecord | None = None
        # Set by HSStarCLI when the run folder holds a finished run and fit has no --ckpt_path
        # (checkpoint_io.finished_run_refusal): raised in setup, after the settings are compared.
        self.refusal: str | None = None

    @property
    def active(self) -> bool:
        return self.problems_file is not None

    # -- set-up and validation -------------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.active or stage != "fit":
            return
        lifecycle_of(self.engine).check_world(trainer.world_size)  # e.g. one vLLM engine per rank, each on its GPU
        if not isinstance(pl_module, HSStarModule):
            raise ConfigError(f"self-training trains an HSStarModule (the model.* group), got {type(pl_module).__name__}")
        datamodule = trainer.datamodule
        serves = isinstance(datamodule, MathDataModule)  # the data module the rounds are served through
        delimiter, delimiter_error = self._resolve_step_delimiter(datamodule.template if serves else None)
        errors = self_training_errors(
            n_iterations=self.n_iterations, epochs_per_iteration=self.clock.epochs_per_iteration,
            max_epochs=trainer.max_epochs, reload_dataloaders_every_n_epochs=trainer.reload_dataloaders_every_n_epochs,
            model_objective=pl_module.objective, selection_objective=self.round_config.selection.objective,
            data=dict(train_file=datamodule.train_file, problems_file=datamodule.problems_file,
                      template=datamodule.template) if serves else None,
            step_delimiter_error=delimiter_error, engine_sync_from=lifecycle_of(self.engine).sync_from,
            export_enabled=_exporter(trainer) is not None,
        )
        if errors:
            raise ConfigError("self-training configuration:\n  - " + "\n  - ".join(errors))
        self.round_config = dataclasses.replace(self.round_config, step_delimiter=delimiter)
        self._pool = self.load_pool()
        problems = self._pool.problems
        if self.engine is None:
            from hs_star_pl.engines import HFEngine

            self.engine = HFEngine()
        if self.verifier is None:
            from hs_star_pl.verifiers import MathVerifyVerifier

            self.verifier = MathVerifyVerifier()
        self._trainer = trainer
        config = self.run_config if self.run_config is not None else self._own_config(pl_module, datamodule)
        # the delimiter the rounds split on, not the key's unset value: a round recorded when it
        # was set by hand (or before the template was its source) matches the same delimiter
        config = {**config, "self_training": {**config.get("self_training", {}),
                                              "step_delimiter": self.round_config.step_delimiter}}
        root = self.rounds_root(trainer)
        digests = DigestCache(root / DIGEST_CACHE)  # the models' weight digests, read once per run folder
        self._settings = settings_of(config, problems, self.problems_file, digest_cache=digests)
        message = mismatch_message(f"{root} holds rounds", recorded_rounds(root), self._settings, root)
        if message is not None:
            raise ConfigError(message)
        if self.refusal is not None:  # a finished folder run again without --ckpt_path (HSStarCLI.before_fit)
            raise ConfigError(self.refusal)
        if trainer.is_global_zero:
            digests.save()
        warning = long_prompts_warning(problems, pl_module, datamodule.render_prompt, self.round_config.sampling.max_new_tokens,
                                       self.problems_file)
        if warning is not None:
            rank_zero_warn(warning)
        datamodule.set_example_source(self.examples_for_epoch)
        rank_zero_info(
            f"self-training: {len(problems)} problems, {self.n_iterations} iterations, "
            f"rounds in {self.rounds_root(trainer)}"
        )

    def _resolve_step_delimiter(self, template: str | None) -> tuple[str, str | None]:
        """The run's step delimiter, resolved once from ``self_training.step_delimiter`` and the
        template, and why it cannot be used (``None`` when it can): the template contradicts
        it, or the PRM splits responses on another one."""
        try:
            delimiter = step_delimiter_for(template, self.step_delimiter)
        except ValueError as err:
            return DEFAULT_STEP_DELIMITER, str(err)
        if isinstance(self.prm, StepDelimited):
            return delimiter, self.prm.step_delimiter_error(delimiter)
        return delimiter, None

    def load_pool(self) -> ProblemPool:
        """The problem pool from ``problems_file``, checked to last ``n_iterations`` draws
        (``load_pool``; ``hs-star`` runs the same check before the model loads and hands the
        pool over in ``preloaded_pool``)."""
        pool, self.preloaded_pool = self.preloaded_pool, None
        if pool is not None:
            return pool
        return load_pool(self.problems_file, self.problem_fields, self.problems_per_iteration, self.seed,
                         self.on_exhausted, self.n_iterations)

    def _own_config(self, pl_module: L.LightningModule, datamodule: Any) -> dict[str, Any]:
        """The settings of this callback, its module and data module as a nested config.

        Used when the callback is built in Python rather than by ``HSStarCLI`` (which hands
        over the whole parsed config): components are recorded by class, with their fields
        when they are dataclasses.
        """
        def component(obj: Any) -> dict[str, Any] | None:
            if obj is None:
                return None
            fields = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else {}
            return {"class_path": f"{type(obj).__module__}.{type(obj).__qualname__}", "init_args": fields}

        config = self.round_config
        hparams = dict(pl_module.hparams)
        return {
            "self_training": {
                "prm": component(self.prm), "engine": component(self.engine), "verifier": component(self.verifier),
                "budget": component(self.budget), "difficulty": dataclasses.asdict(config.difficulty),
                "selection": dataclasses.asdict(config.selection), "sampling": dataclasses.asdict(config.sampling),
                "step_delimiter": config.step_delimiter, "seed": self.seed,
                "problems_per_iteration": self.problems_per_iteration, "on_exhausted": self.on_exhausted,
                "epochs_per_iteration": self.clock.epochs_per_iteration, "restart_lr_schedule": self.restart_lr_schedule,
                "reset_optimizer_state": self.reset_optimizer_state,
            },
            "model": {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in hparams.items()},
            "data": {"template": datamodule.template, "system_prompt": datamodule.system_prompt,
                     "max_length": datamodule.max_length, "batch_size": datamodule.batch_size},
        }

    @staticmethod
    def rounds_root(trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir)

    # -- the example source (called when Lightning builds the train dataloader) ------------

    def examples_for_epoch(self, epoch: int) -> list:
        """The training examples of ``epoch``: its iteration's round, run or read back."""
        iteration = self.clock.iteration_of(epoch)
        if iteration not in self._served:
            self._served = {iteration: self._ensure_round(iteration)}
        return self._served[iteration]

    def _ensure_round(self, iteration: int) -> list:
        trainer = self._trainer
        directory = round_dir(self.rounds_root(trainer), iteration)
        if is_complete(directory):
            result = read_round(directory)
            rank_zero_info(f"round {iteration}: complete on disk, read back from {directory}")
            if self.plots and trainer.is_global_zero and not (directory / "difficulty.png").is_file():
                plot_round(directory, result)  # a stop or a kill came between DONE and the plot
        else:
            result = self._run_round(trainer, iteration, directory)
        self._record(trainer, result, directory)
        if not result.examples:
            reason = explain_no_examples(result, self.round_config.selection)
            if self.on_empty_round == "error":
                raise EmptyRoundError(
                    f"round {iteration} produced no training examples: {reason}. Its artifacts are kept in "
                    f"{directory}. Set self_training.on_empty_round: skip to go on without training this "
                    f"iteration, or change the data (self_training.problems_per_iteration), the classes "
                    f"(self_training.selection.train_classes), the thresholds (self_training.difficulty) or "
                    f"the budget (self_training.budget)."
                )
            rank_zero_warn(
                f"round {iteration} produced no training examples: {reason}. Iteration {iteration} trains on "
                f"nothing (M_{iteration + 1} = M_{iteration}); self_training.on_empty_round: error stops instead."
            )
        return list(result.examples)

    def _run_round(self, trainer: L.Trainer, iteration: int, directory: Path) -> RoundResult:
        # A stop request (SIGTERM) drops the round's unit in progress at once; its finished
        # phases are on disk and reused on resume (hs_star_pl.infra.preemption).
        with faults.scope(iteration=iteration), preemption.interruptible(f"during round {iteration}"):
            return self._run_round_in_scope(trainer, iteration, directory)

    def _run_round_in_scope(self, trainer: L.Trainer, iteration: int, directory: Path) -> RoundResult:
        module = trainer.lightning_module
        datamodule = trainer.datamodule
        if trainer.is_global_zero:  # a killed writer's leftovers; before any rank writes here
            remove_stale_temporaries(directory)
            if self._settings is not None and read_record(directory) is None:
                write_record(directory, self._settings)  # before the round's first file
        trainer.strategy.barrier("hs_star_round_clean")
        store = RoundStore(directory)
        started = time.perf_counter()
        canary = self._prepare_engine(trainer, module, iteration)
        seconds_sync = time.perf_counter() - started
        prm_waking_before = self.prm.seconds_waking if isinstance(self.prm, Offloadable) else 0.0
        problems = self._pool.draw(iteration)
        rank_zero_info(f"round {iteration}: sampling and scoring M_{iteration}'s responses to {len(problems)} problems")
        result = run_round(
            problems,
            engine=self.engine,
            verifier=self.verifier,
            prm=self.prm,
            allocator=self.budget,
            config=self.round_config,
            render_prompt=lambda p: datamodule.render_prompt(p.question),
            iteration=iteration,
            seed=self.seed,
            store=store,
            shard=(trainer.global_rank, trainer.world_size),
            gather=lambda mine: all_gather_objects(trainer.world_size, mine),
            broadcast=lambda value: trainer.strategy.broadcast(value, src=0),
        )
        lifecycle_of(self.engine).sleep()
        extra: dict[str, Any] = {"world_size": trainer.world_size, "seconds_engine_sync": seconds_sync}
        if isinstance(self.prm, Offloadable):  # a learned PRM: off the GPU through training (its offload)
            prm_sleep_started = time.perf_counter()
            self.prm.sleep()
            extra["seconds_prm_sleep"] = time.perf_counter() - prm_sleep_started
            extra["seconds_prm_wake"] = self.prm.seconds_waking - prm_waking_before
        if canary is not None:  # the engine's log-probs vs the trainer's after the weight sync
            extra["canary_mean_abs_logprob_diff"] = canary.mean_abs_diff
            extra["canary_max_abs_logprob_diff"] = canary.max_abs_diff
        if result.examples and isinstance(result.examples[0], PreferencePair):
            ref_started = time.perf_counter()
            # A resumed round reads them back from its phase file: M_t is then the same policy.
            result.examples = with_reference_logps(
                trainer, result.examples, max_length=datamodule.max_length, batch_size=datamodule.ref_batch_size,
                cache=directory / "reference_logps.jsonl",
            )
            extra["seconds_reference_logps"] = time.perf_counter() - ref_started
        if not result.examples:
            extra["empty_reason"] = explain_no_examples(result, self.round_config.selection)
        extra["seconds_round"] = time.perf_counter() - started
        if trainer.is_global_zero:
            write_round(directory, result, extra_summary=extra)
            if self.plots:
                plot_round(directory, result)
        trainer.strategy.barrier("hs_star_round_written")
        rank_zero_info(round_line(result.summary(), extra["seconds_round"], directory))
        return result

    def _prepare_engine(self, trainer: L.Trainer, module: L.LightningModule, iteration: int) -> Any:
        """Point the engine at the current policy M_t (once per iteration); returns the canary report, if any.

        The contract is ``protocols.EngineLifecycle``. In-process engines (``bind``) sample
        from the policy itself. Engines with their own copy get M_t in one of two ways.
        ``sync_from: weights`` (``sync_weights``): the state dict is streamed, gathered one
        parameter at a time under ZeRO-3 (every rank gathers, every rank's engine receives);
        an engine that has not started yet starts on it. ``sync_from: export``
        (``load_from_dir``): the engine reloads the HF export of M_t that the run already
        wrote (``policy_export``), so no extra copy of the weights is made; without one (M_0
        built from ``model.tiny``) the weights are streamed instead. An engine that has not
        started yet (``started``; e.g. ``VLLMEngine`` without ``model_path``) starts on that HF
        folder whatever ``sync_from`` says, when every rank has it. Either way the engine
        compares its log-probs with ``module.model``'s afterwards.
        """
        engine = lifecycle_of(self.engine)
        path = None
        if not engine.in_process and engine.sync_from == "export":
            path = self.policy_export(trainer, module, iteration)
            if path is not None:
                rank_zero_info(f"round {iteration}: the engine reloads M_{iteration} from {path}")
            else:
                rank_zero_info(f"round {iteration}: no HF export of M_{iteration} (model.tiny): streaming the weights")
        elif not engine.in_process and not engine.started:
            # started from streamed weights, the engine would first write them to a folder of
            # its own: a whole copy of the model per rank (15 GB for a 7B policy). Every rank
            # decides alike: streaming gathers under ZeRO-3, which all ranks must join.
            path = self.policy_export(trainer, module, iteration, required=False)
            if trainer.strategy.reduce_boolean_decision(path is not None, all=True):
                rank_zero_info(f"round {iteration}: the engine starts on M_{iteration} from {path}")
                return point_engine_at(self.engine, module.model, module.tokenizer, export_dir=path, reload_export=True)
            path = None
        return point_engine_at(self.engine, module.model, module.tokenizer, export_dir=path)

    @staticmethod
    def policy_export(trainer: L.Trainer, module: L.LightningModule, iteration: int, required: bool = True) -> Path | None:
        """The HF folder holding M_t: ``model.model_path`` for t=0, else ``hf/policy_{t:03d}``
        (written at the end of iteration t-1).

        ``None`` when there is none (t=0 with ``model.tiny``, exports off, or with
        ``required=False`` a missing export). The export of iteration t-1 is written at the
        end of its last epoch, before the dataloader of iteration t (and so round t) is built.
        """
        if iteration == 0:
            return initial_weights_folder(module)  # a hub id's snapshot, or None for model.tiny
        exporter = _exporter(trainer)
        if exporter is None:
            return None
        path = exporter.policy_dir(trainer, iteration)
        # a run folder written before the policy_NNN name holds iteration_{t-1:03d}
        path = find_export(path.parent, iteration) or path
        if not path.is_dir() and not required:
            return None
        if not path.is_dir():
            raise FileNotFoundError(
                f"self_training.engine.init_args.sync_from=export: the HF export of M_{iteration} ({path}) "
                "is missing; it is written at the end of iteration "
                f"{iteration - 1}. Was it deleted? Use sync_from: weights to stream the policy instead."
            )
        return path

    # -- observability -------------------------------------------------------------------

    def _record(self, trainer: L.Trainer, result: RoundResult, directory: Path) -> None:
        summary = result.summary()
        metrics: dict[str, float] = {}
        for key, value in summary.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"round/{key}"] = float(value)
        for cls, n in summary["samples_per_class"].items():
            metrics[f"round/samples_{cls}"] = float(n)
        for phase, seconds in summary["seconds"].items():
            metrics[f"round/seconds_{phase}"] = float(seconds)
        questions = {p.id: p.question for p in result.problems}
        pairs = [e for e in result.examples if isinstance(e, PreferencePair)]
        # logged when the iteration's training starts
        self._unlogged[result.iteration] = _RoundLog(metrics, directory, pair_rows(pairs, questions))
        entry = {"iteration": result.iteration, "directory": str(directory), **summary}
        self._check_against_checkpoint(entry)
        self.history = [h for h in self.history if h["iteration"] != result.iteration] + [entry]

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not when the round is served: a fit resumed from an epoch-end checkpoint first builds
        # the dataloader of the epoch it already trained, which would log that round again.
        if not self.active or not self.clock.starts_iteration(trainer.current_epoch):
            return
        iteration = self.clock.iteration_of(trainer.current_epoch)
        for steps in start_iteration(trainer, self.clock.epochs_per_iteration, restart_lr_schedule=self.restart_lr_schedule,
                                     reset_optimizer_state=self.reset_optimizer_state, iteration=iteration):
            rank_zero_info(f"self-training: iteration {iteration} learning-rate schedule over {steps} optimizer steps")
        logged = self._unlogged.pop(iteration, None)
        if logged is not None and trainer.is_global_zero:
            log_to_loggers(trainer, logged.metrics)
            log_image_file(trainer, "round/difficulty", logged.directory / "difficulty.png")
            log_pairs_table(trainer, "round/pairs", logged.pair_rows)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and self.plots and trainer.is_global_zero:
            # From disk: a resumed process has served only the rounds since the resume.
            root = self.rounds_root(trainer)
            summaries = [read_json(round_dir(root, t) / "summary.json") for t in completed_rounds(root)]
            plot_history(root / "rounds", summaries)
            log_image_file(trainer, "rounds/accuracy", root / "rounds" / "accuracy.png")

    # -- checkpoint state (small, plain, versioned; the disk stays the truth) ----------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: schema version, seed, pool, the last iteration served, and each round's ledger totals.

        Every random choice of round t derives from ``(seed, t)`` (draws, sampling, budget
        residue, pairing). The per-problem ledger is in ``rounds/round_NNN/ledger.json``: on
        resume the disk is read, and this record only checks that it is the same run.
        """
        # Rounds served before a resume are known from the checkpoint that was resumed.
        by_iteration = {**self._restored, **{h["iteration"]: h for h in self.history}}
        rounds = [by_iteration[t] for t in sorted(by_iteration)]
        state = {
            "schema_version": SCHEMA_VERSION,
            "seed": self.seed,
            "problems_file": self.problems_file,
            "iteration": rounds[-1]["iteration"] if rounds else None,
            "rounds": [{k: h[k] for k in _ROUND_STATE_KEYS if k in h} for h in rounds],
        }
        if self._settings is not None:
            state["settings"] = self._settings.to_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("schema_version", 1)
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"the checkpoint's self-training state has schema_version {version}; this hs-star reads up to "
                f"{SCHEMA_VERSION}: resume it with the hs-star version that wrote it"
            )
        self._restored = {int(r["iteration"]): r for r in state_dict.get("rounds", [])}
        if self._settings is None:  # inactive, or not fitting: nothing of this run to compare
            return
        saved = state_dict.get("settings")
        if saved is not None:
            record = SettingsRecord.from_dict(saved)
        else:  # a checkpoint from before settings were recorded: its seed is all there is to compare
            record = SettingsRecord({"self_training.seed": state_dict["seed"]} if "seed" in state_dict else {}, version=0)
            saved_pool = state_dict.get("problems_file", self.problems_file)
            if saved_pool != self.problems_file:
                rank_zero_warn(
                    f"self_training.problems_file is {self.problems_file} but the checkpoint was made with "
                    f"{saved_pool}: rounds already on disk keep their problems, new rounds draw from the new pool"
                )
        trainer = self._trainer
        root = self.rounds_root(trainer) if trainer is not None else Path(".")
        checkpoint = (trainer.ckpt_path if trainer is not None else None) or "resumed"
        message = mismatch_message(f"the checkpoint {checkpoint} was", [("the checkpoint", record)], self._settings, root)
        if message is not None:
            raise ConfigError(message)

    def _check_against_checkpoint(self, entry: dict[str, Any]) -> None:
        """Warn when a round on disk is not the one the checkpoint recorded (the disk wins)."""
        saved = self._restored.get(entry["iteration"])
        if saved is None:
            return
        differ = {k: (saved[k], entry.get(k)) for k in _ROUND_CHECK_KEYS if k in saved and saved[k] != entry.get(k)}
        if differ:
            shown = ", ".join(f"{k}: checkpoint {a}, disk {b}" for k, (a, b) in differ.items())
            rank_zero_warn(
                f"round {entry['iteration']} in {entry['directory']} differs from the checkpoint's record ({shown}); "
                "the round on disk is used. Was the run folder replaced or a round redone by hand?"
            )


@dataclasses.dataclass(frozen=True)
class _RoundLog:
    """What the loggers get of a round when its iteration's training starts."""

    metrics: dict[str, float]  # round/*
    directory: Path  # its difficulty.png, when plots are on
    pair_rows: list[dict[str, Any]]  # a few of its pairs (tracking.pair_rows)


# What the checkpoint keeps of each round (its ledger totals) and what a resume compares.
_ROUND_STATE_KEYS = ("iteration", "directory", "n_problems", "samples_presample", "samples_resample", "samples_total",
                     "budget_total", "samples_per_class", "n_pairs", "n_sft_examples")
_ROUND_CHECK_KEYS = tuple(k for k in _ROUND_STATE_KEYS if k not in ("iteration", "directory"))


def _exporter(trainer: L.Trainer) -> HFExportCallback | None:
    """The run's enabled HF export callback, if any."""
    return next((c for c in trainer.callbacks if isinstance(c, HFExportCallback) and c.enabled), None)


def load_pool(problems_file: str, problem_fields: FieldMap, problems_per_iteration: int, seed: int,
              on_exhausted: str, n_iterations: int) -> ProblemPool:
    """The problem pool of ``self_training.problems_file``, checked to last ``n_iterations`` draws.

    Raises:
        ProblemFileError: a malformed row (``file:line``, or ``file, row <i>`` in a data set;
            a missing field names its ``self_training.problem_fields`` key), or a source that
            cannot be read (naming ``self_training.problems_file``).
        ConfigError: the pool cannot serve every iteration (naming the keys to change).
    """
    try:
        problems = tuple(load_problems(problems_file, **dataclasses.asdict(problem_fields)))
    except ProblemFileError as err:
        if err.line is not None or err.row is not None:
            raise err.naming("self_training.problem_fields") from None
        # the source itself (missing, unreadable, an offline hub): name the key that chose it
        raise ProblemFileError(err.path, None, f"{err.message} (self_training.problems_file)") from None
    except ValueError as err:  # an option out of range
        raise ConfigError(f"self_training.problem_fields: {err}") from None
    try:
        pool = ProblemPool(problems, problems_per_iteration, seed, on_exhausted)
        pool.draw(n_iterations - 1)  # fail now, not after days of training
    except ValueError as err:
        raise ConfigError(f"self_training.problems_file={problems_file}: {err}") from None
    return pool

def round_line(summary: dict[str, Any], seconds: float, directory: Path) -> str:
    """One line for the console: a round's classes, samples, training examples, pre-sample
    accuracy and time (every number, unrounded, is in ``directory/summary.json``)."""
    examples = (f"{summary['n_pairs']} pairs" if summary.get("n_sft_examples", 0) == 0
                else f"{summary['n_sft_examples']} SFT examples")
    accuracy = summary.get("presample_accuracy")
    dropped = f" ({summary['n_dropped_ungradeable']} dropped: gold answer unparsable)" if summary.get("n_dropped_ungradeable") else ""
    return (f"round {summary['iteration']}: {summary['n_problems']} problems{dropped}, {summary['n_inlier']} inlier / "
            f"{summary['n_boundary']} boundary / {summary['n_outlier']} outlier; {summary['samples_total']} samples; "
            f"{examples}; pre-sample accuracy {'-' if accuracy is None else f'{100 * accuracy:.1f}%'}; "
            f"{format_seconds(seconds)} (all numbers: {directory / 'summary.json'})")
