"""The bad-input corpus (``tests/corpus/bad_inputs/``): each case and the exact error a user sees.

Problem files and training-example files are loaded directly (the message must name
``file:line``); config fragments go through the real entry point, ``hs_star_pl.cli.main``, on
top of ``configs/base.yaml`` and the tiny self-training config, and must end in one
``hs-star: error: ...`` message naming the config key (exit status 2), never a traceback.
Together with ``test_degenerate_rounds.py`` this covers the bad inputs; damaged run folders,
full disks and reused run folders are in ``test_run_folders.py``.
"""

from __future__ import annotations

import json
import sys

import pytest

from hs_star_pl.cli import main
from hs_star_pl.core.problem_sources import NOT_A_SAVED_FOLDER
from hs_star_pl.core.problems import MAX_LINE_BYTES, ProblemFileError, load_problems
from hs_star_pl.training.data import ExampleFileError, load_examples
from tests.helpers.tiny_setup import REPO

CORPUS = REPO / "tests" / "corpus" / "bad_inputs"
PROBLEMS = "tests/corpus/bad_inputs/problems"
EXAMPLES = "tests/corpus/bad_inputs/examples"

SURROGATE = "holds a lone UTF-16 surrogate (an escape such as \\ud800 with no pair), which is not text"
PROBLEM_CASES = {
    "bad_json": "2: invalid JSON: Expecting ',' delimiter (column 69)",
    "truncated_last_line": "2: invalid JSON: Unterminated string starting at (column 26)",
    "not_an_object": "1: expected a JSON object, got list",
    "missing_question": "2: no question field ('question' or 'problem' or 'query' or 'prompt'); row has ['answer', 'id']; "
                        "name the field with question_key",
    "missing_answer": "1: no answer field ('answer' or 'final_answer' or 'gold' or 'expected_answer' or 'reward_model.ground_truth'); row has "
                      "['id', 'question', 'solution']; name the field with answer_key",
    "question_not_a_string": "1: field 'question' must be a non-empty string, got 34",
    "empty_question": "1: field 'question' must be a non-empty string, got '   '",
    "answer_null": "1: field 'answer': expected a string, number or list of them, got None",
    "answer_bool": "1: field 'answer': expected a string, number or list of them, got True",
    "answer_object": "1: field 'answer': expected a string, number or list of them, got dict",
    "answer_empty_list": "1: field 'answer': the answer list is empty",
    "answer_nan": "1: field 'answer': the answer is not a finite number: nan",
    "id_not_scalar": "1: field 'id' must be a non-empty string or integer",
    "solution_not_a_string": "1: field 'solution' must be a string (or a list of strings), got int",
    "not_utf8": "2: not valid UTF-8 (invalid continuation byte at byte 29)",
    "empty": " the file holds no problems",
    "blank_lines_only": " the file holds no problems",
    "duplicate_ids": "3: duplicate problem id 'p1' (first seen on line 1)",
    "duplicate_content": "2: duplicate problem id 'h782922677800f2ec' (first seen on line 1)",
    # Python's json raises a plain ValueError past 4,300 digits (sys.set_int_max_str_digits)
    "int_over_4300_digits": "1: invalid JSON: a number has more than 4300 digits",
    # it would load, then break the tokenizer at the first generation
    "lone_surrogate": f"1: field 'question' {SURROGATE}",
}

EXAMPLE_CASES = {
    "bad_json": "2: invalid JSON: Expecting value (column 74)",
    "neither_pair_nor_sft": "1: a row needs 'chosen' + 'rejected' (pair) or 'response' (SFT)",
    "mixed_kinds": "2: sft row in a file of pair rows",
    "no_prompt": "1: needs a 'prompt' (rendered) or 'question' string",
    "chosen_not_a_string": "1: field 'chosen' must be a string, got int",
    "ref_logp_nan": "2: field 'ref_chosen_logp' must be a finite number or null, got nan",
    "ref_logp_not_a_number": "1: field 'ref_chosen_logp' must be a finite number or null, got '-2.5'",
    "empty": " the file holds no examples",
    "not_utf8": "2: not valid UTF-8 (invalid continuation byte at byte 17)",
    "int_over_4300_digits": "1: invalid JSON: a number has more than 4300 digits",
    "lone_surrogate": f"1: field 'chosen' {SURROGATE}",
}

K = "self_training.budget.init_args"
CONFIG_CASES = {
    "budget_presample_over_k": f"{K}.n_presample (5) must be <= {K}.samples_per_problem (4)",
    "budget_negative": f"{K}.samples_per_problem must be a positive integer, got -8",
    "budget_zero_presample": f"{K}.n_presample must be a positive integer, got 0",
    "thresholds_crossed": "self_training.difficulty.tau_low (0.9) must be <= self_training.difficulty.tau_high (0.5)",
    "threshold_out_of_range": "self_training.difficulty.tau_high must be a number in [0, 1], got 1.5",
    "max_epochs_mismatch": "self-training configuration:\n  - trainer.max_epochs (5) must equal self_training.n_iterations "
                           "(2) x self_training.epochs_per_iteration (1) = 2",
    "reload_dataloaders_off": "self-training configuration:\n  - trainer.reload_dataloaders_every_n_epochs must be 1 "
                              "(each epoch trains on its iteration's data), got 0",
    "objective_mismatch": "self-training configuration:\n  - model.objective ('sft') must match "
                          "self_training.selection.objective ('dpo')",
    "missing_model_path": "model.model_path=checkpoints/does-not-exist/m0 does not exist: a local Hugging Face model "
                          "folder is expected (config.json, weights, tokenizer files), e.g. an hf/policy_NNN export, or "
                          "a hub id (org/name)",
    "model_path_and_tiny": "set exactly one of model.model_path (a local HF folder or a hub id) and model.tiny (a config)",
    "problems_per_iteration_negative": "self_training.problems_per_iteration must be >= 1, got -5",
    "pool_too_small": "self_training.problems_file=configs/data/arith_stepwise.jsonl: the problem pool has 20 problems "
                      "but iteration 1 needs 30 distinct ones (15 per iteration); use a larger pool or fewer "
                      "self_training.problems_per_iteration (self_training.on_exhausted: reshuffle would need 30 "
                      "problems)",
    "unknown_train_class": "self_training.selection.train_classes: unknown class ['easy']; valid: "
                           "['inlier', 'boundary', 'outlier']",
    "temperature_negative": "self_training.sampling.temperature must be >= 0, got -0.5",
    "verifier_timeout_zero": "self_training.verifier.init_args.timeout_s must be > 0, got 0.0",
    "problems_file_bad_row": f"{PROBLEMS}/bad_json.jsonl:2: invalid JSON: Expecting ',' delimiter (column 69)",
    "problems_file_no_question": f"{PROBLEMS}/missing_question.jsonl:2: no question field ('question' or 'problem' or "
                                 "'query' or 'prompt'); row has ['answer', 'id']; name the field with "
                                 "self_training.problem_fields.question_key",
    "problems_file_missing": "data/no-such-pool.jsonl: no such problem file (self_training.problems_file)",
    "train_file_bad_row": f"{EXAMPLES}/chosen_not_a_string.jsonl:1: field 'chosen' must be a string, got int",
    "yaml_syntax_error": "tests/corpus/bad_inputs/configs/yaml_syntax_error.yaml:5: invalid YAML: expected ',' or ']', "
                         "but got '<stream end>' (while parsing a flow sequence on line 4)",
    "step_delimiter_empty": "self_training.step_delimiter must be a non-empty string, got ''",
    "lr_nan": "model.optimizer.init_args.lr must be a finite number, got nan",
    "lr_negative": "model.optimizer.init_args.lr must be >= 0, got -0.0001",
    "temperature_nan": "self_training.sampling.temperature must be a finite number, got nan",
    "temperature_inf": "self_training.sampling.temperature must be a finite number, got inf",
    "beta_nan": "model.beta must be a finite number, got nan",
    "template_misspelled": "data.template: unknown prompt template 'plian'; valid names are ['chat', 'plain', 'qwen25-step-cot']",
    "epochs_per_iteration_zero": "self_training.epochs_per_iteration must be >= 1, got 0",
    "problems_file_directory": f"{PROBLEMS}: {NOT_A_SAVED_FOLDER} (self_training.problems_file)",
    "samples_per_problem_huge": f"{K}.samples_per_problem (1000000000) is over the limit of 4096: a round holds every "
                                "response (K x problems) in memory, so a K this large would run out of memory after "
                                "pre-sampling (the paper uses K=8)",
}

# Rejected by jsonargparse while parsing: its own "error: ..." block names the key.
PARSE_CASES = {
    "unknown_budget_class": ('Parser key "self_training.budget"',
                             "module 'hs_star_pl.core.budget' has no attribute 'NoSuchBudget'"),
    "unknown_prm_module": ('Parser key "self_training.prm"', "module 'hs_star_pl' has no attribute 'prm_v2'"),
    "misspelled_key": ("Subcommand 'fit' does not accept option 'self_training.n_iteration'",),
    "nonfinite_loss_unknown": ('Parser key "model.nonfinite_loss"', "Got value: ignore"),
    "on_empty_round_unknown": ('Parser key "self_training.on_empty_round"', "Got value: retry"),
}


def test_the_corpus_has_a_file_for_every_case_and_a_case_for_every_file():
    assert {p.stem for p in (CORPUS / "problems").glob("*.jsonl")} == set(PROBLEM_CASES)
    assert {p.stem for p in (CORPUS / "examples").glob("*.jsonl")} == set(EXAMPLE_CASES)
    assert {p.stem for p in (CORPUS / "configs").glob("*.yaml")} == set(CONFIG_CASES) | set(PARSE_CASES)
    assert len(PROBLEM_CASES) + len(EXAMPLE_CASES) + len(CONFIG_CASES) + len(PARSE_CASES) >= 30


@pytest.mark.parametrize("name", list(PROBLEM_CASES))
def test_problem_file_errors_name_file_and_line(name, monkeypatch):
    monkeypatch.chdir(REPO)
    path = f"{PROBLEMS}/{name}.jsonl"
    with pytest.raises(ProblemFileError) as info:
        load_problems(path)
    assert str(info.value) == f"{path}:{PROBLEM_CASES[name]}"


@pytest.mark.parametrize("name", list(EXAMPLE_CASES))
def test_example_file_errors_name_file_and_line(name, monkeypatch):
    monkeypatch.chdir(REPO)
    path = f"{EXAMPLES}/{name}.jsonl"
    with pytest.raises(ExampleFileError) as info:
        load_examples(path, "plain")
    assert str(info.value) == f"{path}:{EXAMPLE_CASES[name]}"


def test_a_10_mb_line_is_refused_before_it_is_parsed(tmp_path):
    row = json.dumps({"question": "Start with 1. " + "Add 1. " * (10 * 1024 * 1024 // 7), "answer": "1"})
    for loader, path in ((load_problems, tmp_path / "problems.jsonl"), (lambda p: load_examples(p, "plain"), tmp_path / "pairs.jsonl")):
        path.write_text('{"question": "Q", "answer": "1", "chosen": "a", "rejected": "b"}\n' + row + "\n")
        with pytest.raises((ProblemFileError, ExampleFileError)) as info:
            loader(path)
        assert str(info.value) == f"{path}:2: line is {len(row) + 1} bytes, over the {MAX_LINE_BYTES}-byte limit"


@pytest.mark.parametrize("loader", ["problems", "examples"])
def test_a_byte_order_mark_at_the_start_of_a_file_is_read(loader, tmp_path):
    """Editors on Windows start UTF-8 files with a BOM; the first row is read as if it were not there."""
    path = tmp_path / "with_bom.jsonl"
    row = {"id": "p1", "question": "Start with 2. Add 3. What is the result?", "answer": "5", "chosen": "5", "rejected": "6"}
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(row) + "\n").encode())
    if loader == "problems":
        (problem,) = load_problems(path)
        assert (problem.id, problem.question) == ("p1", row["question"])
    else:
        (pair,) = load_examples(path, "plain")
        assert (pair.chosen, pair.rejected) == ("5", "6")


@pytest.mark.parametrize("kind", ["directory", "symlink_loop", "broken_symlink"])
def test_a_path_that_is_not_a_file_is_named_for_what_it_is(kind, tmp_path):
    path = tmp_path / "pool.jsonl"
    if kind == "directory":
        path.mkdir()
        why = "is a directory, not a {} (a JSONL file is expected)"
    elif kind == "symlink_loop":
        path.symlink_to(path)
        why = "is a symbolic link that loops back on itself, not a {}"
    else:
        path.symlink_to(tmp_path / "gone.jsonl")
        why = f"is a symbolic link to {tmp_path / 'gone.jsonl'}, which does not exist"
    with pytest.raises(ProblemFileError) as info:
        load_problems(path)
    # a folder may be a Dataset.save_to_disk folder, so the message for one names those too
    assert str(info.value) == f"{path}: " + (NOT_A_SAVED_FOLDER if kind == "directory" else why.format("problem file"))
    with pytest.raises(ExampleFileError) as info:
        load_examples(path, "plain")
    assert str(info.value) == f"{path}: " + why.format("example file")


def run_main(case: str, tmp_path, capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["hs-star"])  # the CLI reads only ``args``
    base = "configs/debug/tiny_cpu.yaml" if case.startswith("train_file") else "configs/debug/tiny_self_training.yaml"
    args = ["fit", "-c", "configs/base.yaml", "-c", base, "-c", f"tests/corpus/bad_inputs/configs/{case}.yaml",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false"]
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return info.value.code, err


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_errors_name_the_key_without_a_traceback(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # paths in the corpus are repo-relative, as in the shipped configs
    code, err = run_main(case, tmp_path, capsys, monkeypatch)
    assert code == 2
    assert err[err.index("hs-star: error: "):].strip() == f"hs-star: error: {CONFIG_CASES[case]}"


@pytest.mark.parametrize("case", list(PARSE_CASES))
def test_parse_errors_name_the_key(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, err = run_main(case, tmp_path, capsys, monkeypatch)
    assert code == 2
    for part in PARSE_CASES[case]:
        assert part in err


def test_a_bad_config_on_resume_leaves_finished_artifacts_untouched(tmp_path, capsys, monkeypatch):
    """Re-running a run folder with a config error (found in setup, after the trainer exists)
    changes none of the files already there."""
    monkeypatch.chdir(REPO)
    finished = {"rounds/round_000/DONE": b"", "rounds/round_000/pairs.jsonl": b'{"chosen": "a"}\n',
                "checkpoints/last.ckpt": b"weights", "hf/policy_001/config.json": b"{}"}
    for name, data in finished.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    code, err = run_main("max_epochs_mismatch", tmp_path, capsys, monkeypatch)
    assert code == 2 and "trainer.max_epochs (5)" in err
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before


def test_questions_longer_than_the_models_context_are_warned_about_at_setup(tmp_path, monkeypatch):
    """A question of 2,800 tokens for a policy with a 256-token context: sampled as if nothing were wrong, before."""
    from hs_star_pl.cli import HSStarCLI

    monkeypatch.chdir(REPO)
    rows = [{"id": f"p{i}", "question": f"Start with {i}. Add 3. What is the result?", "answer": str(i + 3)} for i in range(3)]
    rows.append({"id": "long", "question": "Start with 1. " + "Add 1. " * 400 + "What is the result?", "answer": "401"})
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["fit", "-c", "configs/base.yaml", "-c", "configs/debug/tiny_self_training.yaml",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false", f"--self_training.problems_file={pool}",
            "--self_training.problems_per_iteration=null", "--self_training.n_iterations=1", "--trainer.max_epochs=1",
            "--model.tiny.max_position_embeddings=256", "--self_training.sampling.max_new_tokens=8",
            "--self_training.budget.init_args.samples_per_problem=2", "--self_training.budget.init_args.n_presample=1"]
    with pytest.warns(UserWarning, match=r"1 of the 4 problems in self_training.problems_file=\S+pool.jsonl have prompts "
                                         r"longer than the policy's context \(256 tokens, max_position_embeddings\) leaves "
                                         r"for self_training.sampling.max_new_tokens \(8\); the longest, problem 'long', is "
                                         r"\d{4} tokens"):
        HSStarCLI(args=args)
