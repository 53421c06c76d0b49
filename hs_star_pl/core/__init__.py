"""The pure core: what a self-training round reads, decides and writes, as plain Python.

Nothing under ``hs_star_pl.core`` imports torch, lightning or transformers, and nothing here
imports a module of the package outside ``core`` except the infrastructure below it
(``hs_star_pl.infra``): tests/test_imports.py checks both. The
Lightning shell, the engines, PRMs and verifiers build on this package; the map of the
whole tree is docs/layout.md.
"""
