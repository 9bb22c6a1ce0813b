"""Parameters of the op families, checked once and passed unchanged to every backend.

A backend takes the dataclass (Python backends) or its `as_op_args()` scalars (the C++
ops); `check_dtype` rejects a parameter that the kernels could not represent in the
dtype they compute in, rather than letting it turn into a silent NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import validate as V

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
    """Parameters of the step function (docs/design.md §1.1). `offset=None` means continuous at `delta`.

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


def make_params(
    fn: str, step: str, tau: float, rho: float, delta: float, start: float, offset: Optional[float]
) -> StepParams:
    """The StepParams of a public call, each argument checked and named in the error."""
    V.check_choice(fn, "step", step, tuple(STEP_IDS))
    tau = V.check_positive_number(fn, "tau", tau)
    rho = V.check_positive_number(fn, "rho", rho, allow_zero=True)
    delta = V.check_positive_number(fn, "delta", delta, allow_zero=True)
    start = V.check_finite_number(fn, "start", start)
    if offset is not None:
        offset = V.check_finite_number(fn, "offset", offset)
    return StepParams(STEP_IDS[step], tau, rho, delta, start, offset, fn=fn)


@dataclass(frozen=True)
class GradedParams(StepParams):
    """StepParams of the graded family (H-AP, NDCG) plus HAPPIER's smoothed H-rank
    (docs/design.md §1.2): with `hrank`, rank_pos's exact step H is replaced, for a
    competitor whose ordering key is above the ranked item's, by

        h+(d) = leak * d              for d <= 0
              = 1                     for d > 0 when gamma > 1
              = min(beta * d + gamma, 1)  for d > 0 otherwise

    (HAPPIER's `step_hrank`); its slope is leak, then 0 or beta (0 where the min is 1)."""

    hrank: bool = False
    beta: float = 0.0
    gamma: float = 0.0
    leak: float = 0.0

    def as_op_args(self):
        return super().as_op_args() + (bool(self.hrank), float(self.beta), float(self.gamma), float(self.leak))

    def check_dtype(self, dtype: torch.dtype) -> None:
        super().check_dtype(dtype)
        big = torch.finfo(compute_dtype(dtype)).max
        for name, v in (("beta", self.beta), ("gamma", self.gamma), ("leak", self.leak)):
            if not abs(v) <= big:
                raise ValueError(f"{self.fn}: `{name}` must be finite in {compute_dtype(dtype)} for {dtype} scores, "
                                 f"got {v!r}")


def make_graded_params(
    fn: str, step: str, tau: float, rho: float, delta: float, start: float, offset: Optional[float],
    with_hrank: bool = False, beta: Optional[float] = None, gamma: Optional[float] = None,
    leak: Optional[float] = None,
) -> GradedParams:
    """The GradedParams of a public call. with_hrank needs step="suprank" (HAPPIER's H-rank
    replaces the exact step, which only SupRank has) and all three of beta, gamma, leak: HAPPIER
    gives them no defaults either, and a guessed default would be a silent configuration."""
    base = make_params(fn, step, tau, rho, delta, start, offset)
    if type(with_hrank) is not bool:
        raise TypeError(f"{fn}: `with_hrank` must be a bool, got {with_hrank!r}")
    if not with_hrank:
        for name, v in (("beta", beta), ("gamma", gamma), ("leak", leak)):
            if v is not None:
                raise ValueError(f"{fn}: `{name}` is a parameter of the smoothed H-rank; pass with_hrank=True "
                                 f"to use it (got {name}={v!r} with with_hrank=False)")
        return GradedParams(base.step, base.tau, base.rho, base.delta, base.start, base.offset, fn=fn)
    if base.step != SUPRANK:
        raise ValueError(f"{fn}: with_hrank=True needs step='suprank' (the smoothed H-rank replaces SupRank's "
                         f"exact step in rank_pos), got step={step!r}")
    missing = [name for name, v in (("beta", beta), ("gamma", gamma), ("leak", leak)) if v is None]
    if missing:
        raise ValueError(f"{fn}: with_hrank=True needs `beta`, `gamma` and `leak` (HAPPIER's step_hrank has no "
                         f"defaults for them); missing: {', '.join(missing)}")
    beta = V.check_positive_number(fn, "beta", beta, allow_zero=True)
    gamma = V.check_finite_number(fn, "gamma", gamma)
    leak = V.check_positive_number(fn, "leak", leak, allow_zero=True)
    return GradedParams(base.step, base.tau, base.rho, base.delta, base.start, base.offset, fn=fn,
                        hrank=True, beta=beta, gamma=gamma, leak=leak)


@dataclass(frozen=True)
class HistParams:
    """Parameters of the soft histograms (docs/design.md §1.3): score s maps to the bin
    coordinate v = scale * s + shift on `bins` centres 0..bins-1."""

    bins: int  # L, the number of bin centres
    scale: float  # v = scale * s + shift
    shift: float
    open_ends: bool
    fn: str = field(default="fastrank.histogram_ap", compare=False)  # for error messages

    def as_op_args(self):
        return (int(self.bins), float(self.scale), float(self.shift), bool(self.open_ends))

    def check_dtype(self, dtype: torch.dtype) -> None:
        """The kernels map scores to bins in the compute dtype (float32 for float16/bfloat16/float32):
        a scale or shift that is not finite there makes inf * s - inf = NaN of every score, and a
        zero scale 0 * inf = NaN of an infinite one. Both come from a `range` too narrow (or too
        far out) for the bins."""
        big = torch.finfo(compute_dtype(dtype)).max
        if not (0 < abs(self.scale) <= big and abs(self.shift) <= big):
            raise ValueError(
                f"{self.fn}: `range` gives the bin map v = {self.scale!r} * s + {self.shift!r}, which needs a "
                f"non-zero scale and both finite in {compute_dtype(dtype)} for {dtype} scores; widen the range "
                f"or use fewer bins"
            )
