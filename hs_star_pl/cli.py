"""``hs-star``: the command line, a ``LightningCLI`` over ``HSStarModule`` and ``MathDataModule``.

    hs-star fit -c configs/base.yaml -c configs/debug/tiny_cpu.yaml [--dotted.key value]
    hs-star fit -c configs/base.yaml -c configs/dpo/from_pairs.yaml --print_config

Later ``-c`` files win; ``--print_config`` shows the merged result; the config is saved beside
the run (``overwrite`` so a run can be repeated into the same folder, docs/findings). Besides
``model``/``data``/``trainer`` the CLI always has an ``export`` group (``HFExportCallback``:
the policy is exported to ``<default_root_dir>/hf/policy_NNN/`` after every iteration: M_NNN) and a
``self_training`` group (``SelfTrainingCallback``: HS-STaR rounds between epochs; inactive until
``self_training.problems_file`` is set). ``export.epochs_per_iteration`` follows
``self_training.epochs_per_iteration``. Values kept in one place: the run folder is
``trainer.default_root_dir`` (a logger's unset ``save_dir`` follows it), and an unset
``trainer.max_epochs`` is derived (``n_iterations x epochs_per_iteration`` with self-training,
else 1).

Errors a user can fix (``hs_star_pl.infra.errors``: a bad config value, a broken input file, a run
stopped on purpose) are printed as ``hs-star: error: <message>`` naming the full config key or
``file:line``, without a traceback (exit status 2, or 1 for a stopped run); set
``HS_STAR_DEBUG=1`` to see the traceback anyway. A value rejected while the configured classes
are built is reported under its full key (``self_training.budget.init_args.n_presample``),
not jsonargparse's union-type dump. Before anything is built, every float key refuses NaN and
inf (``config_checks``); before anything is written, an unwritable run folder is refused; a
full disk or an unwritable folder met later is one message naming where (``storage``).

A run asked to stop by SIGTERM (or SLURM's requeue signal) stops at a safe point and exits
with 128 + the signal's number: 143 for SIGTERM (``hs_star_pl.infra.preemption``). A second
command into a run folder in use is refused with exit status 2 (``hs_star_pl.infra.run_lock``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
import re
import shutil
import signal
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from hs_star_pl import COMMANDS, DEMO, DESCRIPTION, PROG
from hs_star_pl.infra import faults, preemption
from hs_star_pl.core.problems import FieldMap, ProblemPool
from hs_star_pl.training.self_training import SelfTrainingCallback, load_pool
from hs_star_pl.training.checkpoint_io import AtomicCheckpointIO, finished_run_refusal
from hs_star_pl.training.config_checks import LINKS, check_config, name_link_sources
from hs_star_pl.core.iterations import IterationClock
from hs_star_pl.core.protocols import lifecycle_of
from hs_star_pl.training.data import MathDataModule
from hs_star_pl.infra.errors import ConfigError, HSStarError
from hs_star_pl.training.evaluation import EvaluationCallback
from hs_star_pl.training.export import HFExportCallback, latest_export
from hs_star_pl.training.module import HSStarModule
from hs_star_pl.tensors.hub import is_hub_id
from hs_star_pl.infra.run_lock import RunLock, is_launching_process, release_all
from hs_star_pl.training.stop_request import StopRequestCallback
from hs_star_pl.infra.storage import check_writable, storage_error

# The CLI groups whose components (class_path objects, dataclass groups) are re-built one by
# one to find the key of a value rejected during instantiation.
COMPONENT_GROUPS: dict[str, type] = {
    "self_training": SelfTrainingCallback,
    "evaluation": EvaluationCallback,
    "export": HFExportCallback,
}


# Loggers whose ``save_dir`` has a default that is not "unset": W&B's "." (the current folder).
# Left at it, it follows the run folder like an unset one, or W&B's other key ``dir`` when that
# is set (Lightning's WandbLogger would let the default "." win over ``dir``).
_DEFAULT_SAVE_DIRS = {"lightning.pytorch.loggers.WandbLogger": ".", "lightning.pytorch.loggers.wandb.WandbLogger": "."}


def fill_logger_save_dirs(config: Namespace) -> None:
    """Point every configured logger without a ``save_dir`` at ``trainer.default_root_dir``.

    The run folder is one key: a logger's ``save_dir`` set on purpose is kept; one left unset
    (``None``: ``CSVLogger`` and ``TensorBoardLogger`` require it; W&B's default ``.``, unless its
    ``dir`` is set) follows the run folder, whether the logger came from a YAML file,
    ``--trainer.logger=CSVLogger`` or a list of loggers. ``trainer.logger: false`` has none.
    """
    if config.get("subcommand"):
        config = config.get(config["subcommand"])
    trainer = config.get("trainer") if isinstance(config, Namespace) else None
    root = trainer.get("default_root_dir") if isinstance(trainer, Namespace) else None
    if root is None:
        return
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if not isinstance(init, Namespace) or "save_dir" not in init:
            continue
        default = _DEFAULT_SAVE_DIRS.get(logger.get("class_path"))
        if init["save_dir"] is None:
            init["save_dir"] = root
        elif default is not None and init["save_dir"] == default:
            init["save_dir"] = init.get("dir") or root


def derive_max_epochs(config: Namespace) -> None:
    """Set an unset ``trainer.max_epochs``: ``n_iterations x epochs_per_iteration`` epochs when
    self-training is active (``IterationClock.max_epochs``), else 1. A value set on purpose is
    kept; one that contradicts the iterations is refused when the fit is set up, naming both."""
    trainer, st = config.get("trainer"), config.get("self_training")
    if not isinstance(trainer, Namespace) or trainer.get("max_epochs") is not None:
        return
    trainer["max_epochs"] = 1
    if isinstance(st, Namespace) and st.get("problems_file") is not None:
        n, k = st.get("n_iterations"), st.get("epochs_per_iteration")
        if isinstance(n, int) and isinstance(k, int) and n >= 1 and k >= 1:  # else the callback names the bad key
            trainer["max_epochs"] = IterationClock(k).max_epochs(n)


class _DropLightningTips(logging.Filter):
    """Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines: adverts, nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


_TIPS = _DropLightningTips()


def quiet_lightning() -> None:
    """Silence, each by its own message, what Lightning prints that a user cannot act on.

    * the "💡 Tip" adverts (litlogger, litmodels), printed at every Trainer's start;
    * Lightning 2.6's own use of a pytree API that torch deprecates (``_pytree.py``: ``isinstance(treespec,
      LeafSpec)``), warned on the first batch of every loop.
    The data module's and the export's own cases are silenced where they arise (``training.data``,
    ``training.export``).
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_TIPS)  # one filter object: adding it again is a no-op
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class HSStarArgumentParser(LightningArgumentParser):
    """The CLI's parser: a logger's ``save_dir`` follows ``trainer.default_root_dir`` when unset.

    Filled in just before the parsed config is validated (where jsonargparse would otherwise
    refuse a logger missing its required ``save_dir``), so the run's saved ``config.yaml``
    names the folder the logs went to.
    """

    def validate(self, namespace: Namespace, *args, **kwargs) -> None:
        fill_logger_save_dirs(namespace)
        super().validate(namespace, *args, **kwargs)


class HSStarCLI(LightningCLI):
    """LightningCLI with the HS-STaR module and data, and the HF export callback forced on."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False, "prog": PROG, "description": f"{DESCRIPTION} The demo: {DEMO}"})
        kwargs.setdefault("parser_class", HSStarArgumentParser)
        # The optimizer and scheduler are HSStarModule arguments (model.optimizer,
        # model.lr_scheduler), so the top-level groups LightningCLI would add are left out.
        kwargs.setdefault("auto_configure_optimizers", False)
        quiet_lightning()
        try:
            super().__init__(HSStarModule, MathDataModule, *args, **kwargs)
        except Exception as err:
            # A full disk or an unwritable folder in a write that is not hs-star's own
            # (Lightning's logs, the saved config): one message naming the run folder.
            trainer = getattr(self, "trainer", None)
            failed = None if isinstance(err, HSStarError) else storage_error(
                err, run_dir=getattr(trainer, "default_root_dir", None), writing=False)
            if failed is None:
                raise
            raise failed from err

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` (Lightning's ``predict`` has no use here: the module
        has no ``predict_step``; ``hs-star test`` writes every response), with the Trainer
        arguments the CLI fills itself."""
        skipped = {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}
        return {name: skipped.get(name, {"model", "dataloaders", "datamodule"}) for name in COMMANDS}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's subcommand parsers, described by ``COMMANDS`` instead of the Trainer's docstrings."""
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        subcommands = parser.add_subcommands()
        for name in self.subcommands():
            subparser_kwargs = {"prog": f"{PROG} {name}", "description": COMMANDS[name], **kwargs.get(name, {})}
            subparser = self._prepare_subcommand_parser(self.trainer_class, name, **subparser_kwargs)
            if name == "test":  # the evaluation prints its own table (Lightning's: --verbose true)
                subparser.set_defaults(verbose=False)
            self._subcommand_parsers[name] = subparser
            subcommands.add_subcommand(name, subparser, help=COMMANDS[name])

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(HFExportCallback, "export")
        # Always present, inactive until self_training.problems_file is set.
        parser.add_lightning_class_args(SelfTrainingCallback, "self_training")
        parser.add_lightning_class_args(EvaluationCallback, "evaluation")
        # CSV whatever is installed: Lightning's own default is TensorBoard when tensorboard
        # (the trackers extra) is importable and CSV otherwise (configs/base.yaml says the same)
        parser.set_defaults({"trainer.logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                "init_args": {"name": "logs"}}})
        for target, source in LINKS.items():
            parser.link_arguments(source, target, apply_on="parse")
        parser.add_argument(
            "--stepwise_init",
            type=list[str] | None,
            default=None,
            help=(
                "Config files (as for -c) of a step-wise initialisation fit. When set and "
                "model.model_path is a local path that does not exist yet, that fit runs first and its "
                "final HF export becomes model.model_path (M_0 is trained once, then reused). A hub id "
                "(org/name) never starts it, nor does a missing path without this key."
            ),
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        derive_max_epochs(config)
        if self.subcommand == "fit":
            self._pool = check_pool(config)  # a pool too small or a bad row: refused before the model loads
        self._lock_run_dir(config)
        configs = config.get("stepwise_init")
        model_path = config.get("model", {}).get("model_path")
        if not configs or model_path is None or Path(model_path).exists() or is_hub_id(model_path):
            return  # a hub id is resolved when the module loads; a missing folder is refused there
        bootstrap_stepwise_init(configs, Path(model_path))

    def _lock_run_dir(self, config: Namespace) -> None:
        """Refuse to run into a folder another live ``hs-star`` is using (``hs_star_pl.infra.run_lock``);
        before anything is written there, M_0's bootstrap included. Only when a command runs."""
        root = config.get("trainer", {}).get("default_root_dir")
        if self.subcommand is None or root is None or not is_launching_process():
            return
        if "://" not in str(root):  # the lock is the first file written: refuse a read-only folder by its key
            check_writable(root, "trainer.default_root_dir")
        RunLock(root).acquire()

    def before_fit(self) -> None:
        """A finished folder run again without ``--ckpt_path`` is refused (``finished_run_refusal``);
        with self-training active, after its settings check (``SelfTrainingCallback.setup``)."""
        message = finished_run_refusal(self.trainer, self.config[self.subcommand].get("ckpt_path"))
        if message is None:
            return
        for callback in self.trainer.callbacks:
            if isinstance(callback, SelfTrainingCallback) and callback.active:
                callback.refusal = message  # raised in its setup, after the settings record is compared
                return
        raise ConfigError(message)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:  # an in-process CLI (tests, notebooks) gives the folder back when its command ends
            release_all()

    def instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_config(config.as_dict())  # non-finite floats, a negative learning rate
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            if isinstance(err, HSStarError):
                raise
            found = locate_config_error(config, COMPONENT_GROUPS) or ConfigError(str(err))
            raise ConfigError(name_link_sources(str(found))) from err
        # The settings that decide a round are recorded from the whole config (fingerprint).
        for callback in self.trainer.callbacks:
            if isinstance(callback, SelfTrainingCallback):
                callback.run_config = config.as_dict()
                callback.preloaded_pool = getattr(self, "_pool", None)
        share_default_verifier(self.trainer.callbacks)
        share_rollout_engine(self.trainer.callbacks)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # data.global_batch_size belongs to the data; the trainer's gradient accumulation follows
        # from it here, the one place that knows both it and the device count.
        if isinstance(self.datamodule, MathDataModule):
            trainer.accumulate_grad_batches = self.datamodule.accumulate_grad_batches(
                trainer.world_size, trainer.accumulate_grad_batches)
        # SIGTERM / SLURM requeue (hs_star_pl.infra.preemption); first, so a pending stop comes before
        # other callbacks' on_train_start work (evaluating M_0)
        trainer.callbacks.insert(0, StopRequestCallback())
        # Before Lightning writes anything (logs, the saved config): a folder that cannot be
        # written is refused here, naming its key, not as a traceback from deep inside a logger.
        if "://" not in str(trainer.default_root_dir):
            check_writable(trainer.default_root_dir, "trainer.default_root_dir")
        for logger in trainer.loggers:
            save_dir = getattr(logger, "save_dir", None)
            if isinstance(save_dir, (str, os.PathLike)) and "://" not in str(save_dir):
                check_writable(save_dir, "trainer.logger.init_args.save_dir")
        if not trainer.loggers:
            # trainer.logger: false: Lightning's LearningRateMonitor (configs/base.yaml) refuses
            # to start without a logger; with nowhere to log it has nothing to do.
            monitors = [c for c in trainer.callbacks if isinstance(c, LearningRateMonitor)]
            if monitors:
                rank_zero_info("trainer.logger is false: the LearningRateMonitor callback is left out (no logger to log to)")
                trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        # Checkpoints written next to their final name and renamed (docs/reliability.md);
        # DeepSpeed and other strategies with their own checkpoint IO keep it.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        # Lightning puts checkpoints under the logger's version folder, and a resumed run opens
        # a new version, where `--ckpt_path last` finds nothing and (with only a warning)
        # trains from scratch. One fixed folder per run makes `last` always resolve.
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
            if isinstance(callback, ModelCheckpoint) and callback.save_last is True and callback.save_top_k == 0 \
                    and callback.monitor is None:
                # "Only last.ckpt": Lightning 2.6 writes save_last only next to a top-k checkpoint,
                # so with save_top_k 0 it wrote last.ckpt once, when training ended, and a kill
                # lost every finished iteration. A one-file top-k named "last" is rewritten at
                # every epoch end and still resolves as --ckpt_path last.
                callback.save_top_k, callback.filename, callback.save_last = 1, callback.CHECKPOINT_NAME_LAST, False
        return trainer


def check_pool(config: Namespace) -> ProblemPool | None:
    """The self-training pool, loaded and checked to last every iteration, from the parsed config
    (``None`` when self-training is off or a value is out of range: the callback names that key).

    Runs before any class is built, so a missing question field or a pool smaller than the
    iterations need is refused before the policy's weights load (or M_0 is trained)."""
    st = config.get("self_training")
    if not isinstance(st, Namespace) or st.get("problems_file") is None:
        return None
    ints = {k: st.get(k) for k in ("problems_per_iteration", "n_iterations", "seed")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()) \
            or ints["problems_per_iteration"] < 1 or ints["n_iterations"] < 1 or st.get("on_exhausted") not in ("error", "reshuffle"):
        return None
    fields = st.get("problem_fields")
    try:
        fields = FieldMap(**(fields.as_dict() if isinstance(fields, Namespace) else dict(fields or {})))
    except (TypeError, ValueError):
        return None
    return load_pool(st["problems_file"], fields, ints["problems_per_iteration"], ints["seed"], st["on_exhausted"],
                     ints["n_iterations"])


def share_default_verifier(callbacks: list) -> None:
    """Self-training and evaluation both active without a verifier: one ``MathVerifyVerifier``
    (the default of each) checks answers for both, so one worker pool starts, not two. A
    verifier set for either callback stays that callback's own."""
    unset = [c for c in callbacks if isinstance(c, (SelfTrainingCallback, EvaluationCallback))
             and c.active and c.verifier is None]
    if len(unset) > 1:
        from hs_star_pl.verifiers import MathVerifyVerifier

        shared = MathVerifyVerifier()
        for callback in unset:
            callback.verifier = shared


def share_rollout_engine(callbacks: list) -> None:
    """``evaluation.engine: rollout``: the evaluation samples with the self-training engine
    (one vLLM instance for rounds and evaluations). The default rollout engine is ``HFEngine``
    on the policy in memory, which is what the evaluation does with no engine of its own."""
    for evaluation in (c for c in callbacks if isinstance(c, EvaluationCallback) and c.engine == "rollout"):
        rollout = next((c.engine for c in callbacks if isinstance(c, SelfTrainingCallback)), None)
        evaluation.engine = None if rollout is None or lifecycle_of(rollout).in_process else rollout


def bootstrap_stepwise_init(configs: list[str], model_path: Path) -> Path:
    """Train M_0 with ``hs-star fit -c <configs...>`` and install its last export at ``model_path``.

    The fit runs in its own process (a clean Trainer, and no state shared with the run that
    follows) in ``<model_path>.run/``; only a complete export is moved into place, so a
    killed bootstrap is simply redone.
    """
    run_dir = model_path.with_name(model_path.name + ".run")
    # only an unfinished bootstrap leaves this folder (a finished one is installed at model_path):
    # it is redone from the start, not continued and not refused as a finished run
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [sys.executable, "-m", "hs_star_pl", "fit"]
    for c in configs:
        args += ["-c", c]
    args += [f"--trainer.default_root_dir={run_dir}"]
    print(f"stepwise_init: model.model_path={model_path} does not exist and the config sets stepwise_init: "
          f"training M_0 ({' '.join(configs)}) into it", flush=True)
    faults.begin("m0_child")
    returncode = preemption.run_child(args)  # a stop reaches the child; it dies with this process
    if returncode != 0:
        raise RuntimeError(f"stepwise_init: the step-wise initialisation fit failed (exit {returncode}); see its output above")
    export = latest_export(run_dir / "hf")  # hf/policy_NNN (or a killed earlier bootstrap's iteration_NNN)
    if export is None:
        raise RuntimeError(f"stepwise_init: the fit left no HF export under {run_dir / 'hf'}")
    tmp = model_path.with_name(model_path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(export, tmp)
    tmp.rename(model_path)
    return model_path


def _qualify(message: str, name: str, key: str) -> str:
    """Rewrite a component's own keys (``budget.n_presample``) to the full key, or prefix it."""
    pattern = re.compile(rf"(?<![\w.]){re.escape(name)}\.(?:init_args\.)?")
    qualified, n = pattern.subn(key + ".", message)
    return qualified if n else f"{key}: {message}"


def _build(node: Namespace, default: Any) -> tuple[str, Any] | None:
    """How to re-build one configured component: ``("init_args" | "", thunk)``, or ``None``."""
    if "class_path" in node:
        module_name, _, class_name = node["class_path"].rpartition(".")
        init = node.get("init_args")
        kwargs = init.as_dict() if isinstance(init, Namespace) else dict(init or {})
        return "init_args", lambda: getattr(importlib.import_module(module_name), class_name)(**kwargs)
    if dataclasses.is_dataclass(default):
        return "", lambda: type(default)(**node.as_dict())
    return None


def locate_config_error(config: Namespace, groups: Mapping[str, type]) -> ConfigError | None:
    """The first component of ``groups`` in ``config`` that rejects its values, as a ``ConfigError``.

    jsonargparse reports a constructor's ``ValueError`` inside a union-type message that names
    neither the group nor the key. Re-building each ``class_path`` component and dataclass
    group on its own finds the culprit; its message's own keys (``budget.x``,
    ``difficulty.x``) are rewritten to the full key (``self_training.budget.init_args.x``).
    Only called after instantiation failed, so components are never built twice in a good run.
    """
    for group, cls in groups.items():
        node = config.get(group)
        if not isinstance(node, Namespace):
            continue
        for name, param in inspect.signature(cls.__init__).parameters.items():
            value = node.get(name)
            if not isinstance(value, Namespace):
                continue
            plan = _build(value, param.default)
            if plan is None:
                continue
            suffix, build = plan
            key = f"{group}.{name}" + (f".{suffix}" if suffix else "")
            try:
                build()
            except (ValueError, TypeError) as err:
                return ConfigError(_qualify(str(err), name, key))
    return None


def check_config_files(args: list[str]) -> None:
    """Parse every ``-c``/``--config`` YAML file first, so a syntax error names its file and line.

    jsonargparse reports it as ``line N of "<unicode string>"``, without the file.
    """
    import yaml

    paths = [b for a, b in zip(args, args[1:]) if a in ("-c", "--config")]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in paths:
        if not Path(path).is_file():
            continue  # jsonargparse reports it
        try:
            yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            context = ""
            if err.context:
                started = f" on line {err.context_mark.line + 1}" if err.context_mark is not None else ""
                context = f" ({err.context}{started})"
            raise ConfigError(f"{where}: invalid YAML: {err.problem}{context}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``hs-star`` script and ``python -m hs_star_pl``.

    Errors the user can fix are printed as one message and end the process with their exit
    status; ``HS_STAR_DEBUG=1`` re-raises them with the traceback. A run stopped by SIGTERM
    (or SLURM's requeue signal) at a safe point exits with 128 + the signal's number (143);
    see ``hs_star_pl.infra.preemption``.
    """
    if not preemption.installed():  # ``python -m hs_star_pl`` installs it before importing this module
        preemption.reset()
    preemption.install()
    preemption.begin_startup()
    preemption.stop_with_parent()
    try:
        preemption.check("while starting")  # a SIGTERM during the imports
        check_config_files(sys.argv[1:] if args is None else args)
        HSStarCLI(args=args)
    except preemption.Preempted as stop:
        _stopped(stop.signum, stop.where)
    except SIGTERMException:  # Lightning's stop after a training batch or at an epoch's end
        _stopped(preemption.requested() or signal.SIGTERM,
                 "during training or at an epoch's end (what it trained since the last epoch-end checkpoint "
                 "is redone; an evaluation cut short goes on from its kept chunks)")
    except HSStarError as err:
        if os.environ.get("HS_STAR_DEBUG"):
            raise
        print(f"hs-star: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None
    except Exception as err:
        signum = preemption.requested()
        if signum is None or os.environ.get("HS_STAR_DEBUG"):
            raise
        # a stop signal sent to the whole group also ends helper processes (a vLLM engine),
        # whose loss can surface as an error before the stop itself is acted on
        _stopped(signum, f"(while stopping: {type(err).__name__}: {str(err)[:300]})")
    finally:
        release_all()
        preemption.uninstall()


def _stopped(signum: int, where: str) -> None:
    """Report a run stopped by ``signum``, requeue it under SLURM if asked, exit 128 + signum."""
    print(f"hs-star: stopped by {preemption.signal_name(signum)} {where}. Everything finished is on disk; "
          "resume with the same command plus --ckpt_path last.", file=sys.stderr, flush=True)
    if preemption.requeue_requested():
        preemption.requeue_slurm_job()
    raise SystemExit(preemption.exit_status(signum)) from None


if __name__ == "__main__":
    main()
