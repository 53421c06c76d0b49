"""Tensor code without Lightning: losses, batches, packing, LoRA, ZeRO-3 helpers, tiny models.

Everything here takes a ready model, tensor or tokenizer and knows nothing of the Trainer; the
Lightning shell (``hs_star_pl.training``) calls it. May import ``infra`` and ``core`` below it.
"""
