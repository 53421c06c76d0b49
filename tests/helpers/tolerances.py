"""Tolerances for comparing two float computations, derived from the dtype and the size of the
reductions instead of taken from one machine's result.

Two code paths that compute the same sum in another order or grouping (DDP's all-reduce
against ZeRO's reduce-scatter, a packed batch against a padded one, oneDNN's kernels on one
CPU against another's) agree only to rounding. The classical bound (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., eq. 4.4): a float sum of ``n`` terms evaluated in
any order lies within ``gamma(n - 1) * sum(|x_i|)`` of the exact sum, ``gamma(k) = k*u /
(1 - k*u)`` with ``u`` the unit roundoff of the dtype; two such evaluations lie within twice
that of each other. It holds on every CPU, vector width and thread count, which is what a
test that runs wherever CI lands needs.

:func:`reordered_sum_tolerance` is that bound, :func:`sequence_logp_tolerance` the one for a
sequence's log-prob (a sum of log-softmaxes). :func:`adamw_weight_gaps` compares the weights
two runs of the same AdamW training exported, where Adam's normalisation makes a plain
elementwise bound impossible for a few components (see its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """``u``: half the distance from 1 to the next number of ``dtype`` (2**-24 for float32)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's ``gamma_n = n*u / (1 - n*u)``: the relative error bound of ``n`` rounded operations."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma({n}) is unbounded in {dtype}: n*u = {nu} >= 1")
    return nu / (1 - nu)


def reordered_sum_tolerance(n_terms: int, magnitude: float, dtype: torch.dtype = torch.float32) -> float:
    """Largest difference between two evaluations, in any order or grouping, of one sum of
    ``n_terms`` terms whose absolute values add up to at most ``magnitude``: ``2 gamma(n-1) magnitude``."""
    return 2 * gamma(max(n_terms - 1, 1), dtype) * magnitude


def sequence_logp_tolerance(n_tokens: int, vocab_size: int, logp: float, dtype: torch.dtype = torch.float32) -> float:
    """How far two evaluations of one sequence's log-prob (same weights, other batch layouts or
    kernels) may be apart: a sum over ``n_tokens`` tokens (terms adding up to ``|logp|``) of
    log-softmaxes, each the log of a sum of ``vocab_size`` exponentials, relatively ``2
    gamma(vocab_size - 1)`` apart and so that much apart in nats, per token."""
    return reordered_sum_tolerance(n_tokens, abs(logp), dtype) + n_tokens * reordered_sum_tolerance(vocab_size, 1.0, dtype)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of ``x``'s dtype at ``|x|`` (elementwise), as float64."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


@dataclass
class WeightGaps:
    n_weights: int
    max_gap: float
    whole_step_bound: float
    beyond_rounding: int  # components outside the elementwise rounding bound

    def problems(self, max_fraction_beyond_rounding: float = 1e-3) -> list[str]:
        out = []
        if self.max_gap > self.whole_step_bound:
            out.append(f"a weight differs by {self.max_gap:.3g}, more than every step of both runs together "
                       f"({self.whole_step_bound:.3g})")
        if self.beyond_rounding > max_fraction_beyond_rounding * self.n_weights:
            out.append(f"{self.beyond_rounding} of {self.n_weights} weights differ by more than rounding "
                       f"(at most {max_fraction_beyond_rounding:.0e} of them may)")
        return out


def adamw_weight_gaps(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, steps: int, lr_sum: float,
                      terms_per_gradient: int, betas: tuple[float, float] = (0.9, 0.999)) -> WeightGaps:
    """How far two state dicts are apart that two runs of the same AdamW training produced,
    measured against what float rounding of their gradients allows.

    Derivation. Each optimizer step moves a weight by ``lr * r`` with ``r = m_hat /
    (sqrt(v_hat) + eps)``, and stores the result rounded to the weights' dtype. Over ``steps``
    steps each run rounds at most ``steps`` times by half a ulp of the weight (``steps * ulp``
    for the two). Each gradient component is a sum of ``terms_per_gradient`` float terms (the
    tokens of an optimizer step's whole batch) that the two runs reduce in different orders:
    relatively at most ``2 gamma(n)`` apart where the sum does not cancel, and ``r``, being
    invariant to the gradient's scale, inherits that relative difference (``lr_sum * 2
    gamma(n)``). That is the elementwise rounding bound.

    It cannot hold for every component: where a gradient component is itself at the level of
    its rounding error (a near-exact cancellation), Adam divides it by ``sqrt(v_hat) + eps``
    with ``eps`` = 1e-8 and turns a rounding difference into anything up to a whole step (on
    the tiny policy 3 of 99,072 weights, moved by up to 0.9% of a step on an AMD EPYC, 1.2% on
    an Intel Xeon). So a few components may exceed it (``WeightGaps.problems``: at most 0.1%),
    none may exceed the largest distance the steps can cover (Adam's step is at most
    ``lr * (1 - beta1) / sqrt(1 - beta2)`` when ``1 - beta1 > sqrt(1 - beta2)``, else ``lr``,
    Kingma & Ba 2015, section 2.1, for each run), and what the comparison guards against
    (other pairs, another number of steps, an optimizer state lost on resume) moves most
    components by a sizeable fraction of a step.

    Args:
        a, b: the two state dicts (same names; float tensors of one dtype).
        steps: optimizer steps taken since the common starting weights.
        lr_sum: the sum of the learning rates of those steps.
        terms_per_gradient: terms summed into one gradient component in one step (an upper
            bound: sequences of the global batch x their length).
        betas: AdamW's ``betas``.
    """
    if sorted(a) != sorted(b):
        raise ValueError(f"the state dicts name different tensors: {sorted(set(a) ^ set(b))}")
    beta1, beta2 = betas
    largest_step = (1 - beta1) / math.sqrt(1 - beta2) if 1 - beta1 > math.sqrt(1 - beta2) else 1.0
    n = max_gap = beyond = 0
    whole = 0.0
    for name in a:
        x, y = a[name], b[name]
        if x.dtype != y.dtype or not x.is_floating_point():
            raise ValueError(f"{name}: expected float tensors of one dtype, got {x.dtype} and {y.dtype}")
        gap = (x.double() - y.double()).abs()
        spacing = ulp(torch.maximum(x.abs(), y.abs()))
        rounding = steps * spacing + lr_sum * 2 * gamma(terms_per_gradient, x.dtype)
        beyond += int((gap > rounding).sum())
        n += x.numel()
        max_gap = max(max_gap, float(gap.max()))
        whole = max(whole, float((2 * lr_sum * largest_step + steps * spacing).max()))
    return WeightGaps(n_weights=n, max_gap=max_gap, whole_step_bound=whole, beyond_rounding=beyond)
