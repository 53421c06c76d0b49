"""The tolerances of tests/helpers/tolerances.py hold for computations that only reorder sums,
and catch the differences they are meant to catch."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers.tolerances import adamw_weight_gaps, gamma, reordered_sum_tolerance, unit_roundoff


def test_reordered_sums_stay_within_the_bound_in_every_dtype():
    generator = torch.Generator().manual_seed(0)
    for dtype, n in ((torch.float32, 4096), (torch.bfloat16, 64), (torch.float16, 256)):  # n * u <= 1/4
        x = torch.randn(n, generator=generator).to(dtype)
        exact = float(x.double().sum())
        bound = reordered_sum_tolerance(x.numel(), float(x.double().abs().sum()), dtype)
        for _ in range(5):
            shuffled = x[torch.randperm(x.numel(), generator=generator)]
            sequential = shuffled[0].clone()
            for v in shuffled[1:]:  # one rounding per addition, in this order
                sequential = sequential + v
            assert abs(float(sequential) - exact) <= bound / 2, dtype
            assert abs(float(shuffled.sum()) - float(x.sum())) <= bound, dtype
    assert unit_roundoff(torch.float32) == 2**-24 and gamma(1, torch.float32) == pytest.approx(2**-24)
    with pytest.raises(ValueError, match="unbounded"):
        gamma(2**24)


def _adamw_run(per_sample_grads, model, steps, order, lost_state_at=None):
    """AdamW on ``model`` whose gradient each step is the float32 sum of per-sample gradients in ``order``."""
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        if step == lost_state_at:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for p, grads in zip(model.parameters(), per_sample_grads(model, step)):
            total = torch.zeros_like(p)
            for i in order:
                total += grads[i]
            p.grad = total
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_two_adamw_runs_that_reduce_in_another_order_agree_and_a_lost_state_does_not():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    data = torch.randn(256, 64)

    def per_sample_grads(m, step):
        x = data[(step * 32) % 256:][:32]
        out = []
        for p in m.parameters():
            out.append([])
        for row in x:
            m.zero_grad()
            (m(row[None]).tanh() ** 2).sum().backward()
            for slot, p in zip(out, m.parameters()):
                slot.append(p.grad.clone())
        return out

    steps = 3
    forward = _adamw_run(per_sample_grads, model, steps, range(32))
    backward = _adamw_run(per_sample_grads, model, steps, range(31, -1, -1))
    lost = _adamw_run(per_sample_grads, model, steps, range(32), lost_state_at=2)
    check = dict(steps=steps, lr_sum=steps * 1e-3, terms_per_gradient=32)
    same = adamw_weight_gaps(forward, backward, **check)
    assert 0 < same.max_gap and not same.problems(), same  # reordered: apart, within rounding
    assert adamw_weight_gaps(forward, lost, **check).problems()  # the optimizer state lost before step 3
    assert adamw_weight_gaps(forward, {k: v.clone() for k, v in model.state_dict().items()}, **check).problems()
