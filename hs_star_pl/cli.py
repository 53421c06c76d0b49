"""``hs-star``: the command line, a ``LightningCLI`` over ``HSStarModule`` and ``MathDataModule``.

    hs-star fit -c configs/base.yaml -c configs/debug/tiny_cpu.yaml [--dotted.key value]
    hs-star fit -c configs/base.yaml -c configs/dpo/from_pairs.yaml --print_config

Later ``-c`` files win; ``--print_config`` shows the merged result; the config is saved beside
the run (``overwrite`` so a run can be repeated into the same folder, docs/findings). Besides
``model``/``data``/``trainer`` the CLI always has an ``export`` group (``HFExportCallback``:
the policy is exported to ``<default_root_dir>/hf/iteration_NNN/`` after every iteration) and a
``self_training`` group (``SelfTrainingCallback``: HS-STaR rounds between epochs; inactive until
``self_training.problems_file`` is set). ``export.epochs_per_iteration`` follows
``self_training.epochs_per_iteration``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from hs_star_pl.callback import SelfTrainingCallback
from hs_star_pl.data import MathDataModule
from hs_star_pl.eval_callback import EvaluationCallback
from hs_star_pl.export import HFExportCallback
from hs_star_pl.module import HSStarModule


class HSStarCLI(LightningCLI):
    """LightningCLI with the HS-STaR module and data, and the HF export callback forced on."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        # The optimizer and scheduler are HSStarModule arguments (model.optimizer,
        # model.lr_scheduler), so the top-level groups LightningCLI would add are left out.
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(HSStarModule, MathDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(HFExportCallback, "export")
        # Always present, inactive until self_training.problems_file is set.
        parser.add_lightning_class_args(SelfTrainingCallback, "self_training")
        parser.add_lightning_class_args(EvaluationCallback, "evaluation")
        parser.link_arguments("self_training.epochs_per_iteration", "export.epochs_per_iteration", apply_on="parse")
        parser.link_arguments("self_training.epochs_per_iteration", "evaluation.epochs_per_iteration", apply_on="parse")
        parser.add_argument(
            "--stepwise_init",
            type=list[str] | None,
            default=None,
            help=(
                "Config files (as for -c) of a step-wise initialisation fit. When set and "
                "model.model_path does not exist yet, that fit runs first and its final HF export "
                "becomes model.model_path (M_0 is trained once, then reused)."
            ),
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        configs = config.get("stepwise_init")
        model_path = config.get("model", {}).get("model_path")
        if not configs or model_path is None or Path(model_path).exists():
            return
        bootstrap_stepwise_init(configs, Path(model_path))


    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Lightning puts checkpoints under the logger's version folder, and a resumed run opens
        # a new version, where `--ckpt_path last` finds nothing and (with only a warning)
        # trains from scratch. One fixed folder per run makes `last` always resolve.
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        return trainer


def bootstrap_stepwise_init(configs: list[str], model_path: Path) -> Path:
    """Train M_0 with ``hs-star fit -c <configs...>`` and install its last export at ``model_path``.

    The fit runs in its own process (a clean Trainer, and no state shared with the run that
    follows) in ``<model_path>.run/``; only a complete export is moved into place, so a
    killed bootstrap is simply redone.
    """
    run_dir = model_path.with_name(model_path.name + ".run")
    args = [sys.executable, "-m", "hs_star_pl", "fit"]
    for c in configs:
        args += ["-c", c]
    args += [f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}"]
    print(f"stepwise_init: training M_0 ({' '.join(configs)}) into {model_path}", flush=True)
    done = subprocess.run(args)
    if done.returncode != 0:
        raise RuntimeError(f"stepwise_init: the step-wise initialisation fit failed (exit {done.returncode}); see its output above")
    exports = sorted((run_dir / "hf").glob("iteration_*"))
    if not exports:
        raise RuntimeError(f"stepwise_init: the fit left no HF export under {run_dir / 'hf'}")
    tmp = model_path.with_name(model_path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(exports[-1], tmp)
    tmp.rename(model_path)
    return model_path


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``hs-star`` script and ``python -m hs_star_pl``."""
    HSStarCLI(args=args)


if __name__ == "__main__":
    main()
