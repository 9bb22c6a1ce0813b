"""Step functions of docs/design.md §1.1 in PyTorch, shared by the `naive` and `torch` backends.

The formulas follow the published code (Smooth-AP's `sigmoid`, ROADMAP's
`tau_sigmoid` / `step_rank`) so that the `naive` backend reproduces their numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

SIGMOID = 0
SUPRANK = 1
STEP_IDS = {"sigmoid": SIGMOID, "suprank": SUPRANK}

#: the references clamp -d/tau to this range before exp
CLAMP = 50.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels rank in: float64 for float64 scores, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class StepParams:
    """Parameters of the step function. `offset=None` means continuous at `delta`.

    `fn` (the public function, for error messages) takes no part in equality or hashing.
    """

    step: int = SIGMOID
    tau: float = 0.01
    rho: float = 100.0
    delta: float = 0.05
    start: float = 0.5
    offset: Optional[float] = None
    fn: str = field(default="fastrank", compare=False)

    @property
    def resolved_offset(self) -> float:
        """offset = sigma_tau(delta) + start unless given (ROADMAP's default)."""
        if self.offset is not None:
            return float(self.offset)
        x = min(max(self.delta / self.tau, -CLAMP), CLAMP)
        return 1.0 / (1.0 + math.exp(-x)) + self.start

    def as_op_args(self):
        return (self.step, float(self.tau), float(self.rho), float(self.delta), float(self.start), self.resolved_offset)

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Every kernel takes 1/tau and the other parameters in the compute dtype (float32 for
        float16/bfloat16/float32 scores) and multiplies by 1/tau in its hot loop. A parameter
        that is not finite there would turn 0 * inf into NaN (a tie, the self term), so it is
        rejected here rather than computed wrong: tau must lie in [1/max, max] of the dtype
        (float32: [2.9e-39, 3.4e38]), rho, delta, start and offset must be finite in it."""
        ct = compute_dtype(dtype)
        big = torch.finfo(ct).max
        if not (1.0 / big <= self.tau <= big):
            raise ValueError(
                f"{self.fn}: `tau` must lie in [{1.0 / big:.3g}, {big:.3g}] for {dtype} scores "
                f"(1/tau and tau finite in {ct}), got {self.tau!r}"
            )
        for name, v in (("rho", self.rho), ("delta", self.delta), ("start", self.start),
                        ("offset", self.resolved_offset)):
            if not abs(v) <= big:
                raise ValueError(f"{self.fn}: `{name}` must be finite in {ct} (|{name}| <= {big:.3g}) for "
                                 f"{dtype} scores, got {v!r}")


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


def heaviside(d: torch.Tensor) -> torch.Tensor:
    """H(d) with H(0) = 1 and no gradient."""
    return (d >= 0).to(d.dtype)
