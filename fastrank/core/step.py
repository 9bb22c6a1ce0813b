"""Step functions of docs/design.md §1.1 and their derivatives in PyTorch, shared by the `naive`
and `torch` backends of every family.

The formulas follow the published code (Smooth-AP's `sigmoid`, ROADMAP's
`tau_sigmoid` / `step_rank`) so that the `naive` backend reproduces their numbers.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .params import CLAMP, StepParams


def score_diff(s_k: torch.Tensor, s_j: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d, tied): d = s_k - s_j as the steps see it, and the pairs of equal infinite scores.

    Scores that compare equal are tied (d = 0: H(0) = 1, sigma(0) = 1/2), infinities included,
    where IEEE gives inf - inf = NaN; every backend defines it so (csrc/step.h `step_diff`,
    triton_kernels/_step.py). Such a tie is a constant: it carries no gradient (`tied` tells
    the hand-written backwards; autograd sees the constant). A NaN score never compares equal,
    so its NaN still propagates.
    """
    d = s_k - s_j
    tied = torch.isnan(d) & (s_k == s_j)
    return torch.where(tied, torch.zeros((), dtype=d.dtype, device=d.device), d), tied


def sigmoid_tau(d: torch.Tensor, tau: float) -> torch.Tensor:
    """sigma_tau(d) = 1 / (1 + exp(-d / tau)), with -d/tau clamped to [-50, 50] as in the references."""
    return 1.0 / (1.0 + torch.exp((-d / tau).clamp(-CLAMP, CLAMP)))


def suprank_neg(d: torch.Tensor, p: StepParams) -> torch.Tensor:
    """H^-(d): sigma on d <= 0, start + sigma on (0, delta], rho * (d - delta) + offset beyond.

    rho = 0 makes the last branch the constant offset, also at d = +inf (where 0 * inf is NaN)."""
    sig = sigmoid_tau(d, p.tau)
    lin = (p.rho * (d - p.delta) if p.rho != 0 else torch.zeros_like(d)) + p.resolved_offset
    return torch.where(d <= 0, sig, torch.where(d <= p.delta, p.start + sig, lin))


def sigmoid_tau_grad(d: torch.Tensor, tau: float) -> torch.Tensor:
    """d sigma_tau / d d, 0 where the references' clamp of -d/tau is active (their autograd sees
    a constant there), as every fused backward computes it."""
    x = d / tau
    sig = sigmoid_tau(d, tau)
    return torch.where((x >= -CLAMP) & (x <= CLAMP), sig * (1 - sig) / tau, d.new_zeros(()))


def suprank_neg_grad(d: torch.Tensor, p: StepParams) -> torch.Tensor:
    """d H^- / d d: rho beyond delta, the sigmoid's slope below (the constant `start` adds none)."""
    return torch.where(d > p.delta, torch.full_like(d, p.rho), sigmoid_tau_grad(d, p.tau))


def heaviside(d: torch.Tensor) -> torch.Tensor:
    """H(d) with H(0) = 1 and no gradient."""
    return (d >= 0).to(d.dtype)


def hrank_plus(d: torch.Tensor, p) -> torch.Tensor:
    """HAPPIER's smoothed H-rank step h+(d) for a competitor whose ordering key is above the
    ranked item's (GradedParams): leak * d on d <= 0; on d > 0, 1 when gamma > 1, else
    min(beta * d + gamma, 1). A zero leak or beta drops its product (0 * inf would be NaN)."""
    zero = d.new_zeros(())
    below = d * p.leak if p.leak != 0 else torch.zeros_like(d)
    if p.gamma > 1:
        above = torch.ones_like(d)
    else:
        above = ((d * p.beta) if p.beta != 0 else torch.zeros_like(d)) + p.gamma
        # clamp, not minimum: at beta * d + gamma = 1 its backward passes the whole slope, as
        # HAPPIER's torch.clamp and the kernels do (minimum's would split it in halves)
        above = above.clamp(max=1.0)
    return torch.where(d <= zero, below, above)


def hrank_plus_grad(d: torch.Tensor, p) -> torch.Tensor:
    """d h+ / d d: leak on d <= 0; on d > 0, 0 when gamma > 1, else beta where beta * d + gamma
    is below 1 and 0 where the min holds it at 1 (torch.clamp's backward passes the slope at
    equality, as HAPPIER's autograd does)."""
    leak = torch.full_like(d, p.leak)
    if p.gamma > 1:
        above = torch.zeros_like(d)
    else:
        lin = ((d * p.beta) if p.beta != 0 else torch.zeros_like(d)) + p.gamma
        above = torch.where(lin <= 1, torch.full_like(d, p.beta), torch.zeros_like(d))
    return torch.where(d <= 0, leak, above)
