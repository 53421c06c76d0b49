"""Losses against values worked out by hand (the arithmetic is in each docstring)."""

from __future__ import annotations

import math

import pytest
import torch

from hs_star_pl.tensors.losses import (
    DPO_LOSSES,
    chosen_nll,
    dpo_loss,
    get_dpo_loss,
    sequence_logps,
    sft_nll,
    token_logps,
)


def _three_token_batch():
    """V=2, every position's logits are [ln 3, 0], so p(token 0) = 3/4 and p(token 1) = 1/4."""
    logits = torch.tensor([[[math.log(3.0), 0.0]] * 3])
    input_ids = torch.tensor([[0, 0, 1]])
    return logits, input_ids


def test_token_logps_shift_by_one():
    """Position 0 predicts ids[1] = 0 (log 3/4); position 1 predicts ids[2] = 1 (log 1/4)."""
    logits, ids = _three_token_batch()
    expected = torch.tensor([[math.log(0.75), math.log(0.25)]])
    torch.testing.assert_close(token_logps(logits, ids), expected)


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        # both response tokens: log 3/4 + log 1/4 = log 3/16
        ([0, 1, 1], math.log(3 / 16)),
        # only the last: log 1/4
        ([0, 0, 1], math.log(0.25)),
        # nothing masked in: 0 (the first token is never scored, whatever its mask)
        ([1, 0, 0], 0.0),
    ],
)
def test_sequence_logps_sums_response_tokens_only(mask, expected):
    logits, ids = _three_token_batch()
    out = sequence_logps(logits, ids, torch.tensor([mask]))
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_sft_nll_token_average():
    """Tokens log 3/4 and log 1/4: NLL = -(log 0.75 + log 0.25) / 2 = 0.8369882."""
    logits, ids = _three_token_batch()
    out = sft_nll(logits, ids, torch.tensor([[0, 1, 1]]))
    assert out.item() == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2)
    assert out.item() == pytest.approx(0.8369882, abs=1e-6)


def test_dpo_sigmoid_hand_values():
    """beta = 0.5.

    Pair 1: policy (-1, -3), reference (-2, -2): h = (-1 + 2) - (-3 + 2) = 2, beta*h = 1,
    loss = -log sigmoid(1) = log(1 + e^-1) = 0.3132617; rewards 0.5 * 1 = 0.5 and
    0.5 * (-1) = -0.5.
    Pair 2: policy equals reference: h = 0, loss = log 2 = 0.6931472, rewards 0 and 0.
    Mean loss = (0.3132617 + 0.6931472) / 2 = 0.5032044.
    """
    loss, cr, rr = dpo_loss(
        torch.tensor([-1.0, -5.0]),
        torch.tensor([-3.0, -7.0]),
        torch.tensor([-2.0, -5.0]),
        torch.tensor([-2.0, -7.0]),
        beta=0.5,
    )
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 2)
    assert loss.item() == pytest.approx(0.5032044, abs=1e-6)
    torch.testing.assert_close(cr, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(rr, torch.tensor([-0.5, 0.0]))


def test_dpo_equal_policy_and_reference_is_log2():
    """h = 0 for every pair whatever beta, so -log sigmoid(0) = log 2."""
    logps = torch.tensor([-10.0, -3.5, -42.0])
    other = torch.tensor([-9.0, -8.0, -1.0])
    loss, cr, rr = dpo_loss(logps, other, logps, other, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert torch.all(cr == 0) and torch.all(rr == 0)


def test_ipo_hand_values():
    """beta (tau) = 0.5, so the target margin is 1 / (2 * 0.5) = 1.

    Pair 1: h = 2, loss (2 - 1)^2 = 1. Pair 2: h = 0, loss (0 - 1)^2 = 1. Pair 3: h = 1,
    loss 0. Mean = 2 / 3.
    """
    loss, _, _ = dpo_loss(
        torch.tensor([-1.0, -5.0, 0.0]),
        torch.tensor([-3.0, -7.0, 0.0]),
        torch.tensor([-2.0, -5.0, -1.0]),
        torch.tensor([-2.0, -7.0, 0.0]),
        beta=0.5,
        loss_type="ipo",
    )
    assert loss.item() == pytest.approx(2 / 3)


def test_dpo_gradient_pushes_chosen_up_rejected_down():
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]))
    loss.backward()
    # d/dpc of -log sigmoid(beta (pc - pr)) at 0 = -beta / 2 = -0.05
    assert pc.grad.item() == pytest.approx(-0.05)
    assert pr.grad.item() == pytest.approx(0.05)


def test_chosen_nll_length_normalised():
    """(-(-4) / 2 + -(-6) / 3) / 2 = (2 + 2) / 2 = 2."""
    assert chosen_nll(torch.tensor([-4.0, -6.0]), torch.tensor([2, 3])).item() == pytest.approx(2.0)


def test_unknown_loss_type_lists_valid_names():
    with pytest.raises(ValueError, match=r"'hinge'.*\['ipo', 'sigmoid'\]"):
        get_dpo_loss("hinge")
    assert sorted(DPO_LOSSES) == ["ipo", "sigmoid"]


def test_nonpositive_beta_rejected():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(z, z, z, z, beta=0.0)


def test_tensor_modules_do_not_import_lightning():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, hs_star_pl.tensors.losses, hs_star_pl.core.templates, hs_star_pl.tensors.collate, hs_star_pl.tensors.schedules; "
        "print('lightning' in sys.modules)"
    )
    repo = Path(__file__).resolve().parents[1]  # cwd first on sys.path: this checkout, not an installed copy
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False"
