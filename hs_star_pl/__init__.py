"""hs-star-pl: HS-STaR (Hierarchical Sampling for Self-Taught Reasoners) on PyTorch Lightning.

Importing the package is cheap on purpose: everything under ``hs_star_pl.core`` (records,
problems, difficulty, budget, selection, rounds, ...) imports neither torch nor lightning, and
this file must not pull them in either, because ``import hs_star_pl.core.budget`` runs it first.
The map of the package and its rule: docs/layout.md.
"""

__version__ = "0.1.0"

PROG = "hs-star"
DEMO = "hs-star fit -c configs/tiny/hs_star.yaml"
DESCRIPTION = "HS-STaR self-training for math LLMs on PyTorch Lightning."
COMMANDS = {
    "fit": "Train: SFT, DPO, or HS-STaR self-training rounds (self_training.problems_file set).",
    "validate": "Score a model or checkpoint on data.val_file (DPO/SFT loss and reward accuracy).",
    "test": "Evaluate a model or checkpoint on the evaluation group's benchmarks (results.md).",
}
"""The ``hs-star`` subcommands and their one-line help; ``hs-star --help`` prints these without
importing torch (``hs_star_pl.__main__.main``), and the full parser (``cli.HSStarCLI``) uses the same."""
