"""The iteration clock: epochs to self-training iterations, asked by the loop, the export, the
evaluation and the CLI (trainer.max_epochs)."""

from __future__ import annotations

import pytest

from hs_star_pl.core.iterations import IterationClock


@pytest.mark.parametrize("k", [1, 2, 3])
def test_each_iteration_is_k_consecutive_epochs(k):
    clock = IterationClock(k)
    epochs = range(clock.max_epochs(4))
    assert len(epochs) == 4 * k
    for t in range(4):
        own = [e for e in epochs if clock.iteration_of(e) == t]
        assert own == list(range(t * k, (t + 1) * k))  # consecutive, k of them
        assert [e for e in own if clock.starts_iteration(e)] == [own[0]]
        assert [e for e in own if clock.ends_iteration(e)] == [own[-1]]


def test_fewer_than_one_epoch_per_iteration_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"^self_training.epochs_per_iteration must be >= 1, got 0$"):
        IterationClock(0)
