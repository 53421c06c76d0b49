"""Prompt template registry."""

from __future__ import annotations

import pytest

from hs_star_pl.templates import TEMPLATES, get_template, render_prompt


def test_paper_template_renders_single_braces_and_real_newlines():
    prompt = render_prompt("qwen25-step-cot", "What is 1 + 1?")
    assert prompt == (
        "Given a math problem, please reason step by step, separating each step with '\n\n', "
        "and put your final answer within \\boxed{}.\n\nUser:\nWhat is 1 + 1?\n\nAssistant:\n"
    )
    assert "{{" not in prompt


def test_question_braces_are_not_formatted():
    assert render_prompt("plain", "Is {x} in \\boxed{{y}}?") == "Question: Is {x} in \\boxed{{y}}?\nAnswer:\n"


def test_every_template_contains_the_question_once():
    for name in TEMPLATES:
        assert render_prompt(name, "QQQ").count("QQQ") == 1


def test_unknown_template_lists_valid_names():
    with pytest.raises(ValueError, match=r"'chatml'.*\['plain', 'qwen25-step-cot'\]"):
        get_template("chatml")
