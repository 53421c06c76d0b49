"""The iteration clock: which training epochs make which self-training iteration.

Iteration ``t`` trains epochs ``t * k`` to ``(t + 1) * k - 1``, ``k`` being
``self_training.epochs_per_iteration``. The self-training loop (a round before an
iteration's first epoch), the HF export and the evaluation (after its last) and the CLI
(``trainer.max_epochs``) all ask one ``IterationClock`` instead of each doing the arithmetic.

Stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IterationClock:
    """Epochs to iterations, ``epochs_per_iteration`` epochs each.

    >>> clock = IterationClock(2)
    >>> [clock.iteration_of(e) for e in range(4)], clock.starts_iteration(2), clock.ends_iteration(2)
    ([0, 0, 1, 1], True, False)
    >>> clock.ends_iteration(3), clock.max_epochs(3)
    (True, 6)

    Raises:
        ValueError: ``epochs_per_iteration`` below 1, naming ``self_training.epochs_per_iteration``
            (the one key that sets it).
    """

    epochs_per_iteration: int = 1

    def __post_init__(self) -> None:
        if self.epochs_per_iteration < 1:
            raise ValueError(f"self_training.epochs_per_iteration must be >= 1, got {self.epochs_per_iteration}")

    def iteration_of(self, epoch: int) -> int:
        """The iteration epoch ``epoch`` (0-based) trains."""
        return epoch // self.epochs_per_iteration

    def starts_iteration(self, epoch: int) -> bool:
        """Whether ``epoch`` is its iteration's first (its round comes before it)."""
        return epoch % self.epochs_per_iteration == 0

    def ends_iteration(self, epoch: int) -> bool:
        """Whether ``epoch`` is its iteration's last (its policy is exported and evaluated after it)."""
        return (epoch + 1) % self.epochs_per_iteration == 0

    def max_epochs(self, n_iterations: int) -> int:
        """The epochs of ``n_iterations`` iterations: what ``trainer.max_epochs`` must be."""
        return n_iterations * self.epochs_per_iteration
