"""Benchmark evaluation's pure half: ``hs-star test`` and the evaluation after each iteration.

* ``datasets``: the seven benchmarks' files in their published shapes.
* ``protocol``: generate, extract, verify, aggregate (greedy, avg@k, pass@k), tabulate.

Its Lightning half lives in the shell: ``hs_star_pl.training.evaluation`` (``EvaluationCallback``,
``evaluation.*`` in YAML) and ``hs_star_pl.training.benchmark_metric`` (totals summed across
ranks). Nothing here imports torch.
"""
