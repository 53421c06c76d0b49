"""Benchmark evaluation: ``hs-star test`` and the evaluation after each iteration.

* ``datasets``: the seven benchmarks' files in their published shapes (pure).
* ``protocol``: generate, extract, verify, aggregate (greedy, avg@k, pass@k), tabulate (pure).
* ``metrics``: ``BenchmarkMetric``, a benchmark's totals summed across ranks (torchmetrics).
* ``callback``: ``EvaluationCallback``, the Lightning side (``evaluation.*`` in YAML).

This file imports nothing, so the pure modules stay importable without torch.
"""
