"""The request set both engine suites use: uneven counts, an n=0 request, mixed lengths."""

from __future__ import annotations

from hs_star_pl.core.protocols import GenerationRequest, SamplingParams

REQUESTS = [
    GenerationRequest("a", "12+7=", 3),
    GenerationRequest("b", "x", 0),
    GenerationRequest("c", "a longer prompt: 5*6=", 5),
    GenerationRequest("d", "9-4=", 1),
]
PARAMS = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=3)
