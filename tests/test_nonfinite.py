"""NaN/inf in training: ``model.nonfinite_loss: raise`` stops at the step, ``skip`` drops the update.

The faults are real, injected into the data or the backward pass of a real tiny model (not a
mocked module): a pair whose reference log-prob is 1e39 (finite in JSON, ``inf`` once it is
a float32 tensor) makes that batch's DPO loss infinite; a gradient hook that multiplies one
parameter's gradient by ``inf`` leaves the loss finite and the gradients not.
"""

from __future__ import annotations

import json
import math
import sys

import lightning as L
import pytest
import torch

from hs_star_pl.cli import main
from hs_star_pl.training.data import MathDataModule
from hs_star_pl.infra.errors import NonFiniteLossError
from tests.helpers.tiny_setup import PAIRS_FILE, REPO, tiny_module
from tests.helpers.trainers import cpu_trainer

POISONED_ROW = 7  # 0-based row of the pairs file whose reference log-prob overflows float32
N_PAIRS, BATCH = 20, 4


@pytest.fixture
def poisoned_pairs(tmp_path):
    rows = [json.loads(line) for line in PAIRS_FILE.read_text().splitlines()]
    assert len(rows) == N_PAIRS
    for i, row in enumerate(rows):
        row["ref_chosen_logp"], row["ref_rejected_logp"] = (1e39 if i == POISONED_ROW else -40.0), -40.0
    path = tmp_path / "poisoned.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def poisoned_step(epoch: int) -> int:
    """The global step whose batch holds the poisoned pair (MathDataModule's order for ``epoch``)."""
    order = torch.randperm(N_PAIRS, generator=torch.Generator().manual_seed(0 + epoch)).tolist()
    return epoch * (N_PAIRS // BATCH) + order.index(POISONED_ROW) // BATCH


def test_raise_stops_at_the_step_and_writes_nothing(poisoned_pairs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["hs-star"])
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["fit", "-c", str(REPO / "configs" / "base.yaml"), "-c", str(REPO / "configs" / "debug" / "tiny_cpu.yaml"),
              f"--data.train_file={poisoned_pairs}", f"--trainer.default_root_dir={run}", "--trainer.enable_progress_bar=false"])
    err = capsys.readouterr().err
    step = poisoned_step(0)
    assert info.value.code == 1 and "Traceback" not in err
    assert f"hs-star: error: non-finite training loss ([inf]) at global step {step} (epoch 0, batch {step}); " \
           "training stopped before this update" in err
    assert "model.nonfinite_loss: skip" in err
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())
    assert not (run / "hf").exists()


class ParameterWatch(L.Callback):
    """Whether each optimizer step changed the weights."""

    def __init__(self) -> None:
        self.changed: list[bool] = []
        self._before: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.changed.append(any(not torch.equal(a, p) for a, p in zip(self._before, pl_module.parameters())))


def fit(tmp_path, train_file, nonfinite_loss: str, *, epochs: int = 2, prepare=None):
    module = tiny_module(nonfinite_loss=nonfinite_loss)
    if prepare is not None:
        prepare(module)
    watch = ParameterWatch()
    trainer = cpu_trainer(tmp_path, max_epochs=epochs, reload_dataloaders_every_n_epochs=1, callbacks=[watch])
    trainer.fit(module, MathDataModule(train_file=str(train_file), template="plain", max_length=256, batch_size=BATCH))
    return module, watch, trainer


def test_skip_drops_only_the_poisoned_update_and_counts_it(poisoned_pairs, tmp_path):
    with pytest.warns(UserWarning, match=rf"non-finite training loss at global step {poisoned_step(0)} .*update skipped"):
        module, watch, trainer = fit(tmp_path, poisoned_pairs, "skip")
    skipped = {poisoned_step(0), poisoned_step(1)}
    assert [i for i, changed in enumerate(watch.changed) if not changed] == sorted(skipped)
    assert module.n_nonfinite_skipped == 2 and trainer.callback_metrics["train/nonfinite_skipped"] == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert math.isfinite(float(trainer.callback_metrics["train/loss_epoch"]))


def poison_gradients(module) -> None:
    """Overflow in the backward pass: one weight's gradient becomes inf, the loss stays finite."""
    weight = module.model.model.embed_tokens.weight
    weight.register_hook(lambda grad: grad * float("inf"))


def test_an_infinite_gradient_with_a_finite_loss_is_caught_too(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite training gradient norm \(\[(inf|nan)\]\) at global step 0 "
                                                 r"\(epoch 0, batch 0\)"):
        fit(tmp_path, PAIRS_FILE, "raise", epochs=1, prepare=poison_gradients)
    with pytest.warns(UserWarning, match="non-finite training gradient norm at global step 0"):
        module, watch, _ = fit(tmp_path, PAIRS_FILE, "skip", epochs=1, prepare=poison_gradients)
    assert watch.changed == [False] * (N_PAIRS // BATCH) and module.n_nonfinite_skipped == N_PAIRS // BATCH
    assert all(torch.isfinite(p).all() for p in module.parameters())
