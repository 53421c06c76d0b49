"""Experiment drivers built on the ``hs-star`` CLI (method comparisons over seeds)."""
