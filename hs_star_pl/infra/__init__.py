"""Infrastructure every layer may use: plain Python, no torch, Lightning or transformers.

Error types, fault points, JSONL lines, write failures, the run lock, the killable process
pool, stop signals and the progress primitives. Imports nothing of the package outside this
folder (``tests/test_imports.py`` holds every folder to its rule; docs/layout.md explains them).
"""
