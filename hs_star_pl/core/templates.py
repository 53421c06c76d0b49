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

Covered: rendering a question to a prompt. Not covered: chat templates of instruct models
(none of the paper's base-model settings use one).
"""

from __future__ import annotations

from dataclasses import dataclass

from hs_star_pl.core.steps import DEFAULT_STEP_DELIMITER


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
    """

    name: str
    prefix: str
    suffix: str
    step_delimiter: str | None = None

    def render(self, question: str) -> str:
        """The prompt for ``question``, verbatim (no formatting, so braces are untouched)."""
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


def render_prompt(template_name: str, question: str) -> str:
    """Render ``question`` with the template called ``template_name``.

    >>> render_prompt("plain", "What is 2 + 2?")
    'Question: What is 2 + 2?\\nAnswer:\\n'
    """
    return get_template(template_name).render(question)


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
