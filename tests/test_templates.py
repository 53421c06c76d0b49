"""Prompt template registry."""

from __future__ import annotations

import pytest

from hs_star_pl.tensors.chat import tokenizer_chat_renderer
from hs_star_pl.core.templates import (
    DEFAULT_CHAT_SYSTEM_PROMPT,
    TEMPLATES,
    PromptTemplate,
    check_step_delimiter,
    get_template,
    render_prompt,
    step_delimiter_for,
)
from hs_star_pl.tensors.tiny import build_byte_tokenizer

# A template whose wording asks for one step per line (none of the shipped ones does).
LINES = PromptTemplate("lines", "Reason step by step, separating each step with '\n'.\nQuestion: ", "\nAnswer:\n", "\n")


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
    chat = tokenizer_chat_renderer(build_byte_tokenizer())
    for name in TEMPLATES:
        assert render_prompt(name, "QQQ", chat=chat if get_template(name).chat else None).count("QQQ") == 1


def chatml(system: str | None, question: str) -> str:
    """The tiny tokenizer's chat template (Qwen's ChatML), written out by hand."""
    turns = ([("system", system)] if system else []) + [("user", question)]
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns) + "<|im_start|>assistant\n"


def test_chat_renders_the_system_prompt_and_question_with_the_tokenizers_template():
    chat = tokenizer_chat_renderer(build_byte_tokenizer())
    assert render_prompt("chat", "Is {x} 2?", chat=chat) == chatml(DEFAULT_CHAT_SYSTEM_PROMPT, "Is {x} 2?")
    assert render_prompt("chat", "Q", chat=chat, system_prompt="Be brief.") == chatml("Be brief.", "Q")
    assert render_prompt("chat", "Q", chat=chat, system_prompt="") == chatml(None, "Q")  # no system turn


def test_chat_needs_a_chat_template_and_a_system_prompt_needs_chat():
    with pytest.raises(ValueError, match=r"data.template 'chat' renders prompts with the policy tokenizer's chat template"):
        render_prompt("chat", "Q")
    bare = build_byte_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match=r"data.template: chat .* has no chat template"):
        tokenizer_chat_renderer(bare)
    with pytest.raises(ValueError, match=r"data.system_prompt is used only with data.template: chat"):
        render_prompt("plain", "Q", system_prompt="Be brief.")
    from hs_star_pl.training.data import MathDataModule

    with pytest.raises(ValueError, match=r"data.system_prompt is used only with data.template: chat, "
                                         r"but data.template is 'qwen25-step-cot'"):
        MathDataModule(system_prompt="Be brief.")


def test_chat_rounds_split_on_the_default_delimiter_its_default_system_prompt_asks_for():
    """The chat template's wording is ``data.system_prompt`` (the user's): it names no
    delimiter, so the default one, which the default system prompt asks for, is taken and a
    set one is kept."""
    assert step_delimiter_for("chat", None) == "\n\n"
    assert "separating each step with a blank line" in DEFAULT_CHAT_SYSTEM_PROMPT
    assert step_delimiter_for("chat", "\n") == "\n"


def test_a_template_names_the_delimiter_its_wording_asks_for():
    for name, template in TEMPLATES.items():
        if template.step_delimiter is not None:
            assert f"'{template.step_delimiter}'" in template.prefix + template.suffix, name
    check_step_delimiter("qwen25-step-cot", "\n\n")
    check_step_delimiter("plain", "\n")  # its wording names no delimiter
    with pytest.raises(ValueError, match=r"data.template 'qwen25-step-cot'.*self_training.step_delimiter is '\\n'"):
        check_step_delimiter("qwen25-step-cot", "\n")


def test_the_step_delimiter_follows_the_template_unless_set(monkeypatch):
    monkeypatch.setitem(TEMPLATES, "lines", LINES)
    assert step_delimiter_for("lines", None) == "\n"  # the template is the source
    assert step_delimiter_for("qwen25-step-cot", None) == "\n\n"
    assert step_delimiter_for("plain", None) == "\n\n"  # names none: the default
    assert step_delimiter_for(None, None) == "\n\n"  # no template known
    assert step_delimiter_for("plain", "\n") == "\n" and step_delimiter_for("lines", "\n") == "\n"
    with pytest.raises(ValueError, match=r"data.template 'lines' asks the model to separate steps with '\\n', "
                                         r"but self_training.step_delimiter is '\\n\\n'"):
        step_delimiter_for("lines", "\n\n")


def _self_training_args(tmp_path, template: str, *extra: str) -> list[str]:
    from tests.helpers.tiny_setup import REPO, STEPWISE_FILE

    configs = REPO / "configs"
    return ["fit", "-c", str(configs / "base.yaml"), "-c", str(configs / "debug" / "tiny_self_training.yaml"),
            "--model.tiny.hidden_size=32", f"--data.template={template}", "--data.max_length=512",
            f"--self_training.problems_file={STEPWISE_FILE}", "--self_training.n_iterations=1", "--trainer.max_epochs=1",
            "--self_training.engine=tests.helpers.solution_engine.SolutionEngine",
            f"--self_training.engine.init_args.problems_file={STEPWISE_FILE}", "--export.enabled=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false", *extra]


def test_a_round_splits_on_the_delimiter_its_template_asks_for(tmp_path, monkeypatch):
    """``self_training.step_delimiter`` unset: the round and its settings record take the
    template's delimiter; one set against the template is refused naming both keys."""
    import json

    from hs_star_pl.training.self_training import SelfTrainingCallback
    from hs_star_pl.cli import HSStarCLI

    monkeypatch.setitem(TEMPLATES, "lines", LINES)
    cli = HSStarCLI(args=_self_training_args(tmp_path / "run", "lines"))
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SelfTrainingCallback)]
    assert callback.step_delimiter is None and callback.round_config.step_delimiter == "\n"
    recorded = json.loads((tmp_path / "run" / "rounds" / "round_000" / "settings.json").read_text())["settings"]
    assert recorded["self_training.step_delimiter"] == "\n"
    with pytest.raises(ValueError, match=r"data.template 'lines' asks the model to separate steps with '\\n', "
                                         r"but self_training.step_delimiter is '\\n\\n'"):
        HSStarCLI(args=_self_training_args(tmp_path / "other", "lines", "--self_training.step_delimiter=\n\n"))


def test_a_round_recorded_with_the_delimiter_set_by_hand_matches_the_template_default(tmp_path):
    """A run folder whose rounds were made with ``step_delimiter: "\\n\\n"`` written out (every
    config before the template became its source) is reused by the same run without it."""
    import json

    from hs_star_pl.cli import HSStarCLI

    HSStarCLI(args=_self_training_args(tmp_path, "qwen25-step-cot", "--self_training.step_delimiter=\n\n"))
    recorded = json.loads((tmp_path / "rounds" / "round_000" / "settings.json").read_text())["settings"]
    assert recorded["self_training.step_delimiter"] == "\n\n"
    HSStarCLI(args=_self_training_args(tmp_path, "qwen25-step-cot", "--ckpt_path=last"))  # refused on a settings mismatch otherwise
    assert json.loads((tmp_path / "rounds" / "round_000" / "settings.json").read_text())["settings"] == recorded


def test_unknown_template_lists_valid_names():
    with pytest.raises(ValueError, match=r"'chatml'.*\['chat', 'plain', 'qwen25-step-cot'\]"):
        get_template("chatml")


SYSTEM = "You are a careful solver. Use \\boxed{}."


@pytest.mark.parametrize("template", ["qwen25-step-cot", "chat"])
def test_sampling_training_and_evaluation_see_the_same_prompt(template, tmp_path, monkeypatch):
    """One self-training iteration and its evaluations through the real CLI: the prompt the
    rollout engine continues, the prompt of every pair in the round's file and in training,
    and the prompt the evaluation generates from are one string per question, with
    ``\\boxed{}`` written once everywhere. The paper's template: ``render_prompt``; ``chat``:
    the tiny tokenizer's ChatML around ``data.system_prompt`` and the question."""
    import json

    from hs_star_pl.training.self_training import SelfTrainingCallback
    from hs_star_pl.cli import HSStarCLI
    from hs_star_pl.core.problems import load_problems
    from hs_star_pl.training.module import HSStarModule
    from tests.helpers.tiny_setup import REPO, STEPWISE_FILE

    evaluated: list[tuple[str, str]] = []
    generate_for_eval = HSStarModule.generate_for_eval

    def recording(self, batch):  # records the batch's prompts, then generates as usual
        evaluated.extend((p.id, prompt) for p, prompt in zip(batch.problems, batch.prompts))
        return generate_for_eval(self, batch)

    monkeypatch.setattr(HSStarModule, "generate_for_eval", recording)
    configs = REPO / "configs"
    cli = HSStarCLI(args=[
        "fit", "-c", str(configs / "base.yaml"), "-c", str(configs / "debug" / "tiny_self_training.yaml"),
        "--model.tiny.hidden_size=32", f"--data.template={template}", "--data.max_length=512",
        *([f"--data.system_prompt={SYSTEM}"] if template == "chat" else []),
        f"--self_training.problems_file={STEPWISE_FILE}", "--self_training.n_iterations=1", "--trainer.max_epochs=1",
        "--self_training.engine=tests.helpers.solution_engine.SolutionEngine",
        f"--self_training.engine.init_args.problems_file={STEPWISE_FILE}",
        f"--evaluation.problems_file={STEPWISE_FILE}", "--evaluation.max_problems=3", "--evaluation.max_new_tokens=4",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ])
    questions = {p.id: p.question for p in load_problems(STEPWISE_FILE)}
    if template == "chat":
        expected = {pid: chatml(SYSTEM, q) for pid, q in questions.items()}
    else:
        expected = {pid: render_prompt(template, q) for pid, q in questions.items()}
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SelfTrainingCallback)]
    sampled = callback.engine.prompts
    trained = [(p.problem_id, p.prompt) for p in cli.datamodule.train_examples]
    round_file = [(r["problem_id"], r["prompt"])
                  for r in map(json.loads, (tmp_path / "rounds" / "round_000" / "pairs.jsonl").read_text().splitlines())]
    assert len({pid for pid, _ in sampled}) == 10 and trained and len(evaluated) == 6  # 3 problems, M_0 and M_1
    assert sorted(round_file) == sorted(trained)
    for where, seen in (("sampling", sampled), ("training", trained), ("evaluation", evaluated)):
        for pid, prompt in seen:
            assert prompt == expected[pid], where
            assert "\\boxed{}" in prompt and "{{" not in prompt, where


def test_a_policy_tokenizer_without_a_chat_template_is_refused_naming_data_template(tmp_path):
    """A base model's tokenizer usually has no chat template: ``data.template: chat`` stops
    the run when the data module takes the policy's tokenizer, before any round or step."""
    from hs_star_pl.cli import HSStarCLI
    from hs_star_pl.tensors.tiny import build_tiny_causal_lm, save_checkpoint_dir

    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = None
    model_dir = save_checkpoint_dir(tmp_path / "base_model", build_tiny_causal_lm(tokenizer, hidden_size=32), tokenizer)
    args = [a for a in _self_training_args(tmp_path / "run", "chat") if not a.startswith("--model.tiny")]
    with pytest.raises(ValueError, match=r"data.template: chat renders prompts with the chat template of the "
                                         r"tokenizer in .*base_model, which has no chat template"):
        HSStarCLI(args=[*args, "--model.tiny=null", f"--model.model_path={model_dir}"])
    assert not (tmp_path / "run" / "rounds").exists()


# -- chat templates that cannot render a question, or render it without the question -------------

RAISES = "{{ raise_exception('System role not supported') }}"
DROPS = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n<|im_end|>\n{% endfor %}<|im_start|>assistant\n"


def _tiny_model_dir(tmp_path, chat_template):
    from hs_star_pl.tensors.tiny import build_tiny_causal_lm, save_checkpoint_dir

    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = chat_template
    return save_checkpoint_dir(tmp_path / "policy", build_tiny_causal_lm(tokenizer, hidden_size=32), tokenizer)


@pytest.mark.parametrize(("chat_template", "says"), [
    (None, "has no chat template (no chat_template in its tokenizer_config.json or chat_template.jinja)"),
    (RAISES, "cannot render a question: TemplateError: System role not supported"),
    (DROPS, "renders a question without it: the prompt would not contain the problem"),
])
@pytest.mark.parametrize("command", ["fit", "test"])
def test_a_chat_template_that_cannot_render_the_question_is_one_message_exit_2(chat_template, says, command, tmp_path,
                                                                                 capsys, monkeypatch):
    """No chat template, a template calling ``raise_exception``, a template that drops the
    question: one line naming data.template and the tokenizer's folder, exit status 2, before
    any round or evaluation (no chat template and raise_exception were a traceback, exit 1; the
    dropped question trained on prompts without the problem)."""
    import sys

    from hs_star_pl.cli import main
    from tests.helpers.tiny_setup import REPO, STEPWISE_FILE

    model_dir = _tiny_model_dir(tmp_path, chat_template)
    monkeypatch.setattr(sys, "argv", ["hs-star"])
    if command == "fit":
        args = [a for a in _self_training_args(tmp_path / "run", "chat") if not a.startswith("--model.tiny")]
    else:
        args = ["test", "-c", str(REPO / "configs" / "base.yaml"), "-c", str(REPO / "configs" / "eval" / "tiny.yaml"),
                "--data.template=chat", f"--evaluation.problems_file={STEPWISE_FILE}", "--evaluation.benchmarks=null",
                f"--trainer.default_root_dir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit) as info:
        main([*args, "--model.tiny=null", f"--model.model_path={model_dir}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("hs-star: error: ")]
    assert line.startswith(f"hs-star: error: data.template: chat renders prompts with the chat template of the "
                           f"tokenizer in {model_dir}, which ") and says in line, line
    assert not (tmp_path / "run" / "rounds").exists() and not (tmp_path / "run" / "eval").exists()


def test_a_chat_template_is_probed_once_with_the_system_prompt_it_will_get():
    from hs_star_pl.infra.errors import ConfigError
    from hs_star_pl.tensors.chat import checked_chat_renderer

    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                               "{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ConfigError, match=r"TemplateError: no system.*data.system_prompt: \"\""):
        checked_chat_renderer(tokenizer, "chat", None)
    render = checked_chat_renderer(tokenizer, "chat", "")  # no system message: renders
    assert render_prompt("chat", "Q?", chat=render, system_prompt="") == "Q?"
