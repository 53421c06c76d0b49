"""hs-star-pl: HS-STaR (Hierarchical Sampling for Self-Taught Reasoners) on PyTorch Lightning.

Importing the package is cheap on purpose: the pure modules (``records``, ``problems``,
``difficulty``, ``budget``, ``selection``, ``rounds``) import neither torch nor lightning, and
this file must not pull them in either, because ``import hs_star_pl.core.budget`` runs it first.
"""

__version__ = "0.1.0"
