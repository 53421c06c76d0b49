"""The Lightning shell: the policy module, the data module, the callbacks, export and strategies.

It calls the pure core for every decision and the tensor code for every computation, and may
import every layer below it; only ``cli`` and ``experiments`` stand above it.
"""
