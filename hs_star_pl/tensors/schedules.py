"""Learning-rate schedules and the per-iteration restart of the optimisation (torch only).

``WarmupCosineLR`` is the paper's schedule (linear warmup, then cosine decay), as an
``LRScheduler`` class so LightningCLI can inject it with ``class_path``. Its length may be left
unset and filled in by ``HSStarModule.configure_optimizers`` from the trainer, because the
number of optimizer steps is known only once the data are.

``start_iteration`` gives each self-training iteration the whole schedule and, optionally, a
fresh optimizer (``self_training.restart_lr_schedule``, ``self_training.reset_optimizer_state``).
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosineLR(LRScheduler):
    """Linear warmup to the base learning rate, then cosine decay to ``min_lr_ratio`` of it.

    Stepped once per optimizer step. Step ``s < W`` uses ``(s + 1) / W`` of the base rate (the
    first step already moves the weights); after ``W`` the factor follows
    ``min + (1 - min) * (1 + cos(pi * progress)) / 2`` with ``progress`` from 0 to 1 over the
    remaining steps, and stays at ``min`` past the end.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: warmup length in optimizer steps; when 0, ``warmup_ratio`` decides.
        warmup_ratio: warmup length as a fraction of ``total_steps``.
        total_steps: schedule length in optimizer steps; ``None`` until the module sets it
            from the trainer (``trainer.max_steps``, else ``trainer.estimated_stepping_batches``),
            or until ``restart`` gives each self-training iteration a schedule of its own.
        min_lr_ratio: final learning rate as a fraction of the base rate.
        last_epoch: the index of the last step taken (-1 to start fresh).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0 or not 0.0 <= warmup_ratio < 1.0:
            raise ValueError("lr_scheduler.warmup_steps must be >= 0 and lr_scheduler.warmup_ratio in [0, 1)")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"lr_scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"lr_scheduler.total_steps must be >= 1, got {total_steps}")
        self.warmup_steps = warmup_steps
        self.warmup_ratio = warmup_ratio
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.start_step = 0  # the optimizer step at which the current schedule began
        super().__init__(optimizer, last_epoch)

    def _warmup(self) -> int:
        if self.warmup_steps or self.total_steps is None:
            return self.warmup_steps
        return int(round(self.warmup_ratio * self.total_steps))

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
        warmup = self._warmup()
        if step < warmup:
            return (step + 1) / warmup
        if self.total_steps is None:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        f = self.factor(max(0, self.last_epoch - self.start_step))
        return [base * f for base in self.base_lrs]

    def restart(self, total_steps: int) -> None:
        """Begin a new warmup + decay of ``total_steps`` steps at the current optimizer step.

        Self-training calls this at the start of each iteration, so every iteration's training
        gets the whole schedule, as the paper's scripts train each iteration as a new run.
        ``start_step`` is part of ``state_dict``, so a resumed run continues the same schedule.
        """
        self.start_step = max(0, self.last_epoch)
        self.set_total_steps(total_steps)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the schedule length and re-apply the current step's learning rate."""
        if total_steps < 1:
            raise ValueError(f"lr_scheduler.total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


# -- each self-training iteration starts its optimisation like a new run ------------------


def start_iteration(trainer: Any, epochs_per_iteration: int, *, restart_lr_schedule: bool,
                    reset_optimizer_state: bool, iteration: int) -> list[int]:
    """Give a self-training iteration its own schedule and, optionally, a fresh optimizer.

    Called when the iteration's dataloader exists (its length is known) and before its first
    step. With ``reset_optimizer_state``, iterations after the first clear every optimizer's
    moments (:func:`clear_optimizer_state`). With ``restart_lr_schedule``, every step-interval
    scheduler that can ``restart`` (``WarmupCosineLR``) is restarted over the iteration's
    optimizer steps: ``ceil(batches / accumulate_grad_batches) x epochs_per_iteration``. A
    resume from the end of the previous epoch repeats this identically, and a schedule
    already restarted is restored from the checkpoint.

    Returns:
        The length in steps of each schedule restarted (empty when none was).
    """
    if reset_optimizer_state and iteration > 0:
        for optimizer in trainer.optimizers:
            clear_optimizer_state(optimizer)
    if not restart_lr_schedule:
        return []
    steps = math.ceil(trainer.num_training_batches / max(1, trainer.accumulate_grad_batches))
    steps *= epochs_per_iteration
    restarted = []
    for config in trainer.lr_scheduler_configs:
        restart = getattr(config.scheduler, "restart", None)
        if restart is not None and steps > 0 and config.interval == "step":
            restart(steps)
            restarted.append(steps)
    return restarted


def clear_optimizer_state(optimizer: Any) -> None:
    """Forget an optimizer's per-parameter state (moments, step counts), keeping its settings.

    Torch's optimizers (and DeepSpeed's, which wrap one as ``.optimizer``) rebuild an empty
    state on their next step, exactly as a new optimizer would. Every wrapped level is cleared.
    """
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict):
            state.clear()
        optimizer = getattr(optimizer, "optimizer", None)
