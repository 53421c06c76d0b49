"""``StopRequestCallback``: a stop request (``hs_star_pl.preemption``) reaches Lightning's loops.

Lightning stops ``fit`` after the current training batch once ``trainer.received_sigterm``
is set; its SIGTERM handler sets that flag, but only from the moment ``fit`` starts its
loops (it also clears it then). A request that came earlier (while the model loaded, while
checkpoints were restored) is acted on here, at the start of training (or testing), before
any batch.
The ``hs-star`` CLI adds this callback to every Trainer it builds.
"""

from __future__ import annotations

import signal

import lightning as L
from typing_extensions import override

from hs_star_pl import preemption


class StopRequestCallback(L.Callback):
    """Ties the Trainer to stop requests and acts on one that came before training started."""

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        preemption.attach(trainer)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _stop_if_requested(trainer, "before training started")

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _stop_if_requested(trainer, "before testing started")


def _stop_if_requested(trainer: L.Trainer, where: str) -> None:
    stop = preemption.requested() is not None
    if trainer.world_size > 1:  # every rank stops, or none: a lone rank would hang the others
        stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
    if stop:
        raise preemption.Preempted(preemption.requested() or signal.SIGTERM, where)
