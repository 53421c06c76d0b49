"""The synthetic task: determinism, difficulty control, gold answers correct by construction."""

from __future__ import annotations

import pytest

from hs_star_pl.core.problems import load_problems
from hs_star_pl.core.steps import split_steps
from hs_star_pl.tasks.arithmetic import (
    ArithmeticTaskConfig,
    apply,
    generate_problems,
    make_problem,
    parse_question,
    write_split,
)


def test_worked_example():
    p = make_problem(12, [("add", 7), ("multiply", 3), ("subtract", 5)])
    assert p.question == "Start with 12. Add 7. Multiply by 3. Subtract 5. What is the result?"
    assert p.solution == "Step 1: 12 + 7 = 19\n\nStep 2: 19 * 3 = 57\n\nStep 3: 57 - 5 = 52\n\nThe answer is \\boxed{52}."
    assert p.answer == "52" and p.metadata["n_steps"] == 3 and p.id == "arith-12-a7-m3-s5"


def recompute(question: str) -> int:
    start, steps = parse_question(question)
    value = start
    for op, operand in steps:
        value = apply(op, value, operand)
    return value


def test_gold_answers_and_solutions_are_consistent_by_construction():
    cfg = ArithmeticTaskConfig(operations=("add", "subtract", "multiply", "divide"))
    for p in generate_problems(300, seed=4, config=cfg):
        assert int(p.answer) == recompute(p.question)
        steps = split_steps(p.solution)
        assert len(steps) == p.metadata["n_steps"] + 1
        assert steps[-1] == f"The answer is \\boxed{{{p.answer}}}."


def test_difficulty_knobs_are_respected():
    cfg = ArithmeticTaskConfig(min_steps=3, max_steps=4, max_start=9, max_addend=5, max_multiplier=3, max_value=50)
    problems = generate_problems(200, seed=1, config=cfg)
    assert {p.metadata["n_steps"] for p in problems} == {3, 4}
    for p in problems:
        start, steps = parse_question(p.question)
        assert 0 <= start <= 9
        value = start
        for op, operand in steps:
            assert (1 <= operand <= 5) if op in ("add", "subtract") else (2 <= operand <= 3)
            value = apply(op, value, operand)
            assert 0 <= value <= 50


def test_generation_is_seeded_distinct_and_test_is_disjoint(tmp_path):
    a, b = generate_problems(100, seed=7), generate_problems(100, seed=7)
    assert a == b and a != generate_problems(100, seed=8)
    assert len({p.question for p in a}) == 100
    train_path, test_path = write_split(tmp_path, 200, 50, seed=3)
    train, test = load_problems(train_path), load_problems(test_path)
    assert len(train) == 200 and len(test) == 50
    assert not {p.question for p in train} & {p.question for p in test}
    assert train == generate_problems(200, seed=3)  # files load back unchanged


def test_too_small_a_space_and_bad_knobs_are_errors():
    tiny = ArithmeticTaskConfig(min_steps=1, max_steps=1, max_start=0, max_addend=1, max_multiplier=2, max_value=4, operations=("add",))
    with pytest.raises(ValueError, match="too few distinct problems"):
        generate_problems(5, config=tiny)
    with pytest.raises(ValueError, match="task.operations"):
        ArithmeticTaskConfig(operations=("power",))
    with pytest.raises(ValueError, match="task.min_steps/max_steps"):
        ArithmeticTaskConfig(min_steps=4, max_steps=2)


def test_shipped_demo_data_is_what_the_generator_writes(tmp_path):
    """data/tiny/*.jsonl must be regenerable byte for byte: python -m hs_star_pl.tasks.tiny_demo --out data/tiny."""
    from pathlib import Path

    from hs_star_pl.tasks import tiny_demo

    shipped = Path(__file__).parents[1] / "data" / "tiny"
    written = tiny_demo.write(tmp_path)
    assert set(written) == {"sft", "pool", "dev", "test"}
    for name, path in written.items():
        assert (shipped / f"{name}.jsonl").read_bytes() == path.read_bytes(), name
        assert len(load_problems(path)) == tiny_demo.SIZES[name], name


def test_demo_splits_are_disjoint_and_avoid_the_first_test_set():
    """Dev and test share no question with each other, the SFT set, the pool, or the first
    (tuned-on, no longer shipped) test set."""
    from hs_star_pl.tasks import tiny_demo

    built = tiny_demo.build()
    questions = {name: {p.question for p in problems} for name, problems in built.items()}
    names = list(questions)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not questions[a] & questions[b], (a, b)
    first_test = {p.question for p in tiny_demo.first_draws()[2]}
    assert len(first_test) == tiny_demo.FIRST_TEST_SIZE
    assert not first_test & (questions["dev"] | questions["test"])


def test_shipped_study_data_is_what_the_generator_writes(tmp_path):
    """data/tiny/spread/*.jsonl: python -m hs_star_pl.tasks.tiny_demo --study, byte for byte."""
    from pathlib import Path

    from hs_star_pl.tasks import tiny_demo

    shipped = Path(__file__).parents[1] / "data" / "tiny" / "spread"
    written = tiny_demo.write(tmp_path, study=True)
    assert set(written) == {"sft_stage2", "pool", "dev", "test"}
    for name, path in written.items():
        assert (shipped / f"{name}.jsonl").read_bytes() == path.read_bytes(), name
        assert len(load_problems(path)) == tiny_demo.STUDY_SIZES[name], name


def test_study_files_are_disjoint_from_each_other_and_from_every_demo_file():
    import re

    from hs_star_pl.tasks import tiny_demo
    from hs_star_pl.tasks.arithmetic import parse_question

    study = tiny_demo.build_study()
    demo = tiny_demo.build()
    demo_questions = {p.question for problems in demo.values() for p in problems}
    demo_questions |= {p.question for p in tiny_demo.first_draws()[2]}
    names = list(study)
    for i, a in enumerate(names):
        qa = {p.question for p in study[a]}
        assert not qa & demo_questions, a
        for b in names[i + 1 :]:
            assert not qa & {p.question for p in study[b]}, (a, b)
    # pool, dev and test are one mixture: about a fifth of each reaches past 60 or uses +/- above 10
    for name in ("pool", "dev", "test"):
        beyond = 0
        for p in study[name]:
            start, steps = parse_question(p.question)
            values = [start] + [int(v) for v in re.findall(r"= (\d+)", p.solution)]
            out_of_reach = max(values) > 60 or any(op in ("add", "subtract") and n > 10 for op, n in steps)
            beyond += out_of_reach
            # each problem names the component it came from; only the wider one reaches past it
            assert p.metadata["family"] in ("reach", "beyond") and not (out_of_reach and p.metadata["family"] == "reach")
        assert 0.1 < beyond / len(study[name]) <= tiny_demo.STUDY_BEYOND_SHARE + 0.05, (name, beyond)
        tagged = sum(p.metadata["family"] == "beyond" for p in study[name])
        assert beyond <= tagged <= tiny_demo.STUDY_BEYOND_SHARE * len(study[name]) * 1.15, (name, tagged)


def test_shipped_u_pool_is_what_the_generator_writes_and_is_disjoint_from_every_other_file(tmp_path):
    """data/tiny/u_pool/*.jsonl: python -m hs_star_pl.tasks.tiny_demo --u-pool, byte for byte;
    disjoint by question from each other, the demo's and the study's files; every problem
    tagged with its component, and each component near its share."""
    from pathlib import Path

    from hs_star_pl.tasks import tiny_demo

    shipped = Path(__file__).parents[1] / "data" / "tiny" / "u_pool"
    written = tiny_demo.write(tmp_path, u_pool=True)
    assert set(written) == {"pool", "dev", "test"}
    for name, path in written.items():
        assert (shipped / f"{name}.jsonl").read_bytes() == path.read_bytes(), name
    u = {name: load_problems(path) for name, path in written.items()}
    others = {p.question for problems in tiny_demo.build().values() for p in problems}
    others |= {p.question for problems in tiny_demo.build_study().values() for p in problems}
    others |= {p.question for p in tiny_demo.first_draws()[2]}
    seen: set[str] = set()
    for name, problems in u.items():
        questions = {p.question for p in problems}
        assert len(questions) == len(problems) == tiny_demo.U_SIZES[name]
        assert not questions & others and not questions & seen, name
        seen |= questions
        for family, (config, share) in tiny_demo.U_COMPONENTS.items():
            mine = [p for p in problems if p.metadata["family"] == family]
            assert abs(len(mine) / len(problems) - share) < 0.05, (name, family)
            assert all(config.min_steps <= p.metadata["n_steps"] <= config.max_steps for p in mine), (name, family)
