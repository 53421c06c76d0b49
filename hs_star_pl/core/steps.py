"""Splitting a response into reasoning steps.

One delimiter serves the whole package: prompt templates ask for steps separated by it,
step-wise initialization writes solutions with it, the PRM scores the pieces it yields, and
pairs are built from responses scored that way. The paper's format is one step per
blank-line-separated block, so the default is ``"\\n\\n"``.
"""

from __future__ import annotations

DEFAULT_STEP_DELIMITER = "\n\n"


def split_steps(text: str, delimiter: str = DEFAULT_STEP_DELIMITER) -> list[str]:
    """Split ``text`` on ``delimiter`` into stripped, non-empty steps.

    Empty blocks (runs of blank lines, leading/trailing whitespace) are dropped, so a
    response of only whitespace has no steps and therefore no process reward
    (``RolloutScore.prm_min`` is ``None``).

    >>> split_steps("Step 1: 2+2=4\\n\\n\\n\\nSo \\\\boxed{4}\\n")
    ['Step 1: 2+2=4', 'So \\\\boxed{4}']
    """
    if not delimiter:
        raise ValueError("step delimiter must be a non-empty string")
    return [s.strip() for s in text.split(delimiter) if s.strip()]
