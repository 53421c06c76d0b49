"""hs-star-pl: HS-STaR (Hierarchical Sampling for Self-Taught Reasoners) on PyTorch Lightning.

Importing the package is cheap on purpose: everything under ``hs_star_pl.core`` (records,
problems, difficulty, budget, selection, rounds, ...) imports neither torch nor lightning, and
this file must not pull them in either, because ``import hs_star_pl.core.budget`` runs it first.
The map of the package and its rule: docs/layout.md.
"""

__version__ = "0.1.0"
