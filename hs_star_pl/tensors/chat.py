"""``data.template: chat``: prompts rendered by the policy tokenizer's own chat template.

``hs_star_pl.core.templates.render_prompt`` is pure and has no tokenizer; it takes a
``ChatRenderer`` for chat templates. This module builds that renderer from a Hugging Face
tokenizer: ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``,
i.e. the conversation as text, ending with the assistant's turn opened, which is where the
sampled response begins. The data module builds it once from the policy's tokenizer, so
sampling, training and evaluation render the same string.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hs_star_pl.core.templates import ChatRenderer


def tokenizer_chat_renderer(tokenizer: Any) -> ChatRenderer:
    """A ``ChatRenderer`` backed by ``tokenizer.apply_chat_template``.

    Raises:
        ValueError: the tokenizer has no chat template (a base model's usually has none);
            the message names ``data.template`` and the tokenizer's folder.
    """
    if not tokenizer.chat_template:
        raise ValueError(
            f"data.template: chat renders prompts with the policy tokenizer's chat template, but the tokenizer "
            f"{tokenizer.name_or_path or type(tokenizer).__name__!r} has none (no chat_template in its "
            "tokenizer_config.json or chat_template.jinja); use a prefix/suffix template such as "
            "qwen25-step-cot or plain, or a model whose tokenizer ships a chat template"
        )

    def render(messages: Sequence[Mapping[str, str]]) -> str:
        prompt = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        if not isinstance(prompt, str):
            raise TypeError(f"apply_chat_template returned {type(prompt).__name__}, expected the prompt text")
        return prompt

    return render
