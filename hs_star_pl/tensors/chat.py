"""``data.template: chat``: prompts rendered by the policy tokenizer's own chat template.

``hs_star_pl.core.templates.render_prompt`` is pure and has no tokenizer; it takes a
``ChatRenderer`` for chat templates. This module builds that renderer from a Hugging Face
tokenizer: ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``,
i.e. the conversation as text, ending with the assistant's turn opened, which is where the
sampled response begins. The data module builds it once from the policy's tokenizer, so
sampling, training and evaluation render the same string.

A chat template is code shipped with a model, and it can fail in three ways that a run must
not discover days later: there is none (a base model), it refuses the conversation (a
template that calls ``raise_exception``, e.g. on a system message), or it renders the
conversation without the question (a template written for another message layout), which
trains and samples on prompts that hold no problem. ``checked_chat_renderer`` renders a
probe question once, with the system prompt the run will use, and turns each into one
``ConfigError`` naming ``data.template`` and the tokenizer's folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hs_star_pl.core.templates import ChatRenderer, render_prompt
from hs_star_pl.infra.errors import ConfigError

PROBE_QUESTION = "What is 17 + 25? (hs-star checks that the chat template keeps the question)"


def _where(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", None)
    return f"the tokenizer in {name}" if name else f"the {type(tokenizer).__name__} tokenizer"


def _refusal(tokenizer: Any, what: str) -> ConfigError:
    return ConfigError(f"data.template: chat renders prompts with the chat template of {_where(tokenizer)}, which {what}")


def tokenizer_chat_renderer(tokenizer: Any) -> ChatRenderer:
    """A ``ChatRenderer`` backed by ``tokenizer.apply_chat_template``.

    Raises:
        ConfigError: the tokenizer has no chat template (a base model's usually has none);
            the message names ``data.template`` and the tokenizer's folder. A template that
            fails while rendering raises the same (naming its own message).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise _refusal(
            tokenizer, "has no chat template (no chat_template in its tokenizer_config.json or chat_template.jinja); "
            "use a prefix/suffix template such as qwen25-step-cot or plain, or a model whose tokenizer ships a chat "
            "template"
        )

    def render(messages: Sequence[Mapping[str, str]]) -> str:
        try:
            prompt = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja's TemplateError (raise_exception), or any error of the template's code
            roles = ", ".join(m.get("role", "?") for m in messages)
            hint = (" (a template that refuses a system message takes data.system_prompt: \"\")"
                    if any(m.get("role") == "system" for m in messages) else "")
            raise _refusal(tokenizer, f"cannot render a question: {type(err).__name__}: {err} "
                                      f"(messages: {roles}){hint}") from None
        if not isinstance(prompt, str):
            raise TypeError(f"apply_chat_template returned {type(prompt).__name__}, expected the prompt text")
        return prompt

    return render


def checked_chat_renderer(tokenizer: Any, template_name: str, system_prompt: str | None) -> ChatRenderer:
    """``tokenizer_chat_renderer``, after rendering ``PROBE_QUESTION`` once as the run will.

    Raises:
        ConfigError: no chat template, a template that fails on the conversation, or one whose
            output does not contain the question.
    """
    render = tokenizer_chat_renderer(tokenizer)
    prompt = render_prompt(template_name, PROBE_QUESTION, chat=render, system_prompt=system_prompt)
    if PROBE_QUESTION not in prompt:
        shown = prompt if len(prompt) <= 200 else prompt[:197] + "..."
        raise _refusal(
            tokenizer, f"renders a question without it: the prompt would not contain the problem (the question "
            f"{PROBE_QUESTION!r} as the user's message became {shown!r}); fix the template, or use a prefix/suffix "
            "template such as qwen25-step-cot or plain"
        )
    return render
