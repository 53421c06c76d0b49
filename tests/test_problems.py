"""Problem files: field mapping, stable ids, file:line errors, and per-iteration draws."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hs_star_pl.core.problems import ProblemFileError, ProblemPool, content_id, load_problems, normalize_gold, write_problems
from hs_star_pl.core.records import Problem


def write_lines(path, lines):
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


def test_common_dataset_shapes_are_mapped(tmp_path):
    f = write_lines(
        tmp_path / "mixed.jsonl",
        [
            json.dumps({"question": "Q1", "answer": "Janet... so 1,234 in all.\n#### 1,234"}),  # GSM8K
            json.dumps({"problem": "Q2", "answer": "\\frac{1}{2}", "solution": "s", "unique_id": "test/1"}),  # MATH500
            json.dumps({"question": "Q3", "final_answer": ["$5$"], "id": 7}),  # OlympiadBench
            json.dumps({"question": "Q4", "answer": 27.0, "level": 3}),  # AMC23
            json.dumps({"query": "Q5", "answer": 2.5}),
        ],
    )
    p1, p2, p3, p4, p5 = load_problems(f)
    assert (p1.answer, p1.solution.endswith("#### 1,234")) == ("1234", True)
    assert (p2.id, p2.question, p2.answer, p2.solution) == ("test/1", "Q2", "\\frac{1}{2}", "s")
    assert (p3.id, p3.answer) == ("7", "5")  # a one-element list is unwrapped, "$" removed
    assert (p4.answer, p4.metadata) == ("27", {"level": 3})
    assert p5.answer == "2.5"
    assert p1.id == content_id("Q1", "1234") and p1.id != content_id("Q1", "1235")


def test_content_ids_are_stable_across_processes_and_versions(tmp_path):
    """A row without an id gets ``h`` + the first 16 hex digits of sha256(question NUL gold).
    The literal values pin the rule: round folders and resumed runs name problems by these
    ids, so a changed rule would silently orphan them."""
    assert content_id("What is 2+3?", "5") == "h9d7458448f198870"
    assert content_id("Q", ("1", "2")) == "hd0d070eaf2a5e188"
    f = write_lines(tmp_path / "p.jsonl", [json.dumps({"question": "What is 2+3?", "answer": "#### 5"})])
    assert load_problems(f)[0].id == "h9d7458448f198870"  # the id hashes the normalised gold


def test_configured_keys_override_the_defaults(tmp_path):
    f = write_lines(tmp_path / "x.jsonl", [json.dumps({"q": "What?", "a": "3", "uid": "u1", "question": "other"})])
    (p,) = load_problems(f, question_key="q", answer_key="a", id_key="uid")
    assert (p.id, p.question, p.answer) == ("u1", "What?", "3")


def test_write_then_load_round_trips(tmp_path):
    problems = [Problem("a", "Q?", "1", "Step 1\n\nStep 2", {"src": "x"}), Problem("b", "R?", "2")]
    write_problems(tmp_path / "p.jsonl", problems)
    assert load_problems(tmp_path / "p.jsonl") == problems


def test_a_gold_list_means_alternatives_in_the_file_and_in_the_verifier(tmp_path):
    """One rule for lists (``core.answers.normalize_gold``): a one-element list is unwrapped, a
    longer one is a tuple of acceptable answers that survives a write/load round trip and
    that the verifier accepts any member of."""
    from hs_star_pl.verifiers import ExactMatchVerifier

    f = write_lines(tmp_path / "alt.jsonl", [json.dumps({"id": "a", "question": "Q", "answer": ["$\\frac{1}{2}$", "0.5"]})])
    (p,) = load_problems(f)
    assert p.answer == ("\\frac{1}{2}", "0.5")
    assert normalize_gold(["$5$"]) == "5" and normalize_gold(("3", "3")) == "3"
    assert ExactMatchVerifier().verify(["\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{2}"], [p.answer] * 3) == [True, True, False]
    write_problems(tmp_path / "back.jsonl", [p])
    assert load_problems(tmp_path / "back.jsonl") == [p]
    assert Problem.from_dict(p.to_dict()) == p
    assert content_id("Q", ("1", "2")) != content_id("Q", "1, 2")


def test_a_small_float_gold_is_kept_in_positional_notation_so_exact_match_can_match_it(tmp_path):
    """JSON ``1e-07`` used to be stored as the text '1e-07', which no decimal answer equals."""
    from hs_star_pl.verifiers import ExactMatchVerifier

    path = write_lines(tmp_path / "small.jsonl", ['{"id": "a", "question": "Q", "answer": 1e-07}',
                                                  '{"id": "b", "question": "Q", "answer": -2.5e-05}'])
    assert [p.answer for p in load_problems(path)] == ["0.0000001", "-0.000025"]
    verdicts = ExactMatchVerifier().verify(["\\boxed{0.0000001}", "\\boxed{-0.000025}"], [p.answer for p in load_problems(path)])
    assert verdicts == [True, True]


def test_gold_from_the_last_box_of_a_solution_and_line_ids(tmp_path):
    f = write_lines(tmp_path / "minerva.jsonl", [
        json.dumps({"problem": "P", "solution": "First $\\boxed{3}$, then $s=\\boxed{1.6} \\mathrm{~cm}$"}),
        json.dumps({"problem": "P", "solution": "the same question again, no box"}),
    ])
    with pytest.raises(ProblemFileError, match=r"minerva.jsonl:2: field 'solution': no \\boxed\{\} answer in it"):
        load_problems(f, answer_key="solution", answer_from="boxed", default_id="line")
    (p,) = load_problems(write_lines(tmp_path / "one.jsonl", [f.read_text().splitlines()[0]]), answer_key="solution",
                         answer_from="boxed", default_id="line")
    assert (p.id, p.answer, p.solution.startswith("First")) == ("line-1", "1.6", True)


def test_a_list_of_solutions_keeps_the_first(tmp_path):
    f = write_lines(tmp_path / "ob.jsonl", [json.dumps({"id": 1, "question": "Q", "final_answer": ["$2$"], "solution": ["A.", "B."]})])
    assert load_problems(f)[0].solution == "A."


BAD_ROWS = [
    ("not json", [b'{"question": "Q", "answer": "1"}', b"{oops"], 2, "invalid JSON"),
    ("array row", [b'["Q", "1"]'], 1, "expected a JSON object"),
    ("no question", [b'{"answer": "1"}'], 1, "no question field"),
    ("no answer", [b'{"question": "Q"}'], 1, "no answer field"),
    ("question not str", [b'{"question": 5, "answer": "1"}'], 1, "must be a non-empty string"),
    ("empty question", [b'{"question": "  ", "answer": "1"}'], 1, "must be a non-empty string"),
    ("answer is null", [b'{"question": "Q", "answer": null}'], 1, "field 'answer'"),
    ("answer is bool", [b'{"question": "Q", "answer": true}'], 1, "field 'answer'"),
    ("answer is dict", [b'{"question": "Q", "answer": {"x": 1}}'], 1, "field 'answer'"),
    ("empty answer", [b'{"question": "Q", "answer": ""}'], 1, "the answer is empty"),
    ("empty answer list", [b'{"question": "Q", "answer": []}'], 1, "the answer list is empty"),
    ("nan answer", [b'{"question": "Q", "answer": NaN}'], 1, "not a finite number"),
    ("bad id type", [b'{"question": "Q", "answer": "1", "id": [1]}'], 1, "field 'id'"),
    ("non-utf8", [b'{"question": "Q", "answer": "1"}', b'{"question": "\xff\xfe", "answer": "1"}'], 2, "not valid UTF-8"),
    ("solution not str", [b'{"question": "Q", "answer": "1", "solution": 3}'], 1, "field 'solution'"),
    # golds that name a shape but do not have it used to be kept whole as the gold, graded wrong
    ("nothing after ####", [b'{"question": "Q", "answer": "3 + 4 = 7\\n####"}'], 1, "the answer is empty"),
    ("unclosed box", [b'{"question": "Q", "answer": "so \\\\boxed{7"}'], 1,
     "field 'answer': a \\boxed{} that is not closed or holds nothing; write the answer itself, or close the box"),
    ("worked solution as gold", [b'{"question": "Q", "answer": "3 + 4 = 7.\\nSo she has 7 eggs."}'], 1,
     "field 'answer': the answer spans 2 lines, so it looks like a worked solution rather than an answer: end it "
     "with '#### <answer>' (GSM8K's shape) or a \\boxed{<answer>} and read it with answer_from: boxed, or name the "
     "field that holds the answer (answer_key)"),
]


@pytest.mark.parametrize("name, lines, lineno, message", BAD_ROWS, ids=[r[0] for r in BAD_ROWS])
def test_malformed_rows_name_file_and_line(tmp_path, name, lines, lineno, message):
    f = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ProblemFileError) as info:
        load_problems(f)
    assert str(info.value).startswith(f"{f}:{lineno}: ")
    assert message in str(info.value)
    assert info.value.line == lineno


def test_duplicate_ids_name_both_lines(tmp_path):
    f = write_lines(
        tmp_path / "dup.jsonl",
        [json.dumps({"id": "a", "question": "Q", "answer": "1"}), "", json.dumps({"id": "a", "question": "R", "answer": "2"})],
    )
    with pytest.raises(ProblemFileError, match=r"dup.jsonl:3: duplicate problem id 'a' \(first seen on line 1\)"):
        load_problems(f)


def test_duplicate_content_without_ids_is_a_duplicate(tmp_path):
    row = json.dumps({"question": "Q", "answer": "1"})
    with pytest.raises(ProblemFileError, match="duplicate problem id"):
        load_problems(write_lines(tmp_path / "d.jsonl", [row, row]))


def test_empty_missing_and_oversized_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ProblemFileError, match="holds no problems"):
        load_problems(tmp_path / "empty.jsonl")
    with pytest.raises(ProblemFileError, match="no such problem file"):
        load_problems(tmp_path / "missing.jsonl")
    big = json.dumps({"question": "Q" * 5000, "answer": "1"})
    with pytest.raises(ProblemFileError, match=r"big.jsonl:1: line is \d+ bytes, over the 1000-byte limit"):
        load_problems(write_lines(tmp_path / "big.jsonl", [big]), max_line_bytes=1000)


def make_pool(n: int) -> tuple[Problem, ...]:
    return tuple(Problem(f"p{i:03d}", f"Q{i}", str(i)) for i in range(n))


@pytest.mark.parametrize("reader", ["problems", "examples"])
def test_an_over_long_line_is_refused_while_it_is_read_without_holding_it(tmp_path, reader):
    """A 64 MiB line: refused at the 4 MiB limit with its full size, and memory stays far below
    the line (it used to be read whole first: a 300 MB line cost about 620 MB)."""
    import tracemalloc

    from hs_star_pl.core.problems import MAX_LINE_BYTES
    from hs_star_pl.infra.errors import InputFileError
    from hs_star_pl.training.data import load_examples

    size = 64 * 1024 * 1024
    path = tmp_path / "big.jsonl"
    first = b'{"question": "Q", "answer": "1"}\n' if reader == "problems" else b'{"prompt": "p", "response": "r"}\n'
    with path.open("wb") as fh:
        fh.write(first + b'{"question": "Q", "answer": "1", "response": "')
        for _ in range(size // (1 << 20)):
            fh.write(b"x" * (1 << 20))
        fh.write(b'"}\n')
    line = path.stat().st_size - len(first)
    tracemalloc.start()
    try:
        with pytest.raises(InputFileError) as info:
            load_problems(path) if reader == "problems" else load_examples(path, "plain")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value) == f"{path}:2: line is {line} bytes, over the {MAX_LINE_BYTES}-byte limit"
    assert peak < 3 * MAX_LINE_BYTES, peak  # what the limit allows to be read, not the line


def test_pool_draws_disjoint_seeded_subsets():
    pool = ProblemPool(make_pool(30), problems_per_iteration=10, seed=1)
    draws = [[p.id for p in pool.draw(t)] for t in range(3)]
    assert all(len(d) == 10 for d in draws)
    assert len(set().union(*draws)) == 30  # without replacement across iterations
    assert draws == [[p.id for p in pool.draw(t)] for t in range(3)]  # deterministic
    other = ProblemPool(make_pool(30), problems_per_iteration=10, seed=2)
    assert [p.id for p in other.draw(0)] != draws[0]


def test_pool_exhaustion_errors_by_default_and_reshuffles_on_request():
    pool = ProblemPool(make_pool(25), problems_per_iteration=10, seed=0)
    pool.draw(1)
    with pytest.raises(ValueError, match="iteration 2 needs 30 distinct ones.*on_exhausted: reshuffle"):
        pool.draw(2)
    reshuffle = ProblemPool(make_pool(25), problems_per_iteration=10, seed=0, on_exhausted="reshuffle")
    previous = None
    for t in range(8):
        ids = {p.id for p in reshuffle.draw(t)}
        assert len(ids) == 10
        if previous is not None:
            assert not ids & previous, f"iteration {t} repeats iteration {t - 1}"
        previous = ids


def test_reshuffle_refuses_a_pool_too_small_to_avoid_repeating_the_last_iteration():
    """15 problems, 10 per iteration: iteration 1 can find only 5 that iteration 0 did not
    use, so it refuses instead of repeating 5 problems (and the error mode does not suggest
    a reshuffle that could not help)."""
    reshuffle = ProblemPool(make_pool(15), problems_per_iteration=10, seed=0, on_exhausted="reshuffle")
    assert len(reshuffle.draw(0)) == 10
    with pytest.raises(ValueError, match=r"iteration 1 needs 10 that iteration 0 did not use; .*at least "
                                         r"2 x self_training.problems_per_iteration = 20 problems"):
        reshuffle.draw(1)
    with pytest.raises(ValueError, match=r"fewer self_training.problems_per_iteration \(self_training.on_exhausted: "
                                         r"reshuffle would need 20 problems\)"):
        ProblemPool(make_pool(15), problems_per_iteration=10).draw(1)
    exact = ProblemPool(make_pool(20), problems_per_iteration=10, on_exhausted="reshuffle")
    assert not {p.id for p in exact.draw(2)} & {p.id for p in exact.draw(3)}


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 40), size=st.integers(1, 40), seed=st.integers(0, 10**6), data=st.data())
def test_pool_draw_properties(n, size, seed, data):
    """Any pool size, draw size and seed: draws have the requested size, never repeat a
    problem until the pool runs out (``error``) or the previous iteration (``reshuffle``),
    are deterministic, and do not depend on the order of the problem file."""
    size = min(size, n)
    problems = make_pool(n)
    shuffled = tuple(data.draw(st.permutations(problems)))
    strict = ProblemPool(problems, size, seed)
    last = n // size - 1  # the last iteration the pool can serve without repeats
    draws = [[p.id for p in strict.draw(t)] for t in range(last + 1)]
    assert all(len(d) == len(set(d)) == size for d in draws)
    assert len({i for d in draws for i in d}) == size * len(draws)  # without replacement
    assert draws == [[p.id for p in ProblemPool(shuffled, size, seed).draw(t)] for t in range(last + 1)]
    with pytest.raises(ValueError, match="self_training.problems_per_iteration"):
        strict.draw(last + 1)
    again = ProblemPool(problems, size, seed, on_exhausted="reshuffle")
    if n < 2 * size:
        with pytest.raises(ValueError, match="on_exhausted: reshuffle needs a pool of at least"):
            again.draw(last + 1)
        return
    previous: set[str] = set()
    for t in range(last + 4):
        ids = [p.id for p in again.draw(t)]
        assert len(ids) == len(set(ids)) == size and not set(ids) & previous
        previous = set(ids)
        if t <= last:
            assert ids == draws[t]  # reshuffling changes nothing before the pool runs out


def test_pool_without_a_size_uses_everything_and_validates():
    pool = ProblemPool(make_pool(5))
    assert sorted(p.id for p in pool.draw(3)) == [f"p{i:03d}" for i in range(5)]
    with pytest.raises(ValueError, match="self_training.problems_per_iteration must be between 1 and the pool size \\(5\\)"):
        ProblemPool(make_pool(5), problems_per_iteration=6)
