"""WarmupCosineLR: the warmup + cosine factors, worked by hand, and its restart each iteration."""

from __future__ import annotations

import math

import pytest
import torch

from hs_star_pl.tensors.schedules import WarmupCosineLR


def test_warmup_cosine_factors():
    """W = 2, total = 6: steps 0, 1 warm up to 1/2 and 2/2; then progress (s - 2) / 4 on a
    half cosine: s = 2 -> 1, s = 4 -> (1 + cos(pi/2)) / 2 = 0.5, s = 6 and later -> 0."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, warmup_steps=2, total_steps=6)
    assert [sched.factor(s) for s in (0, 1, 2, 4, 6, 9)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    ratio = WarmupCosineLR(opt, warmup_ratio=0.25)
    ratio.set_total_steps(8)  # warmup = 2 steps
    assert ratio.factor(0) == pytest.approx(0.5) and opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_warmup_cosine_restart_begins_a_whole_schedule_and_survives_a_resume():
    """Six steps of W = 2, total = 6 (factors 1/2, 1, 1, (1 + cos(pi/4)) / 2, 1/2, ...), then
    ``restart(4)``: 1/2, 1, then progress (s - 2) / 2 -> 1 and 1/2. A scheduler rebuilt from the
    state_dict taken just after the restart gives the same rates."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    sched.restart(4)
    saved = sched.state_dict()
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    half_cos = (1 + math.cos(math.pi / 4)) / 2
    assert lrs == pytest.approx([0.5, 1.0, 1.0, half_cos, 0.5, 1 - half_cos, 0.5, 1.0, 1.0, 0.5])
    resumed_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = WarmupCosineLR(resumed_opt, warmup_steps=2)
    resumed.load_state_dict(saved)
    assert resumed.start_step == 6 and resumed.get_lr() == pytest.approx([0.5])
