"""Packed forward passes (``model.packing``) give what padded batches give, to float rounding.

Tiny models from config, fp32, batches whose sequences differ in length by 10-40x.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from hs_star_pl.tensors.collate import collate_pairs, collate_sequences, encode_example
from hs_star_pl.core.records import PreferencePair
from hs_star_pl.tensors.packing import attention_pair_cost, pack_batch, pack_batch_groups, sequence_logps, width_groups
from tests.helpers.tiny_setup import PAIRS_FILE, tiny_module
from tests.helpers.tolerances import sequence_logp_tolerance
from tests.helpers.trainers import cpu_trainer

TOL = dict(rtol=1e-5, atol=1e-5)
LOSS_TOL = 3e-5
"""fp32 log-probs summed over 300 tokens reach ~1,700 nats, where float32's spacing is 1.2e-4: the
two layouts' sums differ by a few of those, and the DPO loss moves by beta/2 of that."""


def _pairs(tokenizer, n: int = 5, seed: int = 0):
    """Encoded pairs: prompts of 3-25 tokens, responses of 1-300 (chosen) and 1-40 (rejected)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = "".join(rnd.choice("0123456789+= ") for _ in range(rnd.randint(3, 25)))
        chosen = "".join(rnd.choice("abc\n ") for _ in range(rnd.randint(1, 300)))
        rejected = "".join(rnd.choice("xyz\n ") for _ in range(rnd.randint(1, 40)))
        out.append((encode_example(tokenizer, prompt, chosen, 512), encode_example(tokenizer, prompt, rejected, 512)))
    return out


def _dpo_batch(module, side: str = "right"):
    """A DPO batch whose reference log-probs are the policy's own, moved by a few nats (a loss away from ln 2)."""
    pairs = _pairs(module.tokenizer)
    batch = collate_pairs(pairs, module.tokenizer.pad_token_id, side)
    packing, module.packing = module.packing, "off"
    with torch.no_grad():
        logps = module.response_logps(batch).tolist()
    module.packing = packing
    n = len(pairs)
    refs = [(logps[i] + 3.0 * (i % 2), logps[n + i] - 2.0) for i in range(n)]
    return collate_pairs(pairs, module.tokenizer.pad_token_id, side, refs)


def _quiet_step(module, batch):
    with warnings.catch_warnings():  # self.log without a trainer: warned and skipped
        warnings.simplefilter("ignore")
        return module.model_step(batch, "train")


def _loss_and_grads(module, batch, packing: str):
    module.packing = packing
    module.zero_grad()
    loss = _quiet_step(module, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_pack_batch_lays_sequences_end_to_end_with_positions_restarting_at_0():
    # rows: lengths 6, 2, 3 (right padded); prompts 2, 1, 1 tokens
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 0, 0, 0, 0], [9, 10, 11, 0, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    response = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]])
    packed = pack_batch(ids, mask, response, pad_token_id=0)
    # first fit by decreasing length into rows of the longest (6): [6], [3, 2, 1 pad]
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [9, 10, 11, 7, 8, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    assert packed.attention_mask is None
    # every response token is read from the position before it, and credited to its own sequence
    assert packed.target.tolist() == [3, 4, 5, 6, 8, 10, 11]
    assert packed.sequence.tolist() == [0, 0, 0, 0, 1, 2, 2]
    assert packed.source.tolist() == [1, 2, 3, 4, 9, 6, 7]


def test_shared_prompt_layout_lays_the_prompt_down_once():
    # one pair: prompt [1, 2], chosen [3, 4, 5], rejected [6]
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    response = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]])
    packed = pack_batch(ids, mask, response, pad_token_id=0, n_pairs=1, mask_dtype=torch.bool)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2]]  # the rejected response continues the prompt
    assert packed.source.tolist() == [1, 2, 3, 1]  # its first token is read from the prompt's last
    allowed = packed.attention_mask[0, 0]
    assert allowed[5].tolist() == [True, True, False, False, False, True]  # sees the prompt, not the chosen


def test_width_groups_put_short_units_in_narrower_rows_only_where_that_pays():
    # units of ~420 and ~210 tokens: one width pads the short ones to 420 and squares it in attention
    lengths = [203, 423, 208, 420, 253, 409, 261, 406]
    groups = width_groups(lengths, pair_cost=1.5e-3)
    assert sorted(k for g in groups for k in g) == list(range(len(lengths)))  # every unit once
    assert [sorted(lengths[k] for k in g) for g in groups] == [[406, 409, 420, 423], [203, 208, 253, 261]]
    assert width_groups(lengths, pair_cost=1.5e-3, max_groups=1) == [[1, 3, 5, 7, 6, 4, 2, 0]]
    # lengths within a few tokens of each other: an extra forward pass would not pay
    assert len(width_groups([300, 305, 310, 298, 302], pair_cost=1.5e-3)) == 1
    # one long unit and many short ones: counting tokens only, the short ones fill the second row of
    # one width; counting attention's pairs as well, they are cheaper in rows of their own width
    assert len(width_groups([500] + [40] * 12, pair_cost=0.0)) == 1
    assert width_groups([500] + [40] * 12, pair_cost=1.5e-3) == [[0], list(range(1, 13))]


@pytest.mark.parametrize("shared", [False, True])
def test_row_groups_give_the_log_probs_of_one_group_of_rows(shared):
    module = tiny_module().eval()
    batch = collate_pairs(_pairs(module.tokenizer), module.tokenizer.pad_token_id)
    layout = (batch["input_ids"], batch["attention_mask"], batch["response_mask"], module.tokenizer.pad_token_id)
    n_pairs = 5 if shared else None
    groups = pack_batch_groups(*layout, n_pairs=n_pairs, pair_cost=attention_pair_cost(module.model))
    assert len(groups) == 2 and groups[0].input_ids.shape[1] > groups[1].input_ids.shape[1]
    # each sequence is scored in exactly one group
    covered = torch.cat([g.sequence.unique() for g in groups])
    assert sorted(covered.tolist()) == list(range(10))
    one = pack_batch(*layout, n_pairs=n_pairs)
    assert sum(g.n_tokens for g in groups) < one.n_tokens  # less row-end padding

    def logps(packed):
        logits = module.model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                              position_ids=packed.position_ids, use_cache=False).logits
        return sequence_logps(logits, packed)

    with torch.no_grad():
        torch.testing.assert_close(sum(logps(g) for g in groups), logps(one), **TOL)


def test_module_runs_one_forward_pass_per_row_group():
    module = tiny_module(packing="shared_prompts")
    batch = _dpo_batch(module)
    with torch.no_grad():
        module.response_logps(batch, n_pairs=5)  # the one-time checks' forward passes, before counting
    calls = []
    module.model.get_decoder().register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        module.response_logps(batch, n_pairs=5)
    assert len(calls) == 2


def test_sdpa_gets_an_additive_mask_with_the_boolean_masks_outputs():
    # torch turns a boolean mask into an additive one inside every sdpa call; one additive mask for all layers
    module = tiny_module(attn_implementation="sdpa").eval()
    assert module._packing_mask_dtype() == torch.float32
    batch = collate_pairs(_pairs(module.tokenizer), module.tokenizer.pad_token_id)
    layout = (batch["input_ids"], batch["attention_mask"], batch["response_mask"], module.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = [module.model(input_ids=p.input_ids, attention_mask=p.attention_mask, position_ids=p.position_ids,
                               use_cache=False).logits
                  for p in (pack_batch(*layout, n_pairs=5, mask_dtype=d) for d in (torch.bool, torch.float32))]
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_row_gives_each_sequence_the_logits_it_gets_alone(attn):
    module = tiny_module(attn_implementation=attn).eval()
    sequences = [encode_example(module.tokenizer, "1+2=", "3" * n, 512) for n in (200, 7, 60)]
    batch = collate_sequences(sequences, module.tokenizer.pad_token_id)
    packed = pack_batch(batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                        module.tokenizer.pad_token_id, row_length=10**6)
    assert packed.input_ids.shape[0] == 1  # one row holds all three
    with torch.no_grad():
        # use_cache=False as the module passes it: with a KV cache transformers does not look for packed rows
        row = module.model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits[0]
        at = 0
        for seq in sorted(sequences, key=lambda s: -len(s.ids)):  # the order first fit laid them down
            alone = module.model(input_ids=torch.tensor([seq.ids])).logits[0]
            torch.testing.assert_close(row[at : at + len(seq.ids)], alone, **TOL)
            at += len(seq.ids)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_and_padded_dpo_give_equal_logps_loss_and_gradients(attn, side):
    module = tiny_module(attn_implementation=attn, sft_weight=0.5)
    batch = _dpo_batch(module, side)
    n_pairs = batch["ref_chosen_logps"].shape[0]
    module.packing = "shared_prompts"
    shared = module.response_logps(batch, n_pairs=n_pairs)
    module.packing = "sequences"
    whole = module.response_logps(batch, n_pairs=n_pairs)
    module.packing = "off"
    padded = module.response_logps(batch, n_pairs=n_pairs)
    torch.testing.assert_close(shared, padded, **TOL)
    torch.testing.assert_close(whole, padded, **TOL)

    padded_loss, padded_grads = _loss_and_grads(module, batch, packing="off")
    assert abs(float(padded_loss) - 0.6931472) > 0.05  # a loss away from ln 2
    for layout in ("shared_prompts", "sequences"):
        packed_loss, packed_grads = _loss_and_grads(module, batch, packing=layout)
        assert abs(float(packed_loss) - float(padded_loss)) < LOSS_TOL, layout
        assert packed_grads.keys() == padded_grads.keys() and packed_grads
        for name, grad in padded_grads.items():
            torch.testing.assert_close(packed_grads[name], grad, **TOL, msg=f"{layout}: {name}")


def test_packed_and_padded_sft_give_equal_loss_and_gradients():
    module = tiny_module(objective="sft")
    sequences = [s for pair in _pairs(module.tokenizer, seed=1) for s in pair]
    batch = collate_sequences(sequences, module.tokenizer.pad_token_id)
    packed_loss, packed_grads = _loss_and_grads(module, batch, packing="sequences")
    padded_loss, padded_grads = _loss_and_grads(module, batch, packing="off")
    torch.testing.assert_close(packed_loss, padded_loss, **TOL)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, **TOL, msg=name)
    # and the padded value is losses.sft_nll, the token-averaged NLL
    from hs_star_pl.tensors.losses import sft_nll

    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(padded_loss, sft_nll(logits, batch["input_ids"], batch["response_mask"]), **TOL)


def test_packed_and_padded_reference_log_probs_are_equal():
    module = tiny_module()
    rnd = random.Random(2)
    pairs = [
        PreferencePair(problem_id=str(i), prompt=f"Q{i}: " + "1+" * rnd.randint(1, 20), chosen="2" * rnd.randint(1, 250),
                       rejected="3" * rnd.randint(1, 30), chosen_key=f"{i}c", rejected_key=f"{i}r")
        for i in range(9)
    ]
    module.packing = "off"
    padded = module.compute_reference_logps(pairs, max_length=512, batch_size=4)
    for layout in ("sequences", "shared_prompts"):
        module.packing = layout
        packed = module.compute_reference_logps(pairs, max_length=512, batch_size=4)
        for a, b in zip(packed, padded, strict=True):  # other layouts: equal to the rounding of each sum
            for key in ("ref_chosen_logp", "ref_rejected_logp"):
                want = getattr(b, key)
                assert abs(getattr(a, key) - want) <= sequence_logp_tolerance(512, len(module.tokenizer), want), (layout, key)


def test_packed_lora_gives_the_padded_loss_and_adapter_gradients():
    pytest.importorskip("peft", reason="peft is not installed (extra [peft])")
    from hs_star_pl.tensors.lora import LoraSettings

    module = tiny_module(peft=LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # LoRA's B starts at zero; move it so the adapters change the outputs
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = _dpo_batch(module)
    packed_loss, packed_grads = _loss_and_grads(module, batch, packing="shared_prompts")
    padded_loss, padded_grads = _loss_and_grads(module, batch, packing="off")
    assert abs(float(packed_loss) - float(padded_loss)) < LOSS_TOL
    assert padded_grads and all("lora" in name for name in padded_grads)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, **TOL, msg=name)


def test_training_with_gradient_accumulation_ends_at_the_same_weights_packed_or_padded(tmp_path):
    from hs_star_pl.training.data import MathDataModule

    from hs_star_pl.training.module import HSStarModule, TinyModelConfig

    weights = {}
    for packing in ("sequences", "off"):
        # SGD: an update proportional to the gradient (Adam's first steps blow rounding in tiny gradients up to lr)
        module = HSStarModule(tiny=TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
                              optimizer=lambda params: torch.optim.SGD(params, lr=0.5), packing=packing)
        data = MathDataModule(train_file=str(PAIRS_FILE), batch_size=4, shuffle=False, template="plain")
        trainer = cpu_trainer(tmp_path / str(packing), max_steps=2, accumulate_grad_batches=2, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=data)
        assert trainer.global_step == 2 and module.packing_active() is (packing != "off")
        weights[packing] = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    for name, value in weights["off"].items():
        torch.testing.assert_close(weights["sequences"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def _register_mask_ignoring_attention() -> str:
    """An attention kernel that ignores the mask it is given (plain causal): packing must not trust it."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **{**kwargs, "is_causal": True})

    AttentionInterface.register("causal_only_test", causal_only)
    return "causal_only_test"


@pytest.mark.parametrize("layout", ["sequences", "shared_prompts"])
def test_a_model_whose_attention_ignores_packed_sequences_falls_back_to_padding_with_a_warning(layout):
    module = tiny_module(packing=layout)
    module.model.config._attn_implementation = _register_mask_ignoring_attention()
    batch = _dpo_batch(module)
    with pytest.warns(UserWarning, match=r"model\.packing: .*'causal_only_test'.* every batch is padded instead"):
        fallen_back = module.response_logps(batch, n_pairs=5)
    assert module.packing_active() is False
    module.packing = "off"
    padded = module.response_logps(batch, n_pairs=5)
    torch.testing.assert_close(fallen_back, padded, rtol=0, atol=0)


def test_model_packing_packs_sequences_by_default_and_is_reachable_from_the_cli(tmp_path):
    from hs_star_pl.cli import HSStarCLI
    from tests.test_cli import _run_args

    assert HSStarCLI(args=_run_args(tmp_path), run=False).model.packing == "sequences"
    assert HSStarCLI(args=[*_run_args(tmp_path), "--model.packing=off"], run=False).model.packing == "off"
    overlay = tmp_path / "shared.yaml"
    overlay.write_text("model:\n  packing: shared_prompts\n")
    assert HSStarCLI(args=[*_run_args(tmp_path), "-c", str(overlay)], run=False).model.packing == "shared_prompts"


def test_an_unknown_packing_layout_is_refused_naming_the_key():
    from hs_star_pl.infra.errors import ConfigError

    with pytest.raises(ConfigError, match="model.packing must be one of sequences, shared_prompts, off"):
        tiny_module(packing="yes")
