"""Tokenisation, masks, padding, truncation and example loading of the training data."""

from __future__ import annotations

import csv
import json

import lightning as L
from lightning.pytorch.loggers import CSVLogger
import pytest
import torch

from hs_star_pl.tensors.collate import collate_pairs, collate_sequences, encode_example, position_ids_from_mask
from hs_star_pl.core.records import PreferencePair, SftExample
from hs_star_pl.core.templates import render_prompt
from hs_star_pl.cli import HSStarCLI
from hs_star_pl.training.data import ExampleFileError, MathDataModule, load_examples
from hs_star_pl.tensors.tiny import build_byte_tokenizer
from tests.helpers.tiny_setup import PAIRS_FILE, REPO, STEPWISE_FILE, tiny_module
from tests.helpers.trainers import cpu_trainer

EOS = 256  # build_byte_tokenizer: bytes are ids 0..255, <|endoftext|> is 256 (and the pad)


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def test_encode_appends_eos_and_counts_prompt(tok):
    enc = encode_example(tok, "ab", "c", max_length=16)
    assert enc.ids == (ord("a"), ord("b"), ord("c"), EOS)
    assert (enc.n_prompt, enc.n_response, enc.truncated) == (2, 2, False)


def test_encode_truncates_response_from_the_right_and_drops_long_prompts(tok):
    enc = encode_example(tok, "ab", "cdef", max_length=4)  # room for 2 of "cdef<eos>"
    assert enc.ids == (ord("a"), ord("b"), ord("c"), ord("d"))
    assert enc.truncated and EOS not in enc.ids
    exact = encode_example(tok, "ab", "c", max_length=4)  # a b c <eos> fits exactly
    assert not exact.truncated and exact.ids[-1] == EOS
    assert encode_example(tok, "abcd", "e", max_length=4) is None  # no room for one response token
    assert encode_example(tok, "", "e", max_length=4) is None  # empty prompt: first token unscorable


def test_right_padding_masks_token_by_token(tok):
    a = encode_example(tok, "ab", "c", 16)  # a b | c EOS
    b = encode_example(tok, "x", "yzw", 16)  # x | y z w EOS
    batch = collate_sequences([a, b], pad_token_id=EOS, padding_side="right")
    assert batch["input_ids"].tolist() == [[97, 98, 99, EOS, EOS], [120, 121, 122, 119, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    # the pad id equals EOS: the trained EOS at [0, 3] is kept while the pad at [0, 4] is not,
    # which only a length-based mask can do
    assert batch["input_ids"][0, 3] == batch["input_ids"][0, 4]


def test_left_padding_masks_and_positions(tok):
    a = encode_example(tok, "ab", "c", 16)
    b = encode_example(tok, "x", "yzw", 16)
    batch = collate_sequences([a, b], pad_token_id=EOS, padding_side="left")
    assert batch["input_ids"].tolist() == [[EOS, 97, 98, 99, EOS], [120, 121, 122, 119, EOS]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    assert position_ids_from_mask(batch["attention_mask"]).tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]


def test_pairs_stack_chosen_then_rejected_with_refs(tok):
    pairs = [
        (encode_example(tok, "p", "good", 16), encode_example(tok, "p", "bad", 16)),
        (encode_example(tok, "q", "ok", 16), encode_example(tok, "q", "no!", 16)),
    ]
    batch = collate_pairs(pairs, EOS, ref_logps=[(-1.0, -2.0), (-3.0, -4.0)])
    assert batch["input_ids"].shape == (4, 6)
    assert tok.decode(batch["input_ids"][0, :5].tolist()) == "pgood"
    assert tok.decode(batch["input_ids"][2, :4].tolist()) == "pbad"
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -3.0]
    assert batch["ref_rejected_logps"].tolist() == [-2.0, -4.0]


def test_load_examples_renders_questions_and_keeps_prompts(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"question": "Q1", "chosen": "a", "rejected": "b", "problem_id": "x"},
        {"prompt": "RAW PROMPT\n", "chosen": "c", "rejected": "d", "ref_chosen_logp": -1.5, "ref_rejected_logp": -2.5},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs = load_examples(path, "plain")
    assert pairs[0].prompt == render_prompt("plain", "Q1") and pairs[0].problem_id == "x"
    assert pairs[1].prompt == "RAW PROMPT\n" and pairs[1].ref_rejected_logp == -2.5


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"question": "q"}], r"bad\.jsonl:1: a row needs 'chosen'"),
        ([{"question": "q", "response": "r"}, {"question": "q", "chosen": "a", "rejected": "b"}], r":2: pair row in a file of sft"),
        ([{"chosen": "a", "rejected": "b"}], r":1: needs a 'prompt'"),
    ],
)
def test_load_examples_errors_name_file_and_line(tmp_path, rows, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ExampleFileError, match=match):
        load_examples(path, "plain")


def test_constructor_errors_name_the_yaml_key():
    with pytest.raises(ValueError, match="data.train_file and data.problems_file"):
        MathDataModule(train_file="a", problems_file="b")
    with pytest.raises(ValueError, match=r"unknown prompt template 'nope'"):
        MathDataModule(template="nope")
    with pytest.raises(ValueError, match=r"data.global_batch_size \(6\) must be a multiple of data.batch_size \(4\)"):
        MathDataModule(batch_size=4, global_batch_size=6)


def _attach(dm: MathDataModule, module, tmp_path, **trainer_kwargs) -> L.Trainer:
    trainer = cpu_trainer(tmp_path, **trainer_kwargs)
    trainer.strategy.connect(module)
    module.trainer = trainer
    dm.trainer = trainer
    return trainer


def test_problems_file_gives_sft_examples_with_template(tmp_path):
    module = tiny_module("sft")
    dm = MathDataModule(problems_file=str(STEPWISE_FILE), template="qwen25-step-cot", batch_size=4)
    _attach(dm, module, tmp_path)
    dm.setup("fit")
    assert dm.objective == "sft" and len(dm.train_examples) == 20
    first = dm.train_examples[0]
    assert first.prompt.startswith("Given a math problem") and first.response.startswith("Step 1:")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    # every row's last real token is EOS and is inside the response mask
    lengths = batch["attention_mask"].sum(-1)
    for row, n in enumerate(lengths.tolist()):
        assert batch["input_ids"][row, n - 1] == EOS and batch["response_mask"][row, n - 1] == 1


def test_problems_file_fields_are_mapped_for_stepwise_init(tmp_path):
    """A solution kept under another key (``steps``) is read with data.problem_fields; without
    the mapping the error names the file, the missing field and the key to set."""
    import json

    from hs_star_pl.core.problems import FieldMap

    rows = [json.loads(line) for line in STEPWISE_FILE.read_text().splitlines()]
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"q": r["question"], "answer": r["answer"], "steps": r["solution"]}) + "\n"
                               for r in rows))
    module = tiny_module("sft")
    dm = MathDataModule(problems_file=str(renamed), problem_fields=FieldMap(question_key="q", solution_key="steps"),
                        template="plain", batch_size=4)
    _attach(dm, module, tmp_path)
    dm.setup("fit")
    assert [e.response for e in dm.train_examples] == [r["solution"] for r in rows]
    assert dm.train_examples[0].prompt == f"Question: {rows[0]['question']}\nAnswer:\n"
    unmapped = MathDataModule(problems_file=str(renamed), problem_fields=FieldMap(question_key="q"), template="plain")
    with pytest.raises(ValueError, match=rf"data.problems_file={renamed}: 20 problems have no 'solution' field.*"
                                         r"data.problem_fields.solution_key"):
        unmapped.load_train_examples()


def test_truncation_is_counted_warned_and_logged(tmp_path):
    """max_length 60 with the plain template: 17 of the 20 prompts do not fit (dropped), the 3
    that do have their solutions cut; the counts are warned about and logged as data/*."""
    module = tiny_module("sft")
    dm = MathDataModule(problems_file=str(STEPWISE_FILE), template="plain", max_length=60, batch_size=4)
    trainer = cpu_trainer(tmp_path, max_epochs=1, logger=CSVLogger(tmp_path))
    with pytest.warns(UserWarning, match=r"train: 3 responses cut to data.max_length=60, 17 examples dropped"):
        trainer.fit(module, dm)
    assert dm.last_stats == {"n_examples": 3, "n_truncated": 3, "n_dropped": 17}
    (metrics,) = tmp_path.rglob("metrics.csv")
    logged = [{k: float(v) for k, v in row.items() if k.startswith("data/") and v} for row in csv.DictReader(metrics.open())]
    assert [row for row in logged if row] == [{"data/n_examples": 3.0, "data/n_truncated": 3.0, "data/n_dropped": 17.0}]


def test_the_train_dataloader_is_rebuilt_every_epoch_before_on_train_epoch_start(tmp_path):
    """What the whole loop relies on (base.yaml sets reload_dataloaders_every_n_epochs: 1):
    Lightning asks for epoch e's data before the on_train_epoch_start of epoch e, so a hook
    there would hand over data one epoch late. If Lightning changes this order, this fails."""
    events: list[tuple[str, int]] = []

    class EpochStart(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            events.append(("on_train_epoch_start", trainer.current_epoch))

    pairs = [PreferencePair(f"p{i}", render_prompt("plain", f"Q{i}"), "right", "wrong", "c", "r") for i in range(2)]
    dm = MathDataModule(template="plain", batch_size=2)
    dm.set_example_source(lambda epoch: events.append(("train_dataloader", epoch)) or list(pairs))
    trainer = cpu_trainer(tmp_path, max_epochs=3, reload_dataloaders_every_n_epochs=1, callbacks=[EpochStart()])
    trainer.fit(tiny_module(), dm)
    assert events == [(name, e) for e in range(3) for name in ("train_dataloader", "on_train_epoch_start")]


def test_objective_mismatch_names_the_key(tmp_path):
    module = tiny_module("sft")
    dm = MathDataModule(train_file=str(PAIRS_FILE), template="plain")
    _attach(dm, module, tmp_path)
    with pytest.raises(ValueError, match="model.objective is 'sft'.*set model.objective: dpo"):
        dm.setup("fit")


def test_global_batch_size_gives_the_accumulation_and_a_trainer_that_disagrees_is_refused(tmp_path):
    dm = MathDataModule(train_file=str(PAIRS_FILE), template="plain", batch_size=2, global_batch_size=8)
    assert dm.accumulate_grad_batches(world_size=1) == 4 and dm.accumulate_grad_batches(world_size=2) == 2
    with pytest.raises(ValueError, match=r"trainer.accumulate_grad_batches \(2\) contradicts data.global_batch_size"):
        dm.accumulate_grad_batches(world_size=1, configured=2)
    assert MathDataModule(batch_size=2).accumulate_grad_batches(world_size=4, configured=3) == 3
    _attach(dm, tiny_module(), tmp_path, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match=r"needs gradient accumulation 4 .* build it with accumulate_grad_batches=4"):
        dm.setup("fit")


def test_injected_examples_are_used_and_missing_refs_filled(tmp_path):
    module = tiny_module()
    dm = MathDataModule(template="plain", batch_size=8, shuffle=False)
    _attach(dm, module, tmp_path)
    dm.setup("fit")
    pairs = [PreferencePair(f"p{i}", render_prompt("plain", f"Q{i}"), "right", "wrong", "c", "r") for i in range(3)]
    dm.set_train_examples(pairs)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 6
    assert torch.isfinite(batch["ref_chosen_logps"]).all() and batch["ref_chosen_logps"].shape == (3,)
    with pytest.raises(TypeError, match="all PreferencePair or all SftExample"):
        dm.set_train_examples([pairs[0], SftExample("s", "p", "r")])


def test_val_pairs_get_the_reference_of_the_iteration_start(tmp_path):
    """Val refs are filled when the train dataloader is built, before training moves the policy."""
    module = tiny_module()
    dm = MathDataModule(train_file=str(PAIRS_FILE), val_file=str(PAIRS_FILE), template="plain", max_length=256)
    _attach(dm, module, tmp_path)
    dm.setup("fit")
    assert all(p.ref_chosen_logp is None for p in dm.val_examples)
    dm.train_dataloader()
    assert all(p.ref_chosen_logp is not None for p in dm.val_examples)
    assert [p.ref_chosen_logp for p in dm.val_examples] == [p.ref_chosen_logp for p in dm.train_examples]


def test_global_batch_size_drives_optimizer_steps_in_a_real_fit(tmp_path):
    """``hs-star fit`` with 20 pairs, 2 per batch -> 10 batches; global 8 -> accumulate 4 ->
    steps after batches 4, 8 and the epoch's last (10): 3 optimizer steps. The counts of the
    epoch's examples reach the logger as data/*."""
    cli = HSStarCLI(args=[
        "fit", "-c", str(REPO / "configs" / "base.yaml"), "-c", str(REPO / "configs" / "debug" / "tiny_cpu.yaml"),
        f"--data.train_file={PAIRS_FILE}", "--data.batch_size=2", "--data.global_batch_size=8",
        "--data.max_length=256", "--trainer.max_epochs=1", "--export.enabled=false", f"--trainer.default_root_dir={tmp_path}",
    ])
    assert cli.trainer.accumulate_grad_batches == 4 and cli.trainer.global_step == 3
    (metrics,) = tmp_path.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert [(float(r["data/n_examples"]), float(r["data/n_truncated"])) for r in rows if r.get("data/n_examples")] == [(20, 0)]


@pytest.mark.parametrize(("devices", "nodes", "accumulate"), [(1, 1, 64), (8, 1, 8), (8, 2, 4)])
def test_global_batch_256_whatever_the_number_of_devices(devices, nodes, accumulate):
    """configs/strategy/*.yaml: data.batch_size 4 x GPUs x accumulation = 256 on any cluster
    shape; a shape that does not divide fails at start naming the keys and the device count."""

    def fit_on(devices: int, nodes: int = 1) -> int:
        dm = MathDataModule(template="plain", batch_size=4, global_batch_size=256)
        trainer = cpu_trainer(None, devices=devices, num_nodes=nodes, strategy="ddp")
        return dm.accumulate_grad_batches(trainer.world_size, trainer.accumulate_grad_batches)

    assert fit_on(devices, nodes) == accumulate
    with pytest.raises(ValueError, match=r"data.global_batch_size \(256\) must be a multiple of data.batch_size \(4\) x devices \(3\)"):
        fit_on(3)


def test_without_a_tokenizer_the_data_module_asks_for_the_policy_module(tmp_path):
    """The tokenizer comes from the policy (``training.policy.Policy``); a module that is not one is named."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    dm = MathDataModule(train_file=str(PAIRS_FILE), template="plain", max_length=256, batch_size=2)
    with pytest.raises(RuntimeError, match=r"needs the policy's tokenizer: use it with HSStarModule \(the model\.\* group\)"):
        cpu_trainer(tmp_path, max_epochs=1).fit(BoringModel(), dm)
