"""SkyworkPRM builds, token for token, the input the paper's thresholds were fitted on.

The HS-STaR reference scores a response with Skywork's ``prepare_input(..., step_token="\\n\\n")``:
``encode(bos + question + "\\n")``, then the raw response split on ``"\\n\\n"`` (nothing
stripped, empty pieces kept), each piece encoded on its own and followed by the last token of
``encode("\\n\\n")``, a score read at each of those tokens, and a problem's reward the minimum
over all of them. The construction is re-implemented here from that description, apart from
our code, on a tokenizer where ``"\\n\\n"`` is one token, as in Qwen2's vocabulary, and so
are longer newline runs (as byte-level BPE vocabularies merge them), so that encoding the
whole response at once, or dropping blank pieces, gives other ids.
Run: ``PYTHONPATH=$PWD python -m pytest tests/test_prm_reference_inputs.py -q``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, Qwen2Model, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hs_star_pl.core.protocols import ProcessRewardModel, StepScoringRequest
from hs_star_pl.core.steps import split_steps
from hs_star_pl.prm import SkyworkPRM
from hs_star_pl.prm.hf import build_tiny_prm_dir, fit_to_length

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"
QUESTION = "Start with 12. Add 7. Multiply by 3. What is the result?"
RESPONSES = {
    "plain": "Step 1: 12 + 7 = 19\n\nStep 2: 19 * 3 = 57\n\nThe answer is \\boxed{57}.",
    "four newlines": "Step 1: 12 + 7 = 19\n\n\n\nStep 2: 19 * 3 = 57\n\n\\boxed{57}",
    "ends in a blank line": "Step 1: 12 + 7 = 19\n\nStep 2: 19 * 3 = 57\n\nSo \\boxed{57}.\n\n",
    "odd runs and spaces": "\n\n  Step 1: 12 + 7 = 19 \n\n\nStep 2: 19 * 3 = 57\n\n\n\n\n\n \\boxed{57}\n",
}


def newline_tokenizer() -> Qwen2Tokenizer:
    """Byte-level Qwen2 tokenizer plus Qwen2's merges of newline runs: ``"\\n\\n"``,
    ``"\\n\\n\\n"`` and ``"\\n\\n\\n\\n"`` are one token each; ``<|endoftext|>`` is BOS, EOS, pad."""
    symbol = bytes_to_unicode()
    vocab = {symbol[b]: b for b in range(256)}
    nl = symbol[ord("\n")]
    vocab.update({nl * 2: 256, nl * 3: 257, nl * 4: 258})
    return Qwen2Tokenizer(
        vocab=vocab, merges=[(nl, nl), (nl * 2, nl), (nl * 2, nl * 2)], unk_token=None,
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )


def reference_input(tokenizer, problem: str, response: str, step_token: str = "\n\n"):
    """The reference's input ids and the positions scored, built from its description."""
    step_id = tokenizer.encode(step_token)[-1]
    ids = tokenizer.encode(tokenizer.bos_token + problem + "\n")
    scored = []
    for piece in response.split(step_token):
        ids += (tokenizer.encode(piece) if piece != "" else []) + [step_id]
        scored.append(len(ids) - 1)
    return ids, scored


def reference_values(folder: Path, ids: list[int]) -> torch.Tensor:
    """sigmoid(v_head(h)) at every position: plain transformers' Qwen2 body on the saved tensors."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    body = Qwen2Model(AutoConfig.from_pretrained(str(folder)))
    body.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    with torch.no_grad():
        hidden = body.eval()(input_ids=torch.tensor([ids])).last_hidden_state[0]
        return torch.sigmoid(hidden @ state["v_head.summary.weight"].T + state["v_head.summary.bias"])[:, 0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_prm_dir(tmp_path_factory.mktemp("prm") / "skywork", "skywork", tokenizer=newline_tokenizer())


@pytest.fixture(scope="module")
def prm(folder):
    return SkyworkPRM(str(folder), device="cpu", progress=False)


def request(response: str) -> StepScoringRequest:
    """What the round hands the PRM: the question, the steps it split, and the response."""
    return StepScoringRequest(QUESTION, tuple(split_steps(response)), response=response)


def test_the_tokenizer_is_one_where_a_blank_line_is_one_token(prm):
    tok = prm.tokenizer  # as loaded back from the folder, the way the PRM loads it
    assert len(tok.encode("\n\n")) == 1 and len(tok.encode("\n\n\n\n")) == 1
    assert tok.encode("\n\n") != tok.encode("\n\n\n\n")
    assert prm.separator_id == tok.encode("\n\n")[0]


@pytest.mark.parametrize("name", list(RESPONSES))
def test_input_ids_and_scored_positions_are_the_references(name, prm):
    response = RESPONSES[name]
    want_ids, want_positions = reference_input(prm.tokenizer, QUESTION, response)
    ids, positions = fit_to_length(*prm.encode(request(response)), 10**6)
    assert ids == want_ids
    assert positions == want_positions
    fed = []  # and those ids are what the model is given
    handle = prm.model.register_forward_pre_hook(lambda module, args: fed.append(args[0][0].tolist()))
    try:
        prm.score([request(response)])
    finally:
        handle.remove()
    assert fed == [want_ids]


@pytest.mark.parametrize("name", list(RESPONSES))
def test_the_minimum_over_steps_is_the_references_minimum_over_pieces(name, prm, folder):
    """One score per step the round split; every piece's score, blank pieces' included, is
    in the minimum, and a blank piece's score goes to the step before it (the first step for
    a leading one): what it scores was written by then."""
    response = RESPONSES[name]
    ids, positions = reference_input(prm.tokenizer, QUESTION, response)
    piece_values = reference_values(folder, ids)[positions].tolist()
    scores = prm.score([request(response)])[0]
    steps = split_steps(response)
    assert len(scores) == len(steps)
    assert min(scores) == pytest.approx(min(piece_values), abs=1e-5)
    expected: list[list[float]] = [[] for _ in steps]
    seen = 0
    for piece, value in zip(response.split("\n\n"), piece_values):
        seen += bool(piece.strip())
        expected[max(seen - 1, 0)].append(value)
    assert scores == pytest.approx([min(v) for v in expected], abs=1e-5)


def test_the_blank_pieces_are_scored(prm):
    """A run of four newlines and a trailing blank line each add a scored separator."""
    assert len(reference_input(prm.tokenizer, QUESTION, RESPONSES["four newlines"])[1]) == 4  # 3 steps
    assert len(reference_input(prm.tokenizer, QUESTION, RESPONSES["ends in a blank line"])[1]) == 4  # 3 steps
    assert len(fit_to_length(*prm.encode(request(RESPONSES["four newlines"])), 10**6)[1]) == 4
    assert len(fit_to_length(*prm.encode(request(RESPONSES["ends in a blank line"])), 10**6)[1]) == 4


def test_batched_scoring_equals_one_by_one(prm):
    batch = [request(r) for r in RESPONSES.values()]
    assert [len(s) for s in prm.score(batch)] == [len(r.steps) for r in batch]
    for got, one in zip(prm.score(batch), batch):
        assert got == pytest.approx(prm.score([one])[0], abs=1e-5)


def test_a_blank_response_has_no_steps_and_no_score(prm):
    assert prm.score([request("\n\n  \n\n")]) == [[]]


def test_without_the_response_each_step_is_one_piece_with_a_warning(folder):
    """The fallback: scored as if the response were the steps joined by the separator."""
    prm = SkyworkPRM(str(folder), device="cpu", progress=False)
    steps = tuple(split_steps(RESPONSES["plain"]))
    with pytest.warns(UserWarning, match=r"without its response"):
        scores = prm.score([StepScoringRequest(QUESTION, steps)])[0]
    ids, positions = reference_input(prm.tokenizer, QUESTION, "\n\n".join(steps))
    assert fit_to_length(*prm.encode(StepScoringRequest(QUESTION, steps)), 10**6) == (ids, positions)
    assert scores == pytest.approx(reference_values(folder, ids)[positions].tolist(), abs=1e-5)


def test_steps_split_on_another_delimiter_are_refused(prm):
    response = "12 + 7 = 19\n19 * 3 = 57\n\n\\boxed{57}"  # 3 lines, 2 blank-line blocks
    with pytest.raises(ValueError, match=r"self_training\.step_delimiter"):
        prm.score([StepScoringRequest(QUESTION, tuple(split_steps(response, "\n")), response=response)])


def test_steps_mode_keeps_the_stripped_steps_with_the_separator_after_each(folder):
    """``input_mode: steps``: the round's steps, stripped and without blank ones, each followed
    by the separator's token (here Skywork's own examples' ``"\\n"``); the response is unused."""
    prm = SkyworkPRM(str(folder), device="cpu", progress=False, input_mode="steps", step_separator="\n")
    tok = prm.tokenizer
    response = RESPONSES["odd runs and spaces"]
    ids, positions = fit_to_length(*prm.encode(request(response)), 10**6)
    prompt = tok(tok.bos_token + QUESTION + "\n", add_special_tokens=False)["input_ids"]
    pieces = [tok(s, add_special_tokens=False)["input_ids"] + [tok.encode("\n")[-1]] for s in split_steps(response)]
    assert ids == prompt + [i for p in pieces for i in p]
    assert positions == [len(prompt) + end - 1 for end in itertools.accumulate(map(len, pieces))]
    assert len(positions) == 3 and {ids[p] for p in positions} == {tok.encode("\n")[-1]}
    with pytest.raises(ValueError, match=r"prm\.init_args\.input_mode"):
        SkyworkPRM(str(folder), device="cpu", input_mode="raw")


def test_reference_mode_needs_a_bos_token(tmp_path):
    tok = newline_tokenizer()
    tok.bos_token = None
    folder = build_tiny_prm_dir(tmp_path / "nobos", "skywork", tokenizer=tok)
    with pytest.raises(ValueError, match=r"input_mode='reference'.*bos_token"):
        SkyworkPRM(str(folder), device="cpu")
    assert SkyworkPRM(str(folder), device="cpu", input_mode="steps").input_mode == "steps"


# ---------------------------------------------------------------- the paper configs


def prm_sections(*names: str) -> list[dict]:
    """``self_training.prm`` of each paper config, in the order they are layered."""
    return [yaml.safe_load((PAPER / name).read_text())["self_training"]["prm"] for name in names]


@pytest.mark.parametrize("presets", [
    [], ["prm/skywork_o1_7b.yaml"], ["prm/skywork_o1_1.5b.yaml"],
    ["prm/qwen25_math_prm_7b.yaml", "prm/skywork_o1_7b.yaml"],
    ["prm/skywork_o1_1.5b.yaml", "prm/qwen25_math_prm_7b.yaml", "prm/skywork_o1_1.5b.yaml"],
])
def test_paper_skywork_configs_resolve_to_the_reference_input(presets, folder, tmp_path):
    qwen = build_tiny_prm_dir(tmp_path / "qwen", "qwen")
    sections = prm_sections("hs_star.yaml", *presets)
    # the Qwen preset's weights live elsewhere; only the last section decides the class
    folders = [qwen if s["class_path"].endswith("QwenMathPRM") else folder for s in sections]
    prm = resolve_each(sections, folders)
    assert type(prm).__name__ == "SkyworkPRM"
    assert (prm.input_mode, prm.step_separator) == ("reference", "\n\n")
    response = RESPONSES["four newlines"]
    assert fit_to_length(*prm.encode(request(response)), 10**6) == reference_input(prm.tokenizer, QUESTION, response)


def test_the_qwen_preset_keeps_its_own_separator_after_the_skywork_config(folder, tmp_path):
    qwen = build_tiny_prm_dir(tmp_path / "qwen", "qwen")
    prm = resolve_each(prm_sections("hs_star.yaml", "prm/qwen25_math_prm_7b.yaml"), [folder, qwen])
    assert type(prm).__name__ == "QwenMathPRM"
    assert prm.separator_id == prm.tokenizer.convert_tokens_to_ids("<extra_0>")


def resolve_each(sections: list[dict], folders: list[Path]):
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--prm", type=ProcessRewardModel)
    args = []
    for section, path in zip(sections, folders):
        init = {**section.get("init_args", {}), "model_path": str(path), "device": "cpu", "progress": False}
        args += ["--prm", json.dumps({**section, "init_args": init})]
    return parser.instantiate(parser.parse_args(args)).prm


def test_a_round_hands_the_prm_the_raw_response(prm, folder):
    """Through ``rounds.score_rollouts`` (what every round calls), each response's process
    reward is the reference's minimum over all its pieces, and no steps-only fallback warns."""
    import warnings

    from hs_star_pl.core.records import Phase, Problem, Rollout
    from hs_star_pl.core.rounds import score_rollouts

    class AllRight:
        def verify(self, responses, golds):
            return [True] * len(responses)

    rollouts = [Rollout("q", i, Phase.PRESAMPLE, text) for i, text in enumerate(RESPONSES.values())]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scored = score_rollouts(rollouts, {"q": Problem("q", QUESTION, "57")}, AllRight(), prm)
    for r in scored:
        ids, positions = reference_input(prm.tokenizer, QUESTION, r.text)
        assert r.prm_min == pytest.approx(min(reference_values(folder, ids)[positions].tolist()), abs=1e-5)


def test_a_separator_other_than_the_runs_delimiter_is_refused_when_the_fit_is_set_up(folder):
    """The run's delimiter is resolved once, at set-up, and the reference-mode PRM is asked
    there whether it splits on the same one (before, the first scored response raised)."""
    from hs_star_pl.training.self_training import SelfTrainingCallback

    prm = SkyworkPRM(str(folder), device="cpu", progress=False, step_separator="\n")
    delimiter, error = SelfTrainingCallback(problems_file="pool.jsonl", prm=prm)._resolve_step_delimiter("plain")
    assert delimiter == "\n\n"
    assert error.startswith("prm.init_args.step_separator ('\\n') must equal the run's step delimiter ('\\n\\n'")
    agreed = SelfTrainingCallback(problems_file="pool.jsonl", prm=prm, step_delimiter="\n")
    assert agreed._resolve_step_delimiter("plain") == ("\n", None)
    steps_mode = SkyworkPRM(str(folder), device="cpu", progress=False, step_separator="\n", input_mode="steps")
    assert SelfTrainingCallback(problems_file="pool.jsonl", prm=steps_mode)._resolve_step_delimiter("plain") == ("\n\n", None)
