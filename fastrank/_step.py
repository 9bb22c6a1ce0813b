"""Step functions of SPEC §1.1 in PyTorch, shared by the `naive` and `torch` backends.

The formulas follow the published code (Smooth-AP's `sigmoid`, ROADMAP's
`tau_sigmoid` / `step_rank`) so that the `naive` backend reproduces their numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

SIGMOID = 0
SUPRANK = 1
STEP_IDS = {"sigmoid": SIGMOID, "suprank": SUPRANK}

#: the references clamp -d/tau to this range before exp
CLAMP = 50.0


@dataclass(frozen=True)
class StepParams:
    """Parameters of the step function. `offset=None` means continuous at `delta`."""

    step: int = SIGMOID
    tau: float = 0.01
    rho: float = 100.0
    delta: float = 0.05
    start: float = 0.5
    offset: Optional[float] = None

    @property
    def resolved_offset(self) -> float:
        """offset = sigma_tau(delta) + start unless given (ROADMAP's default)."""
        if self.offset is not None:
            return float(self.offset)
        x = min(max(self.delta / self.tau, -CLAMP), CLAMP)
        return 1.0 / (1.0 + math.exp(-x)) + self.start

    def as_op_args(self):
        return (self.step, float(self.tau), float(self.rho), float(self.delta), float(self.start), self.resolved_offset)


def sigmoid_tau(d: torch.Tensor, tau: float) -> torch.Tensor:
    """sigma_tau(d) = 1 / (1 + exp(-d / tau)), with -d/tau clamped to [-50, 50] as in the references."""
    return 1.0 / (1.0 + torch.exp((-d / tau).clamp(-CLAMP, CLAMP)))


def suprank_neg(d: torch.Tensor, p: StepParams) -> torch.Tensor:
    """H^-(d): sigma on d <= 0, start + sigma on (0, delta], rho * (d - delta) + offset beyond."""
    sig = sigmoid_tau(d, p.tau)
    lin = p.rho * (d - p.delta) + p.resolved_offset
    return torch.where(d <= 0, sig, torch.where(d <= p.delta, p.start + sig, lin))


def heaviside(d: torch.Tensor) -> torch.Tensor:
    """H(d) with H(0) = 1 and no gradient."""
    return (d >= 0).to(d.dtype)
