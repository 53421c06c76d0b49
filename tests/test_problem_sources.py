"""Problem pools and benchmarks beyond JSONL: parquet files, ``save_to_disk`` folders and ``hub:``
data sets read through ``datasets``; dotted field paths, chat-message questions, row filters
and ``max_rows``; every bad row named by file and row index. The data sets are written here
with ``datasets`` itself, in the shapes verl and NuminaMath-1.5 publish."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from datasets import Dataset, DatasetDict

from hs_star_pl.core.problems import FieldMap, ProblemFileError, load_problems, write_problems
from hs_star_pl.evaluation.datasets import BenchmarkConfig, load_benchmark
from tests.helpers.tiny_setup import REPO


def verl_rows(n: int = 4) -> list[dict]:
    """Rows in verl's parquet layout (examples/data_preprocess/gsm8k.py): a chat prompt, the gold
    under reward_model.ground_truth, the index under extra_info."""
    return [
        {"data_source": "openai/gsm8k",
         "prompt": [{"role": "system", "content": "Reason step by step."},
                    {"role": "user", "content": f"What is {i} + {i}?"}],
         "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
         "extra_info": {"split": "train", "index": 100 + i}}
        for i in range(n)
    ]


def numina_rows() -> list[dict]:
    """Rows with NuminaMath-1.5's columns; only some are valid word problems."""
    kinds = [("math-word-problem", "Yes"), ("proof", "Yes"), ("math-word-problem", "No"), ("MCQ", "Yes"),
             ("math-word-problem", "Yes"), ("math-word-problem", "Yes"), ("MCQ", "No"), ("math-word-problem", "Yes")]
    return [{"problem": f"Problem {i}", "solution": f"... so \\boxed{{{i}}}", "answer": str(i),
             "problem_type": "Algebra", "question_type": q, "problem_is_valid": v, "source": "olympiads"}
            for i, (q, v) in enumerate(kinds)]


def write_parquet(path, rows) -> str:
    Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def test_parquet_and_saved_folders_give_the_problems_of_the_same_rows_as_jsonl(tmp_path):
    rows = verl_rows()
    jsonl = tmp_path / "pool.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_jsonl = load_problems(jsonl)
    # the verl layout needs no field settings: prompt is a chat, gold and id are dotted defaults
    assert [(p.id, p.question, p.answer) for p in from_jsonl] == [
        (str(100 + i), f"What is {i} + {i}?", str(2 * i)) for i in range(4)]
    parquet = write_parquet(tmp_path / "pool.parquet", rows)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(rows[:1]), "test": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "splits"))
    for source, options in [(parquet, {}), (tmp_path / "saved", {}), (tmp_path / "splits", {"split": "test"})]:
        assert load_problems(source, **options) == from_jsonl, source
    single = tmp_path / "one_split"
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(single))
    assert load_problems(single) == from_jsonl  # the only split needs no name


def test_dotted_paths_name_nested_fields_and_a_key_written_with_a_dot_wins(tmp_path):
    rows = [{"q": {"text": "2+2?"}, "meta": {"gold": {"value": 4}}, "extra_info": {"index": "a"}, "a.b": "flat"},
            {"q": {"text": "3+3?"}, "meta": {"gold": {"value": 6}}, "extra_info": {"index": "b"}, "a.b": "flat"}]
    path = write_parquet(tmp_path / "nested.parquet", rows)
    problems = load_problems(path, question_key="q.text", answer_key="meta.gold.value", id_key="extra_info.index",
                             solution_key="a.b")
    assert [(p.id, p.question, p.answer, p.solution) for p in problems] == [("a", "2+2?", "4", "flat"),
                                                                          ("b", "3+3?", "6", "flat")]
    assert problems[0].metadata["meta"] == {"gold": {"value": 4}}  # the rest of the row is kept
    with pytest.raises(ProblemFileError) as info:
        load_problems(path, question_key="q.txt", answer_key="meta.gold.value")
    assert str(info.value).startswith(f"{path}, row 0: no question field ('q.txt'); row has ['a.b', 'extra_info', 'meta', 'q']")


def test_a_chat_question_is_its_last_user_message_and_a_chat_without_one_is_named(tmp_path):
    rows = verl_rows(3)
    rows[0]["prompt"] = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "hm"},
                         {"role": "user", "content": "second"}]
    assert load_problems(write_parquet(tmp_path / "ok.parquet", rows))[0].question == "second"
    rows[2]["prompt"] = [{"role": "system", "content": "Reason."}, {"role": "assistant", "content": "4"}]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(ProblemFileError) as info:
        load_problems(path)
    assert str(info.value) == f"{path}, row 2: field 'prompt' is a chat with no user message (roles: ['system', 'assistant'])"
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"prompt": [{"role": "user"}], "answer": "1"}) + "\n")
    with pytest.raises(ProblemFileError, match=r"bad.jsonl:1: field 'prompt' must be a non-empty string or a list of "
                                               r"\{role, content\} chat messages"):
        load_problems(jsonl)


def test_filters_keep_matching_rows_and_max_rows_keeps_the_first_after_filtering(tmp_path):
    path = write_parquet(tmp_path / "numina.parquet", numina_rows())
    valid_word = {"question_type": "math-word-problem", "problem_is_valid": "Yes"}
    assert [p.answer for p in load_problems(path, filters=valid_word)] == ["0", "4", "5", "7"]
    assert [p.answer for p in load_problems(path, filters=valid_word, max_rows=2)] == ["0", "4"]
    one_of = {"question_type": ["MCQ", "proof"]}
    assert [p.answer for p in load_problems(path, filters=one_of)] == ["1", "3", "6"]
    assert [p.answer for p in load_problems(path, max_rows=3)] == ["0", "1", "2"]
    # the filtered-out columns stay in each problem's metadata
    assert load_problems(path, filters=valid_word)[0].metadata["question_type"] == "math-word-problem"


def test_filters_that_match_nothing_or_name_a_missing_field_say_so(tmp_path):
    path = write_parquet(tmp_path / "numina.parquet", numina_rows())
    with pytest.raises(ProblemFileError) as info:
        load_problems(path, filters={"problem_is_valid": True})  # YAML's reading of an unquoted Yes
    assert str(info.value) == (f"{path}: none of its 8 rows matches the filters {{'problem_is_valid': True}}; YAML reads "
                               "an unquoted Yes/No/true/false as a boolean: quote a text value (\"Yes\")")
    with pytest.raises(ProblemFileError) as info:
        load_problems(path, filters={"question_kind": "proof"})
    assert str(info.value).startswith(f"{path}, row 0: no field 'question_kind' for the filter on it; row has ['answer', ")
    for bad in ({"max_rows": 0}, {"max_rows": True}, {"filters": ["question_type"]}):
        with pytest.raises(ValueError, match="max_rows must be|filters must map"):
            load_problems(path, **bad)


def test_a_bad_row_of_a_data_set_is_named_by_file_and_row_index(tmp_path):
    rows = numina_rows()
    rows[5]["answer"] = ""
    path = write_parquet(tmp_path / "numina.parquet", rows)
    with pytest.raises(ProblemFileError) as info:
        load_problems(path)
    assert (str(info.value), info.value.row, info.value.line) == (f"{path}, row 5: field 'answer': the answer is empty", 5, None)
    assert len(load_problems(path, max_rows=5)) == 5  # rows after the first max_rows are not read
    saved = tmp_path / "saved"
    Dataset.from_list(rows).save_to_disk(str(saved))
    with pytest.raises(ProblemFileError, match=f"^{saved}, row 5: field 'answer': the answer is empty$"):
        load_problems(saved)
    dup = numina_rows()
    dup[6]["id"] = dup[2]["id"] = "x"
    for r in dup:
        r.setdefault("id", r["problem"])
    path = write_parquet(tmp_path / "dup.parquet", dup)
    with pytest.raises(ProblemFileError, match=r"dup.parquet, row 6: duplicate problem id 'x' \(first seen on row 2\)$"):
        load_problems(path)


def test_rows_without_ids_get_their_row_index_under_default_id_line(tmp_path):
    rows = [{"question": "Same?", "answer": "1"}, {"question": "Same?", "answer": "1"}]
    assert [p.id for p in load_problems(write_parquet(tmp_path / "p.parquet", rows), default_id="line")] == ["row-0", "row-1"]


def test_sources_that_cannot_be_read_are_named_with_what_is_wrong(tmp_path):
    rows = verl_rows(2)
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "splits"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    parquet = write_parquet(tmp_path / "p.parquet", rows)
    jsonl = tmp_path / "p.jsonl"
    write_problems(jsonl, load_problems(parquet))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet PAR1")
    (tmp_path / "plain_dir").mkdir()
    cases = [
        (tmp_path / "splits", {}, "holds the splits ['train', 'test']; set split to one of them"),
        (tmp_path / "splits", {"split": "validation"}, "has no split 'validation'; its splits are ['train', 'test']"),
        (tmp_path / "saved", {"split": "train"}, "holds one data set, not splits; unset split (got 'train')"),
        (parquet, {"split": "train"}, "is one parquet file, not a data set with splits; unset split (got 'train')"),
        (parquet, {"dataset_config": "main"}, "dataset_config and data_files apply to a hub:<name> data set; unset them"),
        (jsonl, {"split": "train"}, "split applies to a data set (a save_to_disk folder or hub:<name>), not to a JSONL file; unset it"),
        (tmp_path / "missing.parquet", {}, "no such parquet file"),
        (tmp_path / "plain_dir", {}, "is a directory, not a problem file (a JSONL or parquet file, or a folder written by "
                                     "Dataset.save_to_disk, with state.json or dataset_dict.json, is expected)"),
    ]
    for source, options, message in cases:
        with pytest.raises(ProblemFileError) as info:
            load_problems(source, **options)
        assert str(info.value) == f"{source}: {message}", (source, options)
    with pytest.raises(ProblemFileError, match=f"^{corrupt}: .*(cannot read|parquet)"):
        load_problems(corrupt)


def _load_hub(name: str, **environ: str) -> subprocess.CompletedProcess:
    code = ("from hs_star_pl.core.problems import load_problems\n"
            f"try:\n    load_problems({name!r}, split='train')\n"
            "except Exception as err:\n    print(type(err).__name__, err)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": str(REPO), **environ})


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_a_hub_source_offline_by_choice_says_it_is_not_in_the_cache(variable, tmp_path):
    out = _load_hub("hub:AI-MO/NuminaMath-1.5", **{variable: "1"}, HF_HOME=str(tmp_path / "hf"),
                    HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets")).stdout
    assert out.startswith(f"ProblemFileError hub:AI-MO/NuminaMath-1.5: {variable}=1 is set, so nothing is downloaded, "
                          "and 'AI-MO/NuminaMath-1.5' is not in the datasets cache"), out
    assert "problems_file" in out and "may be offline" not in out


def test_a_hub_source_that_cannot_reach_the_hub_fails_at_once_without_retries(tmp_path):
    """No network and no offline variable: the Hub's client retried for about 25 s before it
    said so; the endpoint is tried once (a closed local port here: nothing leaves the machine)."""
    out = _load_hub("hub:AI-MO/NuminaMath-1.5", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    assert out.stdout.startswith("ProblemFileError hub:AI-MO/NuminaMath-1.5: cannot reach the Hugging Face Hub at "
                                 "http://127.0.0.1:9 ("), out.stdout + out.stderr[-2000:]
    assert "HF_DATASETS_OFFLINE=1" in out.stdout and "save_to_disk" in out.stdout
    assert "Retrying" not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "/abs/path", "owner/name/extra", "a..b/c", "-x/y", "x/"])
def test_a_path_after_hub_is_refused_as_not_a_hub_id(name):
    with pytest.raises(ProblemFileError) as info:
        load_problems(f"hub:{name}")
    assert str(info.value) == (f"hub:{name}: {name!r} is not a Hugging Face Hub data set id (<owner>/<name> or <name>: "
                               "letters, digits, '-', '_' and '.'); for a file or folder on this machine, drop the "
                               "'hub:' prefix")


def test_a_benchmark_reads_a_parquet_split_with_filters_and_limit(tmp_path):
    rows = numina_rows()
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "bench"))
    config = BenchmarkConfig(name="numina", path=str(tmp_path / "bench"), format="math500", split="test",
                             filters={"question_type": "math-word-problem", "problem_is_valid": "Yes"}, limit=3)
    # math500's fields: problem, answer, unique_id (absent here, so it names the row) and solution
    with pytest.raises(ProblemFileError) as info:
        load_benchmark(config)
    assert str(info.value).startswith(f"{tmp_path / 'bench'}, row 0: no id field 'unique_id' "
                                      f"(evaluation.benchmarks['numina'] has format 'math500'; its rows look like ")
    for i, r in enumerate(rows):
        r["unique_id"] = f"u{i}"
    write_parquet(tmp_path / "bench.parquet", rows)
    problems = load_benchmark(BenchmarkConfig(name="numina", path=str(tmp_path / "bench.parquet"), format="math500",
                                              filters={"question_type": "math-word-problem", "problem_is_valid": "Yes"},
                                              limit=3))
    assert [(p.id, p.answer, p.solution) for p in problems] == [("u0", "0", "... so \\boxed{0}"), ("u4", "4", "... so \\boxed{4}"),
                                                                ("u5", "5", "... so \\boxed{5}")]
    assert load_benchmark(BenchmarkConfig(name="numina", path=str(tmp_path / "bench.parquet"), format="math500"), max_problems=2)[-1].id == "u1"


def numina_pool(n: int) -> list[dict]:
    """n NuminaMath-1.5-shaped rows, about half of them valid word problems (the others: proofs,
    multiple choice, invalid statements)."""
    kinds = [("math-word-problem", "Yes"), ("proof", "Yes"), ("math-word-problem", "No"), ("MCQ", "Yes")]
    return [{"problem": f"What is {i} + 1?", "solution": f"{i} + 1 = {i + 1}.\n\nSo \\boxed{{{i + 1}}}",
             "answer": str(i + 1), "question_type": kinds[i % 4][0] if i % 2 else "math-word-problem",
             "problem_is_valid": kinds[i % 4][1] if i % 2 else "Yes", "source": "olympiads"} for i in range(n)]


def test_the_shipped_numina_overlay_reads_a_parquet_pool_through_the_cli(tmp_path, monkeypatch):
    """configs/paper/pools/numinamath15.yaml, as the CLI parses it on the tiny self-training config,
    loads exactly the valid word problems of a parquet pool (its quoted "Yes" matters)."""
    from hs_star_pl.training.self_training import SelfTrainingCallback
    from hs_star_pl.cli import HSStarCLI

    monkeypatch.chdir(REPO)
    rows = numina_pool(60)
    pool = write_parquet(tmp_path / "numina.parquet", rows)
    cli = HSStarCLI(args=["-c", "configs/base.yaml", "-c", "configs/debug/tiny_self_training.yaml",
                          "-c", "configs/paper/pools/numinamath15.yaml", f"--self_training.problems_file={pool}",
                          f"--trainer.default_root_dir={tmp_path / 'run'}"], run=False)
    fields = cli.config["self_training"]["problem_fields"]
    assert (fields.filters, fields.max_rows) == ({"question_type": "math-word-problem", "problem_is_valid": "Yes"}, 22500)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, SelfTrainingCallback))
    kept = [r for r in rows if (r["question_type"], r["problem_is_valid"]) == ("math-word-problem", "Yes")]
    assert 20 <= len(kept) < len(rows)
    pool_problems = callback.load_pool().problems
    assert [(p.question, p.answer) for p in pool_problems] == [(r["problem"], r["answer"]) for r in kept]
    assert all(p.solution.endswith(f"\\boxed{{{p.answer}}}") for p in pool_problems)


def test_hs_star_test_on_a_parquet_benchmark_evaluates_the_filtered_rows_as_their_jsonl_copy(tmp_path, monkeypatch):
    """One real ``hs-star test`` (tiny random policy): a parquet benchmark with filters and a limit
    gives, problem by problem, the responses and verdicts of a JSONL file holding those rows."""
    from hs_star_pl.cli import HSStarCLI

    rows = [dict(r, id=f"n{i}") for i, r in enumerate(numina_pool(16))]
    parquet = write_parquet(tmp_path / "bench.parquet", rows)
    kept = [r for r in rows if r["question_type"] == "math-word-problem" and r["problem_is_valid"] == "Yes"][:5]
    jsonl = tmp_path / "bench.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept))
    config = tmp_path / "eval.json"
    bench = [{"name": "as_jsonl", "path": str(jsonl)},
             {"name": "as_parquet", "path": parquet, "limit": 5,
              "filters": {"question_type": "math-word-problem", "problem_is_valid": "Yes"}}]
    config.write_text(json.dumps({"evaluation": {
        "verifier": {"class_path": "hs_star_pl.verifiers.ExactMatchVerifier"}, "max_new_tokens": 8, "benchmarks": bench}}))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    HSStarCLI(args=["test", "-c", str(REPO / "configs" / "base.yaml"), "-c", str(REPO / "configs" / "debug" / "tiny_cpu.yaml"),
                    "-c", str(config), f"--trainer.default_root_dir={run}", "--trainer.enable_progress_bar=false",
                    "--data.template=plain"])
    results = {name: json.loads(next((run / "eval" / name).glob("*.json")).read_text()) for name in ("as_jsonl", "as_parquet")}
    assert [r["problem_id"] for r in results["as_parquet"]["rows"]] == [r["id"] for r in kept]
    assert [(r["problem_id"], r["responses"], r["correct"]) for r in results["as_parquet"]["rows"]] == \
           [(r["problem_id"], r["responses"], r["correct"]) for r in results["as_jsonl"]["rows"]]
    assert results["as_parquet"]["benchmark"]["filters"] == {"question_type": "math-word-problem", "problem_is_valid": "Yes"}


def test_step_wise_initialisation_reads_its_solutions_from_a_filtered_parquet_pool(tmp_path):
    """data.problems_file with data.problem_fields: the SFT examples are the kept rows' solutions."""
    from hs_star_pl.training.data import MathDataModule

    rows = numina_pool(12)
    path = write_parquet(tmp_path / "numina.parquet", rows)
    fields = FieldMap(question_key="problem", filters={"question_type": "math-word-problem", "problem_is_valid": "Yes"},
                      max_rows=4)
    examples = MathDataModule(problems_file=path, problem_fields=fields, template="plain").load_train_examples()
    kept = [r for r in rows if (r["question_type"], r["problem_is_valid"]) == ("math-word-problem", "Yes")][:4]
    assert len(kept) == 4 and len(kept) < len(rows)
    assert [e.response for e in examples] == [r["solution"] for r in kept]
    assert all(r["problem"] in e.prompt for e, r in zip(examples, kept))
