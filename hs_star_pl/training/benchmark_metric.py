"""``BenchmarkMetric``: one benchmark's totals as a torchmetrics ``Metric``, summed across ranks.

Each rank grades its share of the problems and adds every row's sums
(``evaluation.row_sums``: problems, samples, right samples, per-problem accuracy, pass@k,
tokens, ...). ``compute`` all-reduces the totals (``dist_reduce_fx="sum"``, in float64 so
counts stay exact) and turns them into the reported numbers with ``evaluation.summarize``,
the same function the one-process path uses. Summing totals, rather than averaging
per-rank means, is what makes shards of different sizes combine correctly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from hs_star_pl.evaluation.protocol import SUM_KEYS, row_sums, summarize


class BenchmarkMetric(Metric):
    """Totals of one benchmark's graded rows; ``compute()`` returns its summary dict.

    Args:
        n_samples: responses per problem (names the headline metric: acc or avg@n).
        pass_k: the k of the pass@k values to report.
    """

    full_state_update = False

    def __init__(self, n_samples: int, pass_k: Sequence[int] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_samples = n_samples
        self.pass_k = tuple(pass_k)
        self._keys = (*SUM_KEYS, *(f"pass@{k}" for k in self.pass_k))
        self.add_state("totals", torch.zeros(len(self._keys), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, rows: Sequence[Mapping[str, Any]]) -> None:  # type: ignore[override]
        for row in rows:
            sums = row_sums(row, self.pass_k)
            self.totals += torch.tensor([sums[k] for k in self._keys], dtype=torch.float64, device=self.totals.device)

    def compute(self) -> dict[str, Any]:  # type: ignore[override]
        return summarize(dict(zip(self._keys, self.totals.tolist())), self.n_samples, self.pass_k)
