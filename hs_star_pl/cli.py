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

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from hs_star_pl.callback import SelfTrainingCallback
from hs_star_pl.data import MathDataModule
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
        parser.link_arguments("self_training.epochs_per_iteration", "export.epochs_per_iteration", apply_on="parse")


    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Lightning puts checkpoints under the logger's version folder, and a resumed run opens
        # a new version, where `--ckpt_path last` finds nothing and (with only a warning)
        # trains from scratch. One fixed folder per run makes `last` always resolve.
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        return trainer


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``hs-star`` script and ``python -m hs_star_pl``."""
    HSStarCLI(args=args)


if __name__ == "__main__":
    main()
