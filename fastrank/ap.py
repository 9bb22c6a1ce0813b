"""Average-precision losses on the rank-sums primitive (docs/design.md §1.2): Smooth-AP, SupAP, calibration.

Each is an epilogue on (Q, P) packed ranks: AP_i = (1/|P_i|) sum_{j in P_i} rank_pos / rank_all.
"""
from __future__ import annotations

from typing import Optional

import torch

from .core import validate as V
from .core.backend import use_fused
from .core.epilogue import reduce_fused, reduce_per_query, safe_div
from .core.params import make_params
from .core.problem import Target, build_problem, check_call, dense_relevance, dense_valid_mask, ignore_args, target_args
from .core.registry import run_loss
from .rank_sums import rank_sums_packed

Tensor = torch.Tensor


def _average_precision(fn: str, scores, target, ignore, reduction, backend, params) -> Tensor:
    V.check_reduction(fn, reduction)
    scores, _, name = check_call(fn, scores, target, ignore, backend, fused=True, loss="ap_loss")
    if use_fused(name, "ap_loss"):
        # one pass per row in C++ (a fixed number of launches in Triton): no packing, no
        # epilogue here, the gradient rows computed with it
        ap, n_pos = run_loss("ap_loss", fn, name, scores, *target_args(target), *ignore_args(ignore), params=params)
        return reduce_fused(ap, n_pos, reduction, name)
    q, n = scores.shape
    pb = build_problem(target, ignore, q, n, scores.device)
    rank_all, rank_pos = rank_sums_packed(name, scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, params)
    has = pb.pos_idx >= 0
    ratio = safe_div(rank_pos, rank_all, has)  # holes have rank_all = 0
    ap = ratio.sum(1) / pb.n_pos.clamp(min=1).to(ratio.dtype)
    return reduce_per_query(ap, scores, pb, reduction)


def smooth_ap(
    scores: Tensor,
    target: Target,
    *,
    tau: float = 0.01,
    ignore: Optional[Tensor] = None,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    r"""Smooth-AP (Brown et al., ECCV 2020): AP with the ranking step replaced by sigma_tau.

    .. math:: \mathrm{AP}_i = \frac{1}{|P_i|} \sum_{j \in P_i}
              \frac{1 + \sum_{k \in P_i, k \ne j} \sigma_\tau(s_{ik} - s_{ij})}
                   {1 + \sum_{k \ne j} \sigma_\tau(s_{ik} - s_{ij})}

    Returns the AP (higher is better), not a loss: use ``1 - smooth_ap(...)``.

    Args:
        scores: (Q, N) similarities.
        target: (Q, N) relevance (> 0 = positive) or (query_labels, gallery_labels).
        tau: temperature of the sigmoid (> 0).
        ignore: None, (Q,) index of one item per query to leave out (-1 = none), or (Q, N) bool mask.
            With a square target and ``ignore=None`` the query counts as its own positive and
            competitor, as in the published code; pass ``torch.arange(Q)`` to leave it out.
        reduction: "mean" (over queries with at least one positive; 0 if there is none),
            "sum", or "none" (per-query AP, 0 for queries without positives).
        backend: see :func:`fastrank.backends`.

    Example:
        >>> emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> labels = torch.arange(8) // 2
        >>> loss = 1 - fastrank.smooth_ap(emb @ emb.T, (labels, labels))
    """
    fn = "fastrank.smooth_ap"
    params = make_params(fn, "sigmoid", tau, 100.0, 0.05, 0.5, None)
    return _average_precision(fn, scores, target, ignore, reduction, backend, params)


def sup_ap(
    scores: Tensor,
    target: Target,
    *,
    tau: float = 0.01,
    rho: float = 100.0,
    delta: float = 0.05,
    start: float = 0.5,
    offset: Optional[float] = None,
    ignore: Optional[Tensor] = None,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    r"""SupAP (ROADMAP, Ramzi et al., NeurIPS 2021): AP with the SupRank upper-bound step.

    Same formula as :func:`smooth_ap`, with positives ranked by the exact step H
    (H(0) = 1, no gradient) and negatives by H^-: sigma_tau(d) for d <= 0,
    start + sigma_tau(d) on (0, delta], rho * (d - delta) + offset beyond
    (offset = sigma_tau(delta) + start unless given). Defaults are ROADMAP's.

    Example:
        >>> emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> labels = torch.arange(8) // 2
        >>> loss = 1 - fastrank.sup_ap(emb @ emb.T, (labels, labels))
    """
    fn = "fastrank.sup_ap"
    params = make_params(fn, "suprank", tau, rho, delta, start, offset)
    return _average_precision(fn, scores, target, ignore, reduction, backend, params)


def calibration_loss(
    scores: Tensor,
    target: Target,
    *,
    pos_margin: float = 0.9,
    neg_margin: float = 0.6,
    ignore: Optional[Tensor] = None,
) -> Tensor:
    r"""ROADMAP's calibration term: a contrastive loss averaged over its non-zero terms.

    .. math:: \mathrm{mean}_{nz}\,[m_+ - s_{ij}]_+ \text{ over positive pairs}
              + \mathrm{mean}_{nz}\,[s_{ik} - m_-]_+ \text{ over negative pairs}

    Each mean runs over the pairs whose term is non-zero (0 if there is none).
    Left-out pairs (`ignore`) count as neither; pass ``torch.arange(Q)`` to exclude
    self pairs (with L2-normalised embeddings s_ii = 1 >= pos_margin, so a self pair's
    term is 0 and drops out of the mean either way). Elementwise: O(Q*N).

    Example:
        >>> loss = fastrank.calibration_loss(scores, (labels, labels), ignore=torch.arange(len(labels)))
    """
    fn = "fastrank.calibration_loss"
    V.check_scores(fn, scores)
    V.check_target(fn, target, scores)
    V.check_ignore(fn, ignore, scores)
    pos_margin = V.check_finite_number(fn, "pos_margin", pos_margin)
    neg_margin = V.check_finite_number(fn, "neg_margin", neg_margin)
    q, n = scores.shape
    pos = dense_relevance(target, q, n)
    ignore_idx = None if ignore is None or ignore.dtype == torch.bool else ignore.to(torch.int64)
    ignore_mask = ignore if ignore is not None and ignore.dtype == torch.bool else None
    valid = dense_valid_mask(q, n, ignore_idx, ignore_mask, scores.device)
    zero = scores.new_zeros(())
    # where, not multiply: a NaN at a left-out pair must not reach the sums (NaN * 0 = NaN)
    pos_terms = torch.where(pos & valid, torch.relu(pos_margin - scores), zero)
    neg_terms = torch.where(~pos & valid, torch.relu(scores - neg_margin), zero)
    pos_loss = pos_terms.sum() / (pos_terms > 0).sum().clamp(min=1)
    neg_loss = neg_terms.sum() / (neg_terms > 0).sum().clamp(min=1)
    return pos_loss + neg_loss
