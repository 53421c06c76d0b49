"""``StopRequestCallback``: a stop request (``hs_star_pl.infra.preemption``) reaches Lightning's loops.

Lightning stops ``fit`` after the current training batch once ``trainer.received_sigterm``
is set; its SIGTERM handler sets that flag, but only from the moment ``fit`` starts its
loops (it also clears it then). Until the training (or testing) loop starts, a request
raises at once (``preemption.begin_startup``); here start-up ends, and a request that is
still pending is acted on before any batch.
The ``hs-star`` CLI adds this callback to every Trainer it builds.
"""

from __future__ import annotations

import signal

import lightning as L
from typing_extensions import override

from hs_star_pl.infra import faults, preemption


class StopRequestCallback(L.Callback):
    """Ties the Trainer to stop requests and acts on one that came before training started."""

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        preemption.attach(trainer)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _stop_if_requested(trainer, "before training started")

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        faults.begin("training", epoch=trainer.current_epoch)  # a testing hook (scripts/soak.py)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _stop_if_requested(trainer, "before testing started")


def _stop_if_requested(trainer: L.Trainer, where: str) -> None:
    preemption.end_startup()  # from here a stop waits for the loop's safe points (batch ends)
    stop = preemption.requested() is not None
    if trainer.world_size > 1:  # every rank stops, or none: a lone rank would hang the others
        stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
    if stop:
        raise preemption.Preempted(preemption.requested() or signal.SIGTERM, where)
