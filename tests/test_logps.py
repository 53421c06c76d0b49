"""Response log-probs a chunk of positions at a time (``model.logp_chunk_size``, ``hs_star_pl.tensors.logps``)
give the whole-vocabulary path's log-probs, losses and gradients, to float rounding.

The module-level comparisons run a tiny policy in float64, where the two paths differ only in
the order of their sums: ``TOL`` (10^4 float64 epsilons, relative) covers sums of up to 10^4
rounded terms, and a real difference (a token scored twice or not at all, a wrong gradient)
is many orders of magnitude larger.
"""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch

from hs_star_pl.tensors.collate import collate_pairs
from hs_star_pl.infra.errors import ConfigError
from hs_star_pl.tensors.logps import head_logps, padded_positions, selected_logps
from hs_star_pl.tensors.losses import sequence_logps
from tests.helpers.tiny_setup import tiny_module
from tests.test_packing import _pairs

EPS64 = torch.finfo(torch.float64).eps
TOL = 1e4 * EPS64


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=TOL, atol=TOL * max(scale, 1.0), msg=what or None)


def _float64_module(**kwargs):
    module = tiny_module(sft_weight=0.5, **kwargs)
    module.model.double()
    return module


def _dpo_batch(module):
    """Five pairs of very different lengths; reference log-probs a few nats from the policy's."""
    pairs = _pairs(module.tokenizer)
    batch = collate_pairs(pairs, module.tokenizer.pad_token_id)
    with torch.no_grad():
        logps = module.response_logps(batch).tolist()
    n = len(pairs)
    refs = [(logps[i] + 3.0 * (i % 2), logps[n + i] - 2.0) for i in range(n)]
    return collate_pairs(pairs, module.tokenizer.pad_token_id, "right", refs)


def _loss_grads_and_ref(module, batch, chunk_size):
    module.logp_chunk_size = chunk_size
    module.zero_grad()
    with warnings.catch_warnings():  # self.log without a trainer: warned and skipped
        warnings.simplefilter("ignore")
        loss = module.model_step(batch, "train")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    with torch.no_grad():
        ref = module.response_logps(batch, n_pairs=batch["ref_chosen_logps"].shape[0])
    return loss.detach(), grads, ref


# -- the functions --------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 40, 10**6])
def test_selected_logps_give_the_log_softmax_and_its_gradient(chunk_size):
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(6, 9, 50, generator=gen, dtype=torch.float64)).requires_grad_()
    source = torch.randperm(54, generator=gen)[:40]
    target = torch.randint(0, 50, (40,), generator=gen)
    weights = torch.randn(40, generator=gen, dtype=torch.float64)

    expected = logits.reshape(-1, 50)[source].log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    got = selected_logps(logits.reshape(-1, 50), source, target, chunk_size)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), logits)
    _close(got, expected)
    _close(got_grad, expected_grad)
    assert bool((got_grad.reshape(-1, 50).abs().sum(-1) > 0).sum() == 40)  # unscored rows get no gradient


def test_selected_logps_of_bfloat16_logits_are_float32_with_a_bfloat16_gradient():
    """As before: the rows go to float32 for the log-softmax, the gradient comes back in the logits' dtype."""
    gen = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(30, 200, generator=gen)).to(torch.bfloat16).requires_grad_()
    source, target = torch.arange(30), torch.randint(0, 200, (30,), generator=gen)
    expected = logits.float().log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    got = selected_logps(logits, source, target, 7)
    (got_grad,) = torch.autograd.grad(got.sum(), logits)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
    eps32, eps16 = torch.finfo(torch.float32).eps, torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(got, expected, rtol=0, atol=16 * eps32 * float(expected.abs().max()))
    torch.testing.assert_close(got_grad.float(), expected_grad.float(), rtol=eps16, atol=eps16 * 1e-2)


def test_padded_sequence_logps_chunked_equal_whole():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 12, 40, generator=gen, dtype=torch.float64)
    input_ids = torch.randint(0, 40, (3, 12), generator=gen)
    response_mask = torch.zeros(3, 12, dtype=torch.long)
    response_mask[0, 4:12] = 1
    response_mask[1, 2:5] = 1
    response_mask[2, 11] = 1
    for chunk_size in (1, 5, 100):
        _close(sequence_logps(logits, input_ids, response_mask, chunk_size),
               sequence_logps(logits, input_ids, response_mask, None))
    source, target, sequence = padded_positions(input_ids, response_mask)
    assert sequence.tolist() == [0] * 8 + [1] * 3 + [2]
    assert source.tolist()[-1] == 2 * 12 + 10 and target.tolist()[-1] == int(input_ids[2, 11])


def test_head_logps_equal_the_full_logits_and_give_the_head_its_gradient():
    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 70, dtype=torch.float64)
    hidden = torch.randn(50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    source, target = torch.randperm(50, generator=gen)[:33], torch.randint(0, 70, (33,), generator=gen)
    expected = head(hidden)[source].log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    expected_grads = torch.autograd.grad(expected.sum(), [hidden, head.weight, head.bias])
    got = head_logps(hidden, head, source, target, chunk_size=4)
    got_grads = torch.autograd.grad(got.sum(), [hidden, head.weight, head.bias])
    _close(got, expected)
    for g, e in zip(got_grads, expected_grads, strict=True):
        _close(g, e)
    with torch.no_grad():  # the in-place path; and a function of the rows, as ZeRO-3's gathered weight is applied
        _close(head_logps(hidden, head, source, target, chunk_size=5), expected.detach())
        linear = partial(torch.nn.functional.linear, weight=head.weight, bias=head.bias)
        _close(head_logps(hidden, linear, source, target, chunk_size=5), expected.detach())


# -- the module ------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", ["sequences", "shared_prompts", "off"])
def test_chunked_module_gives_the_whole_vocabulary_losses_gradients_and_reference_log_probs(packing):
    module = _float64_module(packing=packing)
    batch = _dpo_batch(module)
    loss, grads, ref = _loss_grads_and_ref(module, batch, None)
    assert abs(float(loss) - 0.6931472) > 0.05 and grads  # a loss away from ln 2
    assert module.logp_route() == "head"
    for chunk_size in (1, 7, 10**6):
        c_loss, c_grads, c_ref = _loss_grads_and_ref(module, batch, chunk_size)
        _close(c_loss, loss, f"loss, chunk {chunk_size}")
        _close(c_ref, ref, f"reference log-probs, chunk {chunk_size}")
        assert c_grads.keys() == grads.keys()
        for name, grad in grads.items():
            _close(c_grads[name], grad, f"{name}, chunk {chunk_size}")


def test_the_lm_head_sees_a_chunk_of_positions_at_a_time_and_the_full_logits_never_exist():
    module = _float64_module(logp_chunk_size=16)
    batch = _dpo_batch(module)
    head, seen, whole = module.model.get_output_embeddings(), [], []
    hooks = [head.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape))),
             module.model.register_forward_pre_hook(lambda *_: whole.append(1))]
    try:
        _loss_grads_and_ref(module, batch, 16)
    finally:
        for hook in hooks:
            hook.remove()
    n_scored = int(batch["response_mask"][:, 1:].sum())
    assert not whole  # the model's own forward (logits of every position) never ran
    assert all(len(shape) == 2 and shape[0] <= 16 for shape in seen)
    # training forward, its recomputation in the backward pass, and the reference pass: each scored position 3 times
    assert sum(shape[0] for shape in seen) == 3 * n_scored


def test_a_model_whose_logits_are_not_its_head_output_keeps_its_own_logits_with_a_warning():
    module = _float64_module()
    forward = module.model.forward

    def soft_capped(*args, **kwargs):  # as Gemma 2's final_logit_softcapping
        out = forward(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out

    module.model.forward = soft_capped
    with pytest.warns(UserWarning, match="model.logp_chunk_size: its logits are not its LM head applied"):
        assert module.logp_route() == "logits"
    batch = _dpo_batch(module)
    loss, grads, ref = _loss_grads_and_ref(module, batch, None)
    c_loss, c_grads, c_ref = _loss_grads_and_ref(module, batch, 5)
    _close(c_loss, loss)
    _close(c_ref, ref)
    for name, grad in grads.items():
        _close(c_grads[name], grad, name)


def test_a_lora_adapted_lm_head_gets_the_same_adapter_gradients_chunked():
    pytest.importorskip("peft", reason="peft is not installed (extra [peft])")
    from hs_star_pl.tensors.lora import LoraSettings

    module = _float64_module(peft=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():  # LoRA's B starts at zero; move it so the adapters change the outputs
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = _dpo_batch(module)
    loss, grads, _ = _loss_grads_and_ref(module, batch, None)
    c_loss, c_grads, _ = _loss_grads_and_ref(module, batch, 6)
    assert module.logp_route() == "head"
    assert any("lm_head" in name for name in grads) and all("lora" in name for name in grads)
    _close(c_loss, loss)
    for name, grad in grads.items():
        _close(c_grads[name], grad, name)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_a_bad_chunk_size_is_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match="model.logp_chunk_size must be a positive number of positions or null"):
        tiny_module(logp_chunk_size=bad)


def test_logp_chunk_size_is_reachable_from_the_cli(tmp_path):
    from hs_star_pl.cli import HSStarCLI
    from hs_star_pl.tensors.logps import DEFAULT_CHUNK_SIZE
    from tests.test_cli import _run_args

    assert HSStarCLI(args=_run_args(tmp_path), run=False).model.logp_chunk_size == DEFAULT_CHUNK_SIZE
    assert HSStarCLI(args=[*_run_args(tmp_path), "--model.logp_chunk_size=64"], run=False).model.logp_chunk_size == 64
    overlay = tmp_path / "whole.yaml"
    overlay.write_text("model:\n  logp_chunk_size: null\n")
    assert HSStarCLI(args=[*_run_args(tmp_path), "-c", str(overlay)], run=False).model.logp_chunk_size is None
