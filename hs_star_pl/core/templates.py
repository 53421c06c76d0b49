"""Prompt templates: one registry, one rendering, for training, sampling and evaluation.

A template turns a problem's question into the exact text the policy is conditioned on. The
same ``render_prompt`` call is used by the DataModule (SFT and DPO), the rollout engines and
evaluation, so a model is never trained on one prompt and sampled on another.

``qwen25-step-cot`` is the paper's template (HS-STaR reference code,
``simplerl_math_eval/utils.py``, ``PROMPT_TEMPLATES["qwen25-step-cot"]``). The reference code
keeps ``\\boxed{{}}`` in its format strings, so the braces come out doubled in one code path
(training) and single in the other (evaluation). Here templates are plain prefix/suffix
strings joined around the question with no ``str.format`` step, so ``\\boxed{}`` is rendered
identically everywhere and questions containing braces are safe. The reference system prompt
is a non-raw Python string, so its ``'\\n\\n'`` is two real newlines; we keep that, because it
is what the paper's models saw.

``chat`` is for instruct models: the question becomes a conversation (``chat_messages``: an
optional system message, ``data.system_prompt``, then the question as the user's turn) and
the policy tokenizer's own chat template renders it, ending with the assistant's turn opened
(``add_generation_prompt``). This module has no tokenizer: the caller passes a
``ChatRenderer`` (``hs_star_pl.tensors.chat.tokenizer_chat_renderer`` builds one from a tokenizer), so
the core stays free of transformers while every caller still goes through ``render_prompt``.

Covered: rendering a question to a prompt. Not covered: multi-turn or few-shot
conversations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from hs_star_pl.core.steps import DEFAULT_STEP_DELIMITER

ChatRenderer = Callable[[Sequence[Mapping[str, str]]], str]
"""Chat messages (``{"role": ..., "content": ...}``) -> the prompt text, ending where the
assistant's reply begins."""

#: The system message of ``chat`` prompts when ``data.system_prompt`` is unset. It asks for
#: steps separated by a blank line, ``DEFAULT_STEP_DELIMITER``, which is what ``chat`` rounds
#: split on unless ``self_training.step_delimiter`` says otherwise.
DEFAULT_CHAT_SYSTEM_PROMPT = (
    "Please reason step by step, separating each step with a blank line, "
    "and put your final answer within \\boxed{}."
)


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt as ``prefix + question + suffix``; the response follows the suffix directly.

    Attributes:
        name: the registry key (the ``data.template`` YAML value).
        prefix: text before the question.
        suffix: text after the question, ending where the response begins.
        step_delimiter: the step separator the prompt's wording asks the model for, or
            ``None`` when the wording names none. A run's rounds split responses on it
            unless ``self_training.step_delimiter`` is set; a set value that differs is
            refused (``step_delimiter_for``).
        chat: rendered by a tokenizer's chat template (``render_prompt``'s ``chat``) instead
            of ``prefix``/``suffix``.
    """

    name: str
    prefix: str
    suffix: str
    step_delimiter: str | None = None
    chat: bool = False

    def render(self, question: str) -> str:
        """The prompt for ``question``, verbatim (no formatting, so braces are untouched)."""
        if self.chat:
            raise ValueError(f"prompt template {self.name!r} renders with a chat template: use render_prompt(chat=...)")
        return f"{self.prefix}{question}{self.suffix}"


TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate(
            name="qwen25-step-cot",
            prefix=(
                "Given a math problem, please reason step by step, separating each step with "
                "'\n\n', and put your final answer within \\boxed{}.\n\nUser:\n"
            ),
            suffix="\n\nAssistant:\n",
            step_delimiter="\n\n",
        ),
        # Short on purpose: the tiny models and the synthetic task pay for every prompt byte.
        PromptTemplate(name="plain", prefix="Question: ", suffix="\nAnswer:\n"),
        # The wording is data.system_prompt, the user's: it names no delimiter here.
        PromptTemplate(name="chat", prefix="", suffix="", chat=True),
    )
}


def get_template(name: str) -> PromptTemplate:
    """The registered template called ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template {name!r}; valid names are {sorted(TEMPLATES)}") from None


def chat_messages(question: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation a ``chat`` prompt renders: the system message, then the question.

    ``system_prompt`` ``None`` is ``DEFAULT_CHAT_SYSTEM_PROMPT``; ``""`` leaves the system
    message out (the chat template may then write its own default).

    >>> chat_messages("What is 2 + 2?", "Be brief.")
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'What is 2 + 2?'}]
    """
    system = DEFAULT_CHAT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    user = {"role": "user", "content": question}
    return [{"role": "system", "content": system}, user] if system else [user]


def render_prompt(
    template_name: str, question: str, chat: ChatRenderer | None = None, system_prompt: str | None = None
) -> str:
    """Render ``question`` with the template called ``template_name``.

    Args:
        template_name: a key of ``TEMPLATES`` (``data.template``).
        question: the problem text.
        chat: renders ``chat_messages(question, system_prompt)`` for a chat template (the
            policy tokenizer's); required by those, unused by the others.
        system_prompt: ``data.system_prompt``; chat templates only.

    >>> render_prompt("plain", "What is 2 + 2?")
    'Question: What is 2 + 2?\\nAnswer:\\n'
    >>> render_prompt("chat", "2 + 2?", chat=lambda ms: "|".join(m["content"] for m in ms), system_prompt="Be brief.")
    'Be brief.|2 + 2?'

    Raises:
        ValueError: an unknown template; a chat template without ``chat``; a system prompt
            for a template that is not a chat template.
    """
    template = get_template(template_name)
    if not template.chat:
        if system_prompt is not None:
            raise ValueError(
                f"data.system_prompt is used only with data.template: chat, but data.template is {template_name!r}"
            )
        return template.render(question)
    if chat is None:
        raise ValueError(
            f"data.template {template_name!r} renders prompts with the policy tokenizer's chat template, "
            "and none was given"
        )
    return chat(chat_messages(question, system_prompt))


def check_step_delimiter(template_name: str, step_delimiter: str) -> None:
    """Refuse a step delimiter that the template's own wording contradicts.

    The PRM, the pair cut and the step-wise SFT data split responses on
    ``self_training.step_delimiter``; a template that tells the model to separate steps with
    something else would make every response one long step.

    Raises:
        ValueError: naming both config keys and both delimiters.
    """
    asked = get_template(template_name).step_delimiter
    if asked is not None and asked != step_delimiter:
        raise ValueError(
            f"data.template {template_name!r} asks the model to separate steps with {asked!r}, "
            f"but self_training.step_delimiter is {step_delimiter!r}; use the same delimiter "
            "in both (or a template whose wording names none, such as 'plain')"
        )


def step_delimiter_for(template_name: str | None, step_delimiter: str | None) -> str:
    """The delimiter a run splits responses into steps on; the template is its source.

    ``step_delimiter`` (``self_training.step_delimiter``) unset (``None``): the delimiter the
    template's wording asks for, or ``DEFAULT_STEP_DELIMITER`` when it names none or no
    template is known. Set: kept, unless the template's wording asks for another one.

    >>> step_delimiter_for("qwen25-step-cot", None), step_delimiter_for("plain", None), step_delimiter_for("plain", "\\n")
    ('\\n\\n', '\\n\\n', '\\n')

    Raises:
        ValueError: a set delimiter the template contradicts (``check_step_delimiter``), or
            an unknown template.
    """
    if step_delimiter is not None:
        if template_name is not None:
            check_step_delimiter(template_name, step_delimiter)
        return step_delimiter
    asked = None if template_name is None else get_template(template_name).step_delimiter
    return DEFAULT_STEP_DELIMITER if asked is None else asked
