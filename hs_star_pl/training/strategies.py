"""``DeepSpeedStrategy``: Lightning's DeepSpeed strategy, usable on CPU and safe for self-training.

Pick it in YAML (``configs/strategy/deepspeed_zero{2,3}.yaml``)::

    trainer:
      strategy:
        class_path: hs_star_pl.training.strategies.DeepSpeedStrategy
        init_args: {stage: 3}

It changes four things of ``lightning.pytorch.strategies.DeepSpeedStrategy`` and adds one
option (``load_universal``, for resuming on another number of processes):

- **CPU runs.** Lightning refuses DeepSpeed unless the accelerator is CUDA, but DeepSpeed
  itself runs ZeRO-2 and ZeRO-3 on CPU processes over gloo (docs/findings.md). With
  ``trainer.accelerator: cpu`` this strategy selects DeepSpeed's CPU accelerator (the
  ``DS_ACCELERATOR=cpu`` choice, made programmatically since DeepSpeed caches it on first
  use) and gloo, and skips the CUDA-only check. That is how the ZeRO-3 code paths are tested
  in CI on 2 CPU processes; it is not meant for speed.
- **No early dataloader.** To fill DeepSpeed's ``train_micro_batch_size_per_gpu`` Lightning
  builds the train dataloader while it prepares the DeepSpeed config (before
  ``configure_model``), which in a self-training run means running round 0 before the model
  is on its device (on a GPU machine: on the CPU copy). The micro batch is read from
  ``data.batch_size`` instead.
- **Policy on the device before ``configure_optimizers``.** The same holds for anything
  ``configure_optimizers`` triggers; the module is moved to its device first, as DDP does
  (DeepSpeed would move it during ``deepspeed.initialize`` anyway), unless parameters are
  offloaded to CPU or NVMe.
- **Batches are not cast to bf16.** Lightning's DeepSpeed precision casts every floating
  tensor of a batch to the training dtype before ``training_step``. Our only floating inputs
  are the DPO reference log-probs, sums over hundreds of tokens (often below -100), and bf16
  keeps 8 significant bits: -150.3 becomes -150.0, an error larger than the policy/reference
  gaps DPO learns from. The token ids need no cast, so batches pass through unchanged; the
  model itself still runs in bf16.

Everything else (ZeRO stages, offload, bf16, checkpoints as directories) is Lightning's and
DeepSpeed's; see docs/scale.md.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from typing_extensions import override


def use_deepspeed_cpu_accelerator() -> None:
    """Make DeepSpeed run on CPU in this process (and in processes it starts).

    DeepSpeed chooses its accelerator once, from ``DS_ACCELERATOR`` or by probing for CUDA,
    and caches it; setting the variable is enough before that, ``set_accelerator`` after.
    """
    os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    if get_accelerator().device_name() != "cpu":
        set_accelerator(CPU_Accelerator())


class BatchKeepingDeepSpeedPrecision(DeepSpeedPrecision):
    """``DeepSpeedPrecision`` that leaves the batch's dtypes alone (see the module docstring)."""

    @override
    def convert_input(self, data: Any) -> Any:
        return data


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` that also runs on CPU (gloo) and never builds data early.

    Takes the arguments of ``lightning.pytorch.strategies.DeepSpeedStrategy`` (``stage``,
    ``offload_optimizer``, ``offload_parameters``, ``config``, ...) and one more.

    Args:
        load_universal: resume from a DeepSpeed *universal* checkpoint (made with
            ``python -m deepspeed.checkpoint.ds_to_universal``), which is how a run continues
            on a different number of processes; DeepSpeed refuses a plain ZeRO checkpoint
            saved with another data-parallel size (docs/scale.md).
        **kwargs: ``lightning.pytorch.strategies.DeepSpeedStrategy``'s arguments.
    """

    def __init__(self, *args: Any, load_universal: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.load_universal = load_universal
        if load_universal:
            self.config.setdefault("checkpoint", {})["load_universal"] = True

    @property
    @override
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else Precision()

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        if type(plugin) is DeepSpeedPrecision:  # what Lightning's connector gives DeepSpeed
            plugin = BatchKeepingDeepSpeedPrecision(plugin.precision)
        self._precision_plugin = plugin

    @property
    def on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    @property
    @override
    def root_device(self) -> torch.device:
        device = super().root_device
        if device.type == "cpu" and device.index is None:
            # deepspeed.initialize takes the device index as this process's local rank
            return torch.device("cpu", self.local_rank)
        return device

    @override
    def setup_environment(self) -> None:
        if not self.on_cpu:
            super().setup_environment()  # Lightning's CUDA check, then DDP's set-up
            return
        use_deepspeed_cpu_accelerator()
        if self._process_group_backend is None:
            self._process_group_backend = "gloo"
        DDPStrategy.setup_environment(self)

    @override
    def setup_distributed(self) -> None:
        if not self.on_cpu:
            super().setup_distributed()
            return
        # Lightning checks that device indices match local ranks; CPU devices have no index.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @override
    def _auto_select_batch_size(self) -> int:
        datamodule = getattr(self.lightning_module.trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None)
        return int(batch_size) if isinstance(batch_size, int) and batch_size > 0 else 1

    @override
    def init_deepspeed(self) -> None:
        zero = (self.config or {}).get("zero_optimization") or {}
        offloaded = (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme")
        if not offloaded:
            self.model_to_device()
        super().init_deepspeed()

