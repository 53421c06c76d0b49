"""Answer extraction, equivalence, ungradeable golds, timeouts and injection safety.

Run: ``PYTHONPATH=$PWD python -m pytest tests/test_verifiers.py -q``. The math-verify tests
share one worker pool per module (about 1 s to start).
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hs_star_pl.core.answers import extract_answer, normalize_answer, normalize_gold
from hs_star_pl.core.protocols import AnswerVerifier
from hs_star_pl.verifiers import ExactMatchVerifier, MathVerifyVerifier, is_correct

TOWER = "\\boxed{" + "9^{" * 12 + "9" + "}" * 12 + "}"


@pytest.fixture(scope="module")
def mv():
    with MathVerifyVerifier(n_workers=2, timeout_s=20.0) as verifier:
        yield verifier


# ---------------------------------------------------------------- extraction (pure)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{3}, then corrected: \\boxed{4}", "4"),
        ("nested \\boxed{\\frac{\\sqrt{2}}{2}} done", "\\frac{\\sqrt{2}}{2}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5.", "5"),
        ("The answer is $\\frac{1}{2}$.\nThanks", "\\frac{1}{2}"),
        ("the final answer is: 12.", "12"),
        ("Work...\nAnswer: (1, 2)", "(1, 2)"),
        ("blah\n#### 1,234", "1,234"),
        ("unclosed \\boxed{12 but The answer is 7.", "7"),
        ("Step 1: 12 + 7 = 19\n\nThe answer is \\boxed{52}.", "52"),
        ("no final answer here", None),
        ("", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    ("gold", "expected"),
    [
        ("42", ("42",)),
        ("$\\frac{1}{2}$", ("\\frac{1}{2}",)),
        ("\\boxed{\\pi}", ("\\pi",)),
        ("She has 3 + 4 = 7 apples.\n#### 1,234", ("1234",)),
        (27.0, ("27",)),
        ("27.0", ("27",)),
        (0.25, ("0.25",)),
        (12, ("12",)),
        (["$3$", "three", ""], ("3", "three")),
        ("", None),
        ("   ", None),
        ("$$", None),
        (float("nan"), None),
    ],
)
def test_normalize_gold(gold, expected):
    assert normalize_gold(gold) == expected


@given(st.integers(min_value=-10**9, max_value=10**9))
@settings(max_examples=50, deadline=None)
def test_exact_match_boxed_integers_roundtrip(n):
    v = ExactMatchVerifier()
    assert extract_answer(f"text \\boxed{{{n}}}.") == str(n)
    assert v.verify([f"so \\boxed{{{n}}}"], [float(n)]) == [True]
    assert v.verify([f"so \\boxed{{{n + 1}}}"], [str(n)]) == [False]


def test_normalize_answer_numbers_and_wrappers():
    assert normalize_answer("27.0") == normalize_answer("27") == normalize_answer("\\frac{54}{2}") == "27"
    assert normalize_answer("0.5") == normalize_answer("1/2") == "1/2"
    assert normalize_answer("\\text{ Evelyn }") == normalize_answer("evelyn")
    assert normalize_answer("1,234") == "1234"


def test_exact_match_verifier_outcomes():
    v = ExactMatchVerifier()
    assert isinstance(v, AnswerVerifier)
    with pytest.warns(UserWarning, match="ungradeable"):
        out = v.verify(["\\boxed{52}", "The answer is 51.", "no answer", "\\boxed{1}"], ["52", "52", "52", "$$"])
    assert out == [True, False, False, None]
    assert v.check_golds(["52", "", 3.0]) == [True, False, True]
    with pytest.raises(ValueError, match="responses"):
        v.verify(["a"], [])


# ---------------------------------------------------------------- math-verify equivalence


EQUIVALENT = [
    ("\\boxed{27}", "27.0"),
    ("\\boxed{27.0}", 27.0),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "$\\sqrt{2}/2$"),
    ("\\boxed{1234}", "Natalia ... #### 1,234"),
    ("The answer is 1,234.", "1234"),
    ("\\boxed{(1, 2)}", "(1,2)"),
    ("\\boxed{[0, 1)}", "[0,1)"),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}"),
    ("\\boxed{50\\%}", "0.5"),
    ("\\boxed{50\\%}", "50"),
    ("\\boxed{\\frac{3}{4}}", "75\\%"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{-3, 3}", "3, -3"),
    ("\\boxed{0.5}", ["\\frac{1}{3}", "1/2"]),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}"),
]

DIFFERENT = [
    ("\\boxed{28}", "27"),
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("\\boxed{(1, 2]}", "(1,2)"),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{1,2\\}"),
    ("\\boxed{banana}", "5"),
    ("\\boxed{60\\%}", "0.5"),
    ("I could not solve it.", "5"),
]


def test_math_verify_equivalent_forms(mv):
    responses, golds = zip(*EQUIVALENT)
    assert mv.verify(list(responses), list(golds)) == [True] * len(EQUIVALENT)


def test_math_verify_different_answers(mv):
    responses, golds = zip(*DIFFERENT)
    assert mv.verify(list(responses), list(golds)) == [False] * len(DIFFERENT)


def test_unparseable_gold_is_ungradeable_with_a_warning(mv):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = mv.verify(["\\boxed{5}", "\\boxed{5}", "\\boxed{5}"], ["$$", "", "5"])
    assert out == [None, None, True]
    messages = [str(w.message) for w in caught]
    assert any("'$$'" in m and "ungradeable" in m for m in messages)
    assert mv.check_golds(["5", "$$", "", "\\frac{1}{2}", ["", "7"]]) == [True, False, False, True, True]


def test_cache_counts_repeated_pairs_and_keeps_results(mv):
    mv.clear_cache()
    responses = ["\\boxed{\\frac{2}{4}}", "\\boxed{3}"] * 5
    golds = ["0.5", "4"] * 5
    first = mv.verify(responses, golds)
    stats = mv.cache_stats
    assert first == [True, False] * 5
    assert (stats.misses, stats.hits, stats.size) == (2, 8, 2)
    assert mv.verify(responses, golds) == first
    assert mv.cache_stats.hits == 18


def test_progress_bar_counts_the_checks_sent_to_the_workers(mv, capsys, monkeypatch):
    """A bar from PROGRESS_MIN_CHECKS distinct checks on (lowered to 3 here), counting each
    check when its worker answers; cache hits do not count; ``progress=False`` silences it."""
    import hs_star_pl.verifiers as verifiers

    monkeypatch.setattr(verifiers, "PROGRESS_MIN_CHECKS", 3)
    mv.clear_cache()
    assert mv.verify(["\\boxed{1}", "\\boxed{2}"], ["1", "1"]) == [True, False]
    assert "answer checks" not in capsys.readouterr().err
    assert mv.verify(["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"] * 2, ["3"] * 6) == [False, False, True] * 2
    err = capsys.readouterr().err
    assert "answer checks: 100%" in err and "3/3" in err  # 3 distinct checks, 3 cache hits
    mv.progress = False
    try:
        mv.clear_cache()
        mv.verify(["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"], ["3"] * 3)
        assert "answer checks" not in capsys.readouterr().err
    finally:
        mv.progress = True


def test_no_answer_is_wrong_without_a_worker_call(mv):
    mv.clear_cache()
    assert mv.verify(["I think it is five"], ["5"]) == [False]
    assert mv.cache_stats.misses == 0


def test_constructor_validation_names_the_key():
    with pytest.raises(ValueError, match=r"verifier\.n_workers.*verifier\.timeout_s"):
        MathVerifyVerifier(n_workers=0, timeout_s=0)
    with pytest.raises(ValueError, match=r"verifier\.start_method"):
        MathVerifyVerifier(start_method="fork")


def test_is_correct_entry_point():
    assert is_correct("Hence \\boxed{\\dfrac{1}{2}}.", "0.5") is True
    assert is_correct("Hence \\boxed{3}.", "0.5") is False
    with pytest.warns(UserWarning, match="ungradeable"):
        assert is_correct("Hence \\boxed{3}.", "") is None


# ---------------------------------------------------------------- timeouts and safety


def test_pathological_input_times_out_and_the_pool_recovers():
    """A tower of exponents hangs sympy; the check is killed at ~1 s and is ungradeable."""
    with MathVerifyVerifier(n_workers=2, timeout_s=1.0) as v:
        assert v.verify(["\\boxed{1}"], ["1"]) == [True]  # workers started and warm
        t0 = time.monotonic()
        out = v.verify([TOWER, "\\boxed{2}", "\\boxed{3}"], ["5", "2", "4"])
        elapsed = time.monotonic() - t0
        assert out == [None, True, False]  # the other results of the batch survive
        assert elapsed < 4.0
        assert v.n_timeouts == 1
        # the killed worker was replaced: the pool keeps working
        assert v.verify(["\\boxed{\\frac{1}{2}}", "\\boxed{7}"], ["0.5", "7"]) == [True, True]
        # the timeout is cached: the same pathological pair does not cost another second
        t0 = time.monotonic()
        assert v.verify([TOWER], ["5"]) == [None]
        assert time.monotonic() - t0 < 1.0


INJECTIONS = [
    "\\boxed{__import__('os').system('touch {canary}')}",
    "The answer is __import__(\"os\").system(\"touch {canary}\")",
    "\\boxed{eval(\"__import__('os').system('touch {canary}')\")}",
    "\\boxed{exec('import os; os.system(\"touch {canary}\")')}",
    "Answer: (lambda: __import__('subprocess').call(['touch', '{canary}']))()",
]


@pytest.mark.parametrize("verifier_cls", [ExactMatchVerifier, MathVerifyVerifier])
def test_code_injection_in_a_response_does_not_execute(tmp_path, monkeypatch, verifier_cls):
    monkeypatch.chdir(tmp_path)
    canary = tmp_path / "CANARY"
    responses = [t.replace("{canary}", str(canary)) for t in INJECTIONS]
    responses += [t.replace("{canary}", "CANARY") for t in INJECTIONS]
    verifier = verifier_cls() if verifier_cls is ExactMatchVerifier else verifier_cls(n_workers=1, timeout_s=10)
    try:
        out = verifier.verify(responses, ["0"] * len(responses))
    finally:
        if hasattr(verifier, "close"):
            verifier.close()
    assert not canary.exists()
    assert all(r is not True for r in out)


def test_verifiers_module_does_not_import_torch():
    code = "import sys, hs_star_pl.verifiers; sys.exit('torch' in sys.modules or 'lightning' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def test_verify_from_a_worker_thread(mv):
    """math-verify's own signal timeouts fail off the main thread; our process pool does not."""
    import threading

    out: list = []
    thread = threading.Thread(target=lambda: out.append(mv.verify(["\\boxed{\\frac{3}{6}}"], ["0.5"])))
    thread.start()
    thread.join(timeout=60)
    assert out == [[True]]


def test_a_worker_that_dies_mid_check_loses_only_its_check():
    """Kill the worker busy on a hanging check from outside: that check is ungradeable."""
    import threading

    with MathVerifyVerifier(n_workers=1, timeout_s=30.0) as v:
        assert v.verify(["\\boxed{1}"], ["1"]) == [True]
        worker = v._pool._workers[0].process
        threading.Timer(0.5, worker.kill).start()
        t0 = time.monotonic()
        assert v.verify([TOWER, "\\boxed{2}"], ["5", "2"]) == [None, True]
        assert time.monotonic() - t0 < 15.0
        assert v.n_failures == 1


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs Linux /proc")
def test_workers_run_under_the_memory_limit():
    with MathVerifyVerifier(n_workers=1, memory_limit_mb=1536) as v:
        v.verify(["\\boxed{1}"], ["1"])
        limits = Path(f"/proc/{v._pool._workers[0].process.pid}/limits").read_text()
    line = next(row for row in limits.splitlines() if row.startswith("Max address space"))
    assert str(1536 * 1024 * 1024) in line


@pytest.mark.parametrize(
    "hostile",
    ["\\boxed{" * 100_000, "}" * 50_000 + "\\boxed{1}", "\\boxed " * 50_000, "{" * 50_000 + "\\boxed{7}"],
)
def test_extraction_stays_linear_on_hostile_text(hostile):
    """These took minutes with a scan per ``\\boxed``; a regression makes this test crawl."""
    answer = extract_answer(hostile)
    assert answer in (None, "1", "7")


def test_workers_that_cannot_start_raise_instead_of_respawning_forever():
    v = MathVerifyVerifier(n_workers=1, memory_limit_mb=60)  # too small to import sympy
    with pytest.raises(RuntimeError, match=r"verifier\.memory_limit_mb=60"):
        v.verify(["\\boxed{1}"], ["1"])
    v.close()


LIMITED_IMPORT = """
import resource
if resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
    raise ImportError("Unsupported ANTLR version , only 4.9.3 runtime versions are supported.")
"""


def test_an_import_broken_only_by_the_memory_limit_names_the_limit(tmp_path, monkeypatch):
    """Under a tight RLIMIT_AS some packages fail their import with a misleading ImportError
    (antlr4 reports an empty version) instead of a MemoryError; the pool must still blame the limit."""
    from hs_star_pl.infra.workers import KillablePool

    (tmp_path / "limited_import_probe.py").write_text(LIMITED_IMPORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    pool = KillablePool(_echo_task, n_workers=1, timeout_s=30, memory_limit_mb=4000,
                        warm_imports=("limited_import_probe",), import_hint="probe needs a package",
                        config_key="verifier")
    with pytest.raises(RuntimeError, match=r"verifier\.memory_limit_mb=4000 is likely too low"):
        pool.run([("echo", 1)])
    pool.close()
    missing = KillablePool(_echo_task, n_workers=1, timeout_s=30, memory_limit_mb=4000,
                           warm_imports=("no_such_module_anywhere",), import_hint="install it")
    with pytest.raises(ImportError, match="install it"):
        missing.run([("echo", 1)])
    missing.close()


def _echo_task(kind, payload):
    return payload


def test_workers_stuck_while_starting_are_killed_and_then_refused_not_waited_for(tmp_path, monkeypatch):
    """A worker whose imports never return never says "ready", so no task (and no task
    deadline) ever reaches it: without a start deadline ``run`` would wait forever. It is
    killed after ``start_timeout_s`` and, stuck three times in a row, the run stops naming it."""
    from hs_star_pl.infra.workers import KillablePool

    (tmp_path / "hanging_import_probe.py").write_text("import time\nwhile True:\n    time.sleep(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pool = KillablePool(_echo_task, n_workers=1, timeout_s=30, warm_imports=("hanging_import_probe",),
                        config_key="verifier", start_timeout_s=2.0)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"verifier worker processes failed to start 3 times in a row \(the last "
                                           r"was not ready within 2 s\); their imports \(hanging_import_probe\) may hang"):
        pool.run([("echo", 1)])
    assert time.monotonic() - started < 60  # three 2 s deadlines, not a hang
    assert not [w for w in pool._workers if w.process.is_alive()]
    pool.close()
    (tmp_path / "dying_import_probe.py").write_text("import os\nos._exit(3)\n")  # dies instead: a crash at start
    dying = KillablePool(_echo_task, n_workers=1, timeout_s=30, warm_imports=("dying_import_probe",), config_key="verifier")
    with pytest.raises(RuntimeError, match=r"verifier worker processes failed to start 3 times in a row \(the last "
                                           r"died\); their imports \(dying_import_probe\) may hang, or the main script"):
        dying.run([("echo", 1)])
    dying.close()
    (tmp_path / "hanging_import_probe.py").write_text("")  # imports fine now: the same pool starts again
    monkeypatch.delitem(sys.modules, "hanging_import_probe", raising=False)
    assert pool.run([("echo", 7)]) == [7]
    pool.close()


def test_bad_gold_is_ungradeable_even_without_a_response_answer(mv):
    with pytest.warns(UserWarning, match="ungradeable"):
        assert mv.verify(["no final answer", "no final answer"], ["$$", "4"]) == [None, False]
    with pytest.warns(UserWarning, match="ungradeable"):
        assert ExactMatchVerifier().verify(["no final answer"], ["$$"]) == [None]


# ---------------------------------------------------------------- cache bounds, hanging golds, dropped problems


def test_cache_is_a_bounded_lru_and_size_zero_shares_nothing():
    with MathVerifyVerifier(n_workers=1, cache_size=2) as v:
        pairs = [("\\boxed{1}", "1"), ("\\boxed{2}", "2"), ("\\boxed{3}", "4")]
        assert v.verify(*map(list, zip(*pairs))) == [True, True, False]
        assert (v.cache_stats.size, v.cache_stats.misses) == (2, 3)
        assert v.verify(["\\boxed{3}"], ["4"]) == [False] and v.cache_stats.hits == 1  # newest kept
        assert v.verify(["\\boxed{1}"], ["1"]) == [True] and v.cache_stats.misses == 4  # oldest evicted
    with MathVerifyVerifier(n_workers=1, cache_size=0) as v:
        assert v.verify(["\\boxed{1}"] * 3, ["1"] * 3) == [True] * 3
        assert v.verify(["\\boxed{1}"], ["1"]) == [True]
        assert (v.cache_stats.hits, v.cache_stats.misses, v.cache_stats.size) == (0, 4, 0)


NESTED_SQRT = "\\sqrt{" * 3000 + "2" + "}" * 3000  # math-verify takes about 13 s to parse this (idle core)


def test_a_gold_whose_parse_hangs_is_ungradeable_within_its_timeout():
    with MathVerifyVerifier(n_workers=1, timeout_s=1.0) as v:
        assert v.verify(["\\boxed{1}"], ["1"]) == [True]  # worker warm before the clock starts
        t0 = time.monotonic()
        assert v.check_golds([NESTED_SQRT, "5"]) == [False, True]
        assert time.monotonic() - t0 < 1.0 + 2.0
        assert v.n_timeouts == 1
        with pytest.warns(UserWarning, match=r"gold answer '\\\\sqrt\{.*ungradeable"):
            assert v.verify(["\\boxed{2}", "\\boxed{5}"], [NESTED_SQRT, "5"]) == [None, True]
        assert v.n_timeouts == 1  # the verdict on the gold is remembered, not re-timed


@pytest.mark.parametrize("verifier_cls", [ExactMatchVerifier, MathVerifyVerifier])
def test_a_round_drops_problems_with_unparseable_golds_and_names_them(verifier_cls, caplog):
    """What ``run_round`` calls first: the problem is dropped with a warning naming it, so it is
    never silently right or wrong."""
    from hs_star_pl.core.records import Problem
    from hs_star_pl.core.rounds import drop_ungradeable

    problems = [Problem("ok", "q", "42"), Problem("gsm-17", "q", "$$"), Problem("empty", "q", "  ")]
    verifier = verifier_cls() if verifier_cls is ExactMatchVerifier else verifier_cls(n_workers=1)
    try:
        with caplog.at_level("WARNING", logger="hs_star_pl.core.rounds"):
            kept, dropped = drop_ungradeable(problems, verifier)
    finally:
        getattr(verifier, "close", lambda: None)()
    assert [p.id for p in kept] == ["ok"] and dropped == ["gsm-17", "empty"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("problem gsm-17" in m and "'$$'" in m and "dropped" in m for m in messages)
    assert any("problem empty" in m for m in messages)


def test_no_eval_exec_or_sympy_call_in_the_package():
    """Model output reaches sympy only through math-verify: nothing in ``hs_star_pl`` calls
    the builtins ``eval``/``exec``/``compile`` or imports sympy (``sympify``, ``parse_expr``)."""
    import ast

    package = Path(__file__).resolve().parents[1] / "hs_star_pl"
    offences = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec", "compile", "__import__"):
                offences.append(f"{path.name}:{node.lineno}: {node.func.id}()")
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
            if any(n.split(".")[0] == "sympy" or n in ("sympify", "parse_expr") for n in [module, *names]):
                offences.append(f"{path.name}:{node.lineno}: imports {module or names}")
    assert offences == []
