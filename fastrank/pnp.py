"""PNP (Li et al., AAAI 2022, "only penalizing negative instances before positive ones"), an
epilogue on the rank-sums primitive (docs/design.md §1.2).

With the sigmoid step, rank_all - rank_pos of a ranked positive j is the smoothed number of
negatives ranked before it,

    N_before[i,j] = sum_{k valid, k not in P_i} sigma_tau(s_ik - s_ij),

since both sums hold the same 1 and the same positive competitors. PNP penalises a function
f(N_before) of it; no new kernel, so every backend of the primitive runs it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .core import validate as V
from .core.epilogue import reduce_per_query
from .core.params import compute_dtype, make_params
from .core.problem import Target, prepare
from .rank_sums import rank_sums_packed

Tensor = torch.Tensor

#: the paper's (and pytorch-metric-learning's) variant names
VARIANTS = ("Ds", "Dq", "Iu", "Ib", "O")

#: below this b * N_before, b^2 * f_Ib / x^2 = (u - log1p(u)) / u^2 is summed as its series: the
#: direct difference cancels (relative error ~eps/u), and u^2 underflows for a tiny b
_IB_SERIES_BELOW = 0.1
#: terms of that series: the first one left out is below 0.1^17 / 19 of the leading 1/2
_IB_SERIES_TERMS = 17


def _ib_over_x2(u: Tensor) -> Tensor:
    """(u - log1p(u)) / u^2 for u >= 0, accurate to a few ulps everywhere (u = b * N_before)."""
    small = u < _IB_SERIES_BELOW
    # each branch sees only the arguments it is used for: the other one's gradient (an overflowed
    # power, a 0/0) would otherwise reach the sum through torch.where's backward as 0 * inf
    us = torch.where(small, u, torch.zeros_like(u))
    ud = torch.where(small, torch.ones_like(u), u)
    series = torch.zeros_like(us)
    for k in range(_IB_SERIES_TERMS - 1, -1, -1):  # sum_k (-u)^k / (k + 2), Horner
        series = series * -us + 1.0 / (k + 2)
    direct = (ud - torch.log1p(ud)) / ud / ud
    return torch.where(small, series, direct)


def pnp_transform(x: Tensor, variant: str, b: float, alpha: float) -> Tensor:
    """f(N_before) of each PNP variant, elementwise on x >= 0 (f(0) = 0 for every variant).

    O: x.  Ds: log(1 + x).  Dq: 1 - (1 + x)^(-alpha).  Iu: (1 + x) log(1 + x).
    Ib: (b x - log(1 + b x)) / b^2.
    """
    if variant == "O":
        return x
    if variant == "Ds":
        return torch.log1p(x)
    if variant == "Dq":
        # 1 - (1 + x)^-alpha without the cancellation of 1 - (something near 1) for small x
        return -torch.expm1(-alpha * torch.log1p(x))
    if variant == "Iu":
        return (1 + x) * torch.log1p(x)
    if variant == "Ib":
        return x * x * _ib_over_x2(b * x)
    raise ValueError(f"fastrank.pnp: unknown variant {variant!r}")  # pragma: no cover - checked by callers


def check_pnp_args(fn: str, variant, b, alpha, tau, *, tau_name: str = "tau"):
    """(variant, b, alpha, tau) checked, each named in the error: a variant of VARIANTS and finite
    positive numbers (the PML drop-in calls tau `anneal`)."""
    V.check_choice(fn, "variant", variant, VARIANTS)
    b = V.check_positive_number(fn, "b", b)
    alpha = V.check_positive_number(fn, "alpha", alpha)
    tau = V.check_positive_number(fn, tau_name, tau)
    return variant, b, alpha, tau


def _check_in_dtype(fn: str, dtype: torch.dtype, n: int, b: float, alpha: float) -> None:
    """alpha and b * N_before must be finite in the compute dtype: a python float is cast to it, and
    an infinite alpha or b * x turns the x = 0 terms into inf * 0 = NaN."""
    ct = compute_dtype(dtype)
    big = torch.finfo(ct).max
    if not alpha <= big:
        raise ValueError(f"{fn}: `alpha` must be finite in {ct} (<= {big:.3g}) for {dtype} scores, got {alpha!r}")
    if not b * max(n, 1) <= big:
        raise ValueError(f"{fn}: `b` must be at most {big / max(n, 1):.3g} for a gallery of {n} items and "
                         f"{dtype} scores (b * N_before finite in {ct}), got {b!r}")


def pnp(
    scores: Tensor,
    target: Target,
    *,
    variant: str = "O",
    b: float = 2.0,
    alpha: float = 1.0,
    tau: float = 0.01,
    ignore: Optional[Tensor] = None,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    r"""PNP loss (Li et al., AAAI 2022): penalise only the negatives ranked before each positive.

    .. math:: L_i = \frac{1}{|P_i|} \sum_{j \in P_i} f\big(N_{ij}\big), \qquad
              N_{ij} = \sum_{k \notin P_i} \sigma_\tau(s_{ik} - s_{ij})
                     = \mathrm{rank\_all}[i,j] - \mathrm{rank\_pos}[i,j]

    with k over the valid (not ignored) negatives and f per `variant`: ``"O"`` f(x) = x,
    ``"Ds"`` log(1 + x), ``"Dq"`` 1 − (1 + x)^(−alpha), ``"Iu"`` (1 + x) log(1 + x),
    ``"Ib"`` (b x − log(1 + b x)) / b². Returns the loss (lower is better), not a score: for
    ``"Dq"`` the mean is pytorch-metric-learning's 1 − mean (1 + N)^(−alpha).

    Args:
        scores: (Q, N) similarities.
        target: (Q, N) relevance (> 0 = positive) or (query_labels, gallery_labels).
        variant: "O" (default, as in pytorch-metric-learning), "Ds", "Dq", "Iu" or "Ib".
        b: the "Ib" variant's parameter (> 0); alpha: the "Dq" variant's (> 0).
        tau: temperature of the sigmoid (> 0); pytorch-metric-learning calls it `anneal`.
        ignore: None, (Q,) index of one item per query to leave out (-1 = none), or (Q, N) bool mask.
            With a square target and ``ignore=None`` the query is one of its own positives (it is
            never a negative of itself), as in the published code.
        reduction: "mean" (over queries with at least one positive; 0 if there is none),
            "sum", or "none" (per-query loss, 0 for queries without positives).
        backend: see :func:`fastrank.backends`.

    Example:
        >>> emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> labels = torch.arange(8) // 2
        >>> loss = fastrank.pnp(emb @ emb.T, (labels, labels), variant="Dq")
    """
    fn = "fastrank.pnp"
    variant, b, alpha, tau = check_pnp_args(fn, variant, b, alpha, tau)
    V.check_reduction(fn, reduction)
    params = make_params(fn, "sigmoid", tau, 100.0, 0.05, 0.5, None)
    scores, pb, name = prepare(fn, scores, target, ignore, backend)
    _check_in_dtype(fn, scores.dtype, scores.shape[1], b, alpha)
    rank_all, rank_pos = rank_sums_packed(name, scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, params)
    has = pb.pos_idx >= 0
    # rounding can leave a difference of two equal sums an ulp below 0; the count is >= 0 (and
    # "Ib"/"Dq" are defined only above -1/b and -1). where, not clamp: clamp's backward gives a NaN
    # count a zero gradient, where passes NaN through in both directions
    before = rank_all - rank_pos
    before = torch.where(before < 0, before.new_zeros(()), before)
    # NaN in, NaN out in the gradient: the naive and torch backwards give a NaN score's pairs a zero
    # derivative (the clamp of d/tau), and f'(x) = 1 of "O" would then carry no NaN to the rest of
    # the row. The detached (x - x) is 0, or NaN exactly where the count is: same value, and the
    # derivative 1 + (x - x) is NaN only there
    before = before + before * (before - before).detach()
    terms = torch.where(has, pnp_transform(before, variant, b, alpha), before.new_zeros(()))
    per_query = terms.sum(1) / pb.n_pos.clamp(min=1).to(terms.dtype)
    return reduce_per_query(per_query, scores, pb, reduction)
