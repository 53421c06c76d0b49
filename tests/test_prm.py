"""PRMs: the rule-based arithmetic checker, the outcome scorer, and the two HF formats.

The HF PRMs run on tiny random models saved in each checkpoint layout (no real weights
exist here), so these tests check the plumbing: one score per step, separator positions,
padding, truncation and loading. Run: ``PYTHONPATH=$PWD python -m pytest tests/test_prm.py -q``.
"""

from __future__ import annotations

import gc
import importlib
import os
import shutil
import weakref

import pytest
import torch

from hs_star_pl.core.protocols import ProcessRewardModel, StepScoringRequest
from hs_star_pl.core.steps import split_steps
from hs_star_pl.prm import ArithmeticPRM, OutcomePRM, QwenMathPRM, SkyworkPRM, shard
from hs_star_pl.prm.hf import build_tiny_prm_dir, fit_to_length

# These requests hold steps only (no raw response), which SkyworkPRM's reference mode scores
# step by step and says so once per instance; that warning is tested where it is the subject
# (tests/test_prm_reference_inputs.py), not repeated here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:SkyworkPRM\\(input_mode='reference'\\) got a StepScoringRequest without:UserWarning"
)

Q = "Start with 12. Add 7. Multiply by 3. Subtract 5. What is the result?"
GOOD = "Step 1: 12 + 7 = 19\n\nStep 2: 19 * 3 = 57\n\nStep 3: 57 - 5 = 52\n\nThe answer is \\boxed{52}."


def arith(question: str, response: str, **kwargs) -> list[float]:
    return ArithmeticPRM(**kwargs).score([StepScoringRequest(question, tuple(split_steps(response)))])[0]


# ---------------------------------------------------------------- ArithmeticPRM


def test_arithmetic_correct_solution_scores_one_everywhere():
    assert arith(Q, GOOD) == [1.0, 1.0, 1.0, 1.0]


def test_arithmetic_error_fails_its_step_and_propagates():
    """19 * 3 is 57, not 56; later steps continue from the wrong value and score 0."""
    bad = GOOD.replace("19 * 3 = 57", "19 * 3 = 56").replace("57 - 5 = 52", "56 - 5 = 51").replace("{52}", "{51}")
    assert arith(Q, bad) == [1.0, 0.0, 0.0, 0.0]
    # without propagation, steps 3 and the answer are judged on their own (both consistent
    # with the wrong chain), but the boxed 51 is not the question's result 52
    assert arith(Q, bad, propagate_errors=False) == [1.0, 0.0, 1.0, 0.0]


def test_arithmetic_chain_break_and_wrong_operation():
    chain_break = GOOD.replace("57 - 5 = 52", "58 - 6 = 52")  # right arithmetic, wrong operand
    assert arith(Q, chain_break) == [1.0, 1.0, 0.0, 0.0]
    wrong_op = GOOD.replace("19 * 3 = 57", "19 + 3 = 22")  # arithmetic fine, not the 2nd operation
    assert arith(Q, wrong_op, propagate_errors=False)[1] == 0.0
    wrong_start = GOOD.replace("12 + 7 = 19", "13 + 6 = 19")
    assert arith(Q, wrong_start)[0] == 0.0
    extra = GOOD.replace("\n\nThe answer", "\n\nStep 4: 52 + 1 = 53\n\nThe answer")
    assert arith(Q, extra)[3] == 0.0  # an operation the question never asked for


def test_arithmetic_unparseable_steps_are_neutral_and_garbage_is_safe():
    response = "Let me think.\n\nStep 1: 12 + 7 =\n\n}{\\boxed{{ ((( 1/0 = \n\nStep 2: 12 + 7 = 19"
    assert arith(Q, response, neutral_score=0.3, propagate_errors=False) == [0.3, 0.3, 0.3, 1.0]  # an unclosed box is not checkable
    assert arith("no parseable question", "just words\n\n\x00\x01 ✓") == [0.5, 0.5]


def test_arithmetic_without_a_parseable_question_checks_arithmetic_and_chain():
    response = "2 × 3 = 6\n\n6 ÷ 4 = 1.5\n\n1.5 x 2 = 3\n\nso \\boxed{3}"
    assert arith("What is it?", response) == [1.0, 1.0, 1.0, 1.0]
    assert arith("What is it?", "7 / 0 = 0") == [0.0]
    assert arith("What is it?", "2 + 2 = 4\n\n\\boxed{5}") == [1.0, 0.0]
    assert arith("What is it?", "\\boxed{five}") == [0.0]
    assert arith(Q, GOOD, use_question=False) == [1.0] * 4


def test_arithmetic_validation():
    with pytest.raises(ValueError, match=r"prm\.neutral_score"):
        ArithmeticPRM(neutral_score=1.5)


def test_outcome_prm():
    prm = OutcomePRM()
    assert isinstance(prm, ProcessRewardModel)
    reqs = [StepScoringRequest("q", ("a", "b"), True), StepScoringRequest("q", ("a",), False),
            StepScoringRequest("q", ("a", "b", "c"), None), StepScoringRequest("q", (), True)]
    assert prm.score(reqs) == [[1.0, 1.0], [0.0], [0.5, 0.5, 0.5], []]
    with pytest.raises(ValueError, match=r"prm\.ungradeable_score"):
        OutcomePRM(ungradeable_score=-0.1)


def test_shard_partitions_requests():
    items = list(range(10))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    with pytest.raises(ValueError):
        shard(items, 3, 3)


def test_class_paths_build_the_named_scorers(tiny_dirs):
    """What a YAML's ``class_path: hs_star_pl.prm.<Name>`` builds scores every step in [0, 1]:
    the rule-based PRM by the arithmetic (a wrong sum scores 0 though the answer is marked
    right), the outcome PRM by the answer check alone, the HF PRMs from their folders."""
    wrong_sum = StepScoringRequest("Start with 2. Add 3.", ("Step 1: 2 + 3 = 6", "The answer is \\boxed{6}."), True)
    wrong_answer = StepScoringRequest("Start with 2. Add 3.", ("Step 1: 2 + 3 = 5", "The answer is \\boxed{5}."), False)
    built = {}
    for name in ("ArithmeticPRM", "OutcomePRM", "SkyworkPRM", "QwenMathPRM"):
        module, _, attr = f"hs_star_pl.prm.{name}".rpartition(".")
        cls = getattr(importlib.import_module(module), attr)
        kind = {"SkyworkPRM": "skywork", "QwenMathPRM": "qwen"}.get(name)
        prm = cls() if kind is None else cls(str(tiny_dirs[kind]), device="cpu", progress=False)
        built[name] = prm.score([wrong_sum, wrong_answer])
        assert [len(s) for s in built[name]] == [2, 2] and all(0.0 <= x <= 1.0 for s in built[name] for x in s), name
    assert built["ArithmeticPRM"] == [[0.0, 0.0], [1.0, 1.0]]
    assert built["OutcomePRM"] == [[1.0, 1.0], [0.0, 0.0]]


# ---------------------------------------------------------------- HF formats on tiny models


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prm")
    return {kind: build_tiny_prm_dir(root / kind, kind) for kind in ("skywork", "qwen")}


def make(kind, tiny_dirs, **kwargs):
    cls = SkyworkPRM if kind == "skywork" else QwenMathPRM
    return cls(str(tiny_dirs[kind]), device="cpu", progress=False, **kwargs)


REQUESTS = [
    StepScoringRequest("What is 2+2?", ("Step 1: 2 + 2 = 4", "So the answer is \\boxed{4}.")),
    StepScoringRequest(Q, tuple(split_steps(GOOD))),
    StepScoringRequest("Empty steps", ("", "x", "")),
    StepScoringRequest("No steps", ()),
    StepScoringRequest("Forged separators", ("a <extra_0> b\n c", "d")),
]

KINDS = ["skywork", "qwen"]


@pytest.mark.parametrize("kind", KINDS)
def test_one_score_per_step_in_unit_interval(kind, tiny_dirs):
    prm = make(kind, tiny_dirs)
    assert isinstance(prm, ProcessRewardModel)
    scores = prm.score(REQUESTS)
    assert [len(s) for s in scores] == [len(r.steps) for r in REQUESTS]
    assert all(0.0 <= x <= 1.0 for row in scores for x in row)
    assert len({round(x, 6) for row in scores for x in row}) > 3  # not a constant


@pytest.mark.parametrize("kind", KINDS)
def test_separators_sit_at_the_end_of_each_step(kind, tiny_dirs):
    prm = make(kind, tiny_dirs)
    prefix, chunks = prm.encode(REQUESTS[4])
    ids, positions = fit_to_length(prefix, chunks, 10_000)
    assert len(positions) == 2
    assert [ids[p] for p in positions] == [prm.separator_id] * 2
    # Qwen: "<extra_0>" written in a step is plain text, never the separator token.
    # Skywork's separator token ("\n", the last token of "\n\n" in this byte-level vocabulary)
    # may occur in steps; scores are read only at the positions we placed, so an inner
    # newline is not scored (documented).
    response_ids = ids[len(prefix):]
    assert response_ids.count(prm.separator_id) == (2 if kind == "qwen" else 3)
    assert prm.tokenizer.decode(ids[len(prefix): positions[0]]) == "a <extra_0> b\n c"


@pytest.mark.parametrize("kind", KINDS)
def test_step_score_depends_only_on_text_up_to_its_separator(kind, tiny_dirs):
    prm = make(kind, tiny_dirs)
    base = prm.score([StepScoringRequest("q?", ("one", "two", "three"))])[0]
    changed_2 = prm.score([StepScoringRequest("q?", ("one", "TWO", "three"))])[0]
    changed_1_end = prm.score([StepScoringRequest("q?", ("onf", "two", "three"))])[0]
    assert changed_2[0] == pytest.approx(base[0], abs=1e-6)
    assert changed_2[1] != pytest.approx(base[1], abs=1e-6)
    assert changed_1_end[0] != pytest.approx(base[0], abs=1e-6)
    prefix_only = prm.score([StepScoringRequest("q?", ("one", "two"))])[0]
    assert prefix_only == pytest.approx(base[:2], abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_batching_with_padding_matches_one_by_one(kind, tiny_dirs):
    prm = make(kind, tiny_dirs, batch_size=3)
    batched = prm.score(REQUESTS)
    single = [prm.score([r])[0] for r in REQUESTS]
    for b, s in zip(batched, single):
        assert b == pytest.approx(s, abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_truncation_keeps_one_score_per_step(kind, tiny_dirs):
    full = make(kind, tiny_dirs, max_length=4096)
    prefix, chunks = full.encode(REQUESTS[1])
    budget = len(prefix) + len(chunks[0]) + len(chunks[1]) + 2  # steps 1-2 fit, 3-4 do not
    short = make(kind, tiny_dirs, max_length=budget)
    scores = short.score([REQUESTS[1]])[0]
    reference = full.score([REQUESTS[1]])[0]
    assert len(scores) == 4
    assert scores[:2] == pytest.approx(reference[:2], abs=1e-5)
    assert scores[2:] == [scores[1], scores[1]]  # carried forward
    assert short.n_truncated == 1
    # a question longer than the budget is cut from the left; every step still gets a score
    long_q = StepScoringRequest("long question " * 100, ("s1", "s2", "s3"))
    tiny = make(kind, tiny_dirs, max_length=32)
    assert len(tiny.score([long_q])[0]) == 3


def test_fit_to_length_policy():
    prefix, chunks = [1] * 10, [[2, 9], [3, 3, 9], [4, 9]]
    assert fit_to_length(prefix, chunks, 100) == (prefix + [2, 9, 3, 3, 9, 4, 9], [11, 14, 16])
    ids, pos = fit_to_length(prefix, chunks, 15)
    assert (len(ids), pos) == (15, [11, 14])
    ids, pos = fit_to_length(prefix, chunks, 4)  # question cut from the left to fit step 1
    assert (ids, pos) == ([1, 1, 2, 9], [3])
    ids, pos = fit_to_length(prefix, [[5, 6, 7, 8, 9]], 3)  # one step too long: keep its end
    assert (ids, pos) == ([7, 8, 9], [2])


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_runs_and_stays_close_to_fp32(kind, tiny_dirs):
    fp32 = make(kind, tiny_dirs, dtype="float32").score(REQUESTS[:2])
    bf16_prm = make(kind, tiny_dirs, dtype="bfloat16")
    assert next(bf16_prm.model.parameters()).dtype == torch.bfloat16
    bf16 = bf16_prm.score(REQUESTS[:2])
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, abs=0.1)


def test_wrong_layout_and_bad_arguments_are_rejected(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="Qwen2ForProcessRewardModel layout"):
        QwenMathPRM(str(tiny_dirs["skywork"]), step_separator="a", device="cpu")
    with pytest.raises(ValueError, match=r"step_separator='<extra_0>' must be a single token"):
        QwenMathPRM(str(tiny_dirs["skywork"]), device="cpu")
    with pytest.raises(ValueError, match=r"prm\.init_args\.model_path.*prm\.init_args\.batch_size"):
        SkyworkPRM(str(tmp_path / "nowhere"), batch_size=0)
    with pytest.raises(ValueError, match=r"prm\.init_args\.dtype"):
        SkyworkPRM(str(tiny_dirs["skywork"]), dtype="fp8")


@pytest.mark.parametrize("kind", KINDS)
def test_attn_implementation_reaches_the_prm_body_and_scores_agree(kind, tiny_dirs):
    eager = make(kind, tiny_dirs, attn_implementation="eager")
    assert eager.model.model.config._attn_implementation == "eager"
    assert make(kind, tiny_dirs).model.model.config._attn_implementation == "sdpa"  # transformers' default
    for got, want in zip(eager.score(REQUESTS), make(kind, tiny_dirs, attn_implementation="sdpa").score(REQUESTS)):
        assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match=r"prm\.init_args\.attn_implementation must be one of .*got 'flash'"):
        make(kind, tiny_dirs, attn_implementation="flash")


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_round_trips_through_autotokenizer(kind, tiny_dirs):
    prm = make(kind, tiny_dirs)
    text = "Step 1:  12 + 7 = 19\n\n  ünïcode ✓\n"
    assert prm.tokenizer.decode(prm.tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_yaml_class_paths_parse_and_instantiate(tiny_dirs):
    """The ``class_path``/``init_args`` form used in configs, through jsonargparse."""
    jsonargparse = pytest.importorskip("jsonargparse")
    from hs_star_pl.core.protocols import AnswerVerifier

    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--prm", type=ProcessRewardModel)
    parser.add_argument("--verifier", type=AnswerVerifier)
    for class_path, init_args in [
        ("hs_star_pl.prm.ArithmeticPRM", {"neutral_score": 0.25}),
        ("hs_star_pl.prm.OutcomePRM", {"ungradeable_score": 0.5}),
        ("hs_star_pl.prm.SkyworkPRM", {"model_path": str(tiny_dirs["skywork"]), "device": "cpu"}),
        ("hs_star_pl.prm.QwenMathPRM", {"model_path": str(tiny_dirs["qwen"]), "max_length": 512}),
    ]:
        cfg = parser.parse_object({"prm": {"class_path": class_path, "init_args": init_args},
                                   "verifier": {"class_path": "hs_star_pl.verifiers.ExactMatchVerifier"}})
        init = parser.instantiate(cfg)
        assert type(init.prm).__name__ == class_path.rsplit(".", 1)[1]
        assert init.prm.score([StepScoringRequest("q", ("a", "b"), True)])[0].__len__() == 2
    cfg = parser.parse_object({"verifier": {"class_path": "hs_star_pl.verifiers.MathVerifyVerifier",
                                            "init_args": {"n_workers": 1, "timeout_s": 2.0}}})
    verifier = parser.instantiate(cfg).verifier
    assert verifier.timeout_s == 2.0  # not started: workers spawn on first use


# ---------------------------------------------------------------- where the weights wait between rounds


@pytest.mark.parametrize("kind", KINDS)
def test_offload_reload_drops_the_weights_and_reads_them_again(kind, tiny_dirs):
    prm = make(kind, tiny_dirs, offload="reload")
    before = prm.score(REQUESTS)
    first = weakref.ref(prm.model)
    prm.sleep()
    gc.collect()
    assert not prm.resident and first() is None  # nothing holds the weights any more
    assert prm.seconds_waking == 0.0
    assert prm.score(REQUESTS) == before  # read again from model_path on the next call
    assert prm.resident and prm.seconds_waking > 0.0
    model, waking = prm.model, prm.seconds_waking
    prm.wake_up()  # already awake: nothing to do
    assert prm.model is model and prm.seconds_waking == waking


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_weights_on_the_cpu_stay_where_they_are(offload, tiny_dirs, recwarn):
    prm = make("skywork", tiny_dirs, offload=offload)
    model = prm.model
    prm.sleep()
    assert prm.resident and prm.model is model and prm.seconds_waking == 0.0
    warned = [str(w.message) for w in recwarn if "offload" in str(w.message)]
    assert warned == (["prm.init_args.offload='cpu' does nothing here: SkyworkPRM already runs on the CPU"]
                      if offload == "cpu" else [])


def test_offload_reload_refuses_weights_that_changed_on_disk(tiny_dirs, tmp_path):
    folder = shutil.copytree(tiny_dirs["qwen"], tmp_path / "qwen")
    prm = QwenMathPRM(str(folder), device="cpu", progress=False, offload="reload")
    prm.sleep()
    build_tiny_prm_dir(tmp_path / "other", "qwen", seed=1)
    shutil.copy(tmp_path / "other" / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(RuntimeError, match=r"prm.init_args.model_path=.*changed since this run first read them"):
        prm.score(REQUESTS)


def _swap_keeping_size_and_times(source, target):
    """Copy ``source`` over ``target`` as ``cp -p`` / ``rsync -a`` do: same size, the old modification time."""
    before = target.stat()
    assert source.stat().st_size == before.st_size
    shutil.copy2(source, target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_offload_reload_refuses_a_same_size_swap_that_keeps_the_old_modification_time(tiny_dirs, tmp_path):
    """Name, size and modification time match after ``cp -p``: the content changed all the same."""
    folder = shutil.copytree(tiny_dirs["qwen"], tmp_path / "qwen")
    prm = QwenMathPRM(str(folder), device="cpu", progress=False, offload="reload")
    before = prm.score(REQUESTS)
    prm.sleep()
    build_tiny_prm_dir(tmp_path / "other", "qwen", seed=1)
    _swap_keeping_size_and_times(tmp_path / "other" / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(RuntimeError, match=r"prm.init_args.model_path=.*changed since this run first read them"):
        prm.score(REQUESTS)
    # the same bytes copied back (again with the old times): the digest says nothing changed
    _swap_keeping_size_and_times(tiny_dirs["qwen"] / "model.safetensors", folder / "model.safetensors")
    assert prm.score(REQUESTS) == before


def test_an_unknown_offload_names_the_key(tiny_dirs):
    with pytest.raises(ValueError, match=r"prm.init_args.offload must be one of \['none', 'cpu', 'reload'\], got 'gpu'"):
        make("skywork", tiny_dirs, offload="gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("offload", ["cpu", "reload"])
def test_offload_gives_the_gpu_memory_back_until_the_next_score(offload, tiny_dirs):
    prm = SkyworkPRM(str(tiny_dirs["skywork"]), device="cuda", progress=False, offload=offload)
    before = prm.score(REQUESTS)
    held = torch.cuda.memory_allocated()
    prm.sleep()
    assert torch.cuda.memory_allocated() < held and not prm.resident
    assert prm.score(REQUESTS) == before
    assert next(prm.model.parameters()).device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_auto_device_uses_cuda_in_bf16(kind, tiny_dirs):
    cls = SkyworkPRM if kind == "skywork" else QwenMathPRM
    gpu = cls(str(tiny_dirs[kind]), progress=False)
    param = next(gpu.model.parameters())
    assert (param.device.type, param.dtype) == ("cuda", torch.bfloat16)
    for a, b in zip(make(kind, tiny_dirs).score(REQUESTS), gpu.score(REQUESTS)):
        assert b == pytest.approx(a, abs=0.1)


@pytest.mark.parametrize("hostile", ["1" * 100_000, "1 + " * 20_000, "1.1.1.1" * 10_000, "= 1 " * 20_000])
def test_arithmetic_prm_handles_hostile_text(hostile):
    assert ArithmeticPRM().score([StepScoringRequest(hostile, (hostile, "2 + 2 = 4"))])[0][1] in (0.0, 1.0)


def test_rule_prms_import_without_torch():
    """``hs_star_pl.prm`` loads torch only when a learned PRM class is first accessed."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; from hs_star_pl.prm import ArithmeticPRM, OutcomePRM; import hs_star_pl.infra.workers; "
        "sys.exit(int('torch' in sys.modules or 'lightning' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0


def test_auto_device_is_this_processs_gpu(monkeypatch):
    """Each rank's PRM goes to its own GPU: the PRM is built before Lightning sets the device."""
    from hs_star_pl.prm.hf import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("SLURM_LOCALID", "5")
    assert resolve_device("auto") == torch.device("cuda", 5)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


# ---------------------------------------------------------------- the documented formulas, recomputed apart


def _reference_body(path):
    """The saved Qwen2 body loaded by plain transformers, and the raw tensors of the folder."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen2Model

    state = load_file(str(path / "model.safetensors"))
    body = Qwen2Model(AutoConfig.from_pretrained(str(path)))
    body.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return body.eval(), state


@pytest.mark.parametrize("bos", [None, "<|endoftext|>"])
def test_skywork_scores_are_the_sigmoid_of_the_value_head_at_each_separator(bos, tiny_dirs):
    """Skywork's documented input in ``input_mode: steps``, built as one string: ``bos +
    question + "\\n"``, then each step followed by ``"\\n"``; the score of a step is
    ``sigmoid(v_head(h))`` at its ``"\\n"``. (The reference mode, on the HS-STaR reference's
    ``"\\n\\n"`` pieces: ``tests/test_prm_reference_inputs.py``.)"""
    prm = make("skywork", tiny_dirs, input_mode="steps", step_separator="\n")
    prm.tokenizer.bos_token = bos
    question, steps = "What is 2+2?", ("Step 1: 2 + 2 = 4", "so it is 4", "\\boxed{4}")
    body, state = _reference_body(tiny_dirs["skywork"])
    tok = prm.tokenizer
    prompt = (bos or "") + question + "\n"
    ids = tok(prompt + "".join(s + "\n" for s in steps), add_special_tokens=False)["input_ids"]
    newline = tok("\n", add_special_tokens=False)["input_ids"][-1]
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    positions = [i for i in range(start, len(ids)) if ids[i] == newline]
    assert len(positions) == len(steps)
    with torch.no_grad():
        hidden = body(input_ids=torch.tensor([ids])).last_hidden_state[0]
        values = torch.sigmoid(hidden @ state["v_head.summary.weight"].T + state["v_head.summary.bias"])[:, 0]
    assert prm.score([StepScoringRequest(question, steps)])[0] == pytest.approx(values[positions].tolist(), abs=1e-5)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("chat_template", [None, CHATML])
def test_qwen_scores_follow_the_model_cards_recipe(chat_template, tiny_dirs):
    """The model card's usage, recomputed apart: the whole conversation with the steps joined
    by ``<extra_0>`` (one after the last) and ``<|im_end|>`` after them, one forward pass,
    and the softmax probability of class 1 wherever the token is ``<extra_0>``. The tokens
    after the last separator, which we do not feed, must not change anything."""
    import torch.nn.functional as F

    prm = make("qwen", tiny_dirs)
    prm.tokenizer.chat_template = chat_template
    question, steps = "What is 2+2?", ("Step 1: 2 + 2\n= 4", "so it is 4", "\\boxed{4}")
    messages = [{"role": "system", "content": prm.system_prompt}, {"role": "user", "content": question},
                {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
    if chat_template:
        conversation = prm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    else:  # the ChatML that Qwen's own template writes
        conversation = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    ids = torch.tensor([prm.tokenizer(conversation)["input_ids"]])
    mask = ids[0] == prm.tokenizer.convert_tokens_to_ids("<extra_0>")
    assert int(mask.sum()) == len(steps) and ids[0, -1] != prm.separator_id  # <|im_end|> and "\n" follow
    body, state = _reference_body(tiny_dirs["qwen"])
    with torch.no_grad():
        hidden = body(input_ids=ids).last_hidden_state[0]
        inner = F.relu(hidden @ state["score.0.weight"].T + state["score.0.bias"])
        probs = F.softmax(inner @ state["score.2.weight"].T + state["score.2.bias"], dim=-1)[:, 1]
    assert prm.score([StepScoringRequest(question, steps)])[0] == pytest.approx(probs[mask].tolist(), abs=1e-5)


def test_weights_load_from_shards_from_bin_files_and_with_prefixes(tiny_dirs, tmp_path):
    """The layouts the docs promise: sharded ``*.safetensors`` with an index, ``pytorch_model.bin``
    with ``pretrained_model.`` prefixes and an ``lm_head`` to ignore; unknown tensors are refused."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_dirs["skywork"]
    state = load_file(str(src / "model.safetensors"))
    expected = make("skywork", tiny_dirs).score(REQUESTS[:2])

    def copy_without_weights(name):
        dst = tmp_path / name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
        return dst

    sharded = copy_without_weights("sharded")
    keys = sorted(state)
    index = {}
    for n, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        fname = f"model-0000{n}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(sharded / fname))
        index.update(dict.fromkeys(part, fname))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    binned = copy_without_weights("binned")
    torch.save({**{f"pretrained_model.{k}": v for k, v in state.items()},
                "lm_head.weight": torch.zeros(3, 3)}, binned / "pytorch_model.bin")
    for folder in (sharded, binned):
        scores = SkyworkPRM(str(folder), device="cpu", progress=False).score(REQUESTS[:2])
        for got, want in zip(scores, expected):
            assert got == pytest.approx(want, abs=1e-6), folder.name

    extra = copy_without_weights("extra")
    save_file({**state, "v_head.extra.weight": torch.zeros(2)}, str(extra / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['v_head\.extra\.weight'\]"):
        SkyworkPRM(str(extra), device="cpu")
    empty = copy_without_weights("empty")
    with pytest.raises(FileNotFoundError, match=r"prm\.init_args\.model_path=.*empty"):
        SkyworkPRM(str(empty), device="cpu")


# ---------------------------------------------------------------- batching, progress, sharding, device


@pytest.mark.parametrize("kind", KINDS)
def test_batches_are_sorted_by_length(kind, tiny_dirs):
    """With ``batch_size=2`` the six sequences go in as the longest two, the next two, ...:
    in input order the widths would be those of items 1, 3 and 5 (40, 33, 20 characters)."""
    prm = make(kind, tiny_dirs, batch_size=2)
    requests = [StepScoringRequest("q", ("x" * n,)) for n in (5, 40, 12, 33, 1, 20)]
    shapes = []
    handle = prm.model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        prm.score(requests)
    finally:
        handle.remove()
    lengths = sorted((len(fit_to_length(*prm.encode(r), 10**6)[0]) for r in requests), reverse=True)
    assert shapes == [(2, lengths[0]), (2, lengths[2]), (2, lengths[4])]


def test_progress_bar_shows_on_calls_of_eight_batches_or_more(tiny_dirs, capsys):
    requests = [StepScoringRequest("q", ("a", "b"))] * 8
    loud = SkyworkPRM(str(tiny_dirs["skywork"]), device="cpu", batch_size=1, progress=True)
    loud.score(requests[:7])
    assert "SkyworkPRM scoring" not in capsys.readouterr().err
    loud.score(requests)
    assert "SkyworkPRM scoring" in capsys.readouterr().err
    make("skywork", tiny_dirs, batch_size=1).score(requests)  # progress=False
    assert "scoring" not in capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
def test_shards_scored_apart_gather_to_the_whole(kind, tiny_dirs):
    """What a rank does: score ``shard(requests, rank, world_size)``; the caller interleaves."""
    prm = make(kind, tiny_dirs, batch_size=2)
    whole = prm.score(REQUESTS)
    world_size = 3
    gathered: list = [None] * len(REQUESTS)
    for rank in range(world_size):
        gathered[rank::world_size] = prm.score(shard(REQUESTS, rank, world_size))
    for got, want in zip(gathered, whole):
        assert got == pytest.approx(want, abs=1e-5)


def test_auto_dtype_is_bf16_on_cuda_and_fp32_on_cpu():
    from hs_star_pl.prm.hf import resolve_dtype

    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


# ---------------------------------------------------------------- one step delimiter


def test_one_delimiter_for_the_template_the_task_data_and_the_prm():
    """The paper's template asks for steps separated by the package's delimiter, the synthetic
    task's solutions are written with it, and the PRM scores exactly the steps it yields."""
    from hs_star_pl.core.steps import DEFAULT_STEP_DELIMITER
    from hs_star_pl.core.templates import get_template
    from hs_star_pl.tasks.arithmetic import make_problem

    assert DEFAULT_STEP_DELIMITER == "\n\n"
    assert f"separating each step with '{DEFAULT_STEP_DELIMITER}'" in get_template("qwen25-step-cot").prefix
    problem = make_problem(12, [("add", 7), ("multiply", 3), ("subtract", 5)])
    steps = split_steps(problem.solution)
    assert len(steps) == 4
    assert ArithmeticPRM().score([StepScoringRequest(problem.question, tuple(steps))]) == [[1.0] * 4]


class _LineEngine:
    """Answers every problem with the same three lines, one computation per line."""

    def generate(self, requests, params):
        from hs_star_pl.core.protocols import Completion

        return {r.key: [Completion("12 + 7 = 19\n19 * 3 = 57\n\\boxed{57}")] * r.n for r in requests}


@pytest.mark.parametrize(("delimiter", "n_steps"), [("\n", 3), ("\n\n", 1)])
def test_the_configured_delimiter_is_what_the_round_hands_the_prm(delimiter, n_steps):
    """``self_training.step_delimiter`` -> the delimiter set-up resolves (no template: the key's)
    -> ``RoundConfig`` -> the steps each PRM request holds."""
    from hs_star_pl.training.self_training import SelfTrainingCallback
    from hs_star_pl.core.budget import HierarchicalBudget
    from hs_star_pl.core.records import Problem
    from hs_star_pl.core.rounds import RoundConfig, run_round
    from hs_star_pl.verifiers import ExactMatchVerifier

    assert SelfTrainingCallback(step_delimiter=delimiter)._resolve_step_delimiter(None) == (delimiter, None)
    problem = Problem("p", "Start with 12. Add 7. Multiply by 3. What is the result?", "57")
    result = run_round([problem], engine=_LineEngine(), verifier=ExactMatchVerifier(), prm=ArithmeticPRM(),
                       allocator=HierarchicalBudget(samples_per_problem=2, n_presample=1),
                       config=RoundConfig(step_delimiter=delimiter))
    assert result.rollouts and all(r.score.step_scores == (1.0,) * n_steps for r in result.rollouts)
