"""Learning to rank on (batch, slate) scores: approx NDCG and approx MRR on the fused rank sums.

allRank's ``approxNDCGLoss`` and TF-Ranking's ``ApproxNDCGLoss`` / ``ApproxMRRLoss`` (Qin et
al., "A general approximation framework for direct optimization of information retrieval
measures", 2010) build a (batch, slate, slate) tensor of score differences. The approximate
rank they use is the sigmoid rank sum of :func:`fastrank.graded_rank_sums` with
``step="sigmoid"`` and ``tau = 1 / alpha``:

    rank_j = 1 + sum_{k != j, k not padded} sigmoid(alpha * (s_k - s_j))

so these adapters run them on the fused kernels (never the cube), on every backend:

* :func:`approx_ndcg`: :func:`fastrank.ndcg` with the sigmoid step, gains 2^y - 1, discounts
  log2(1 + rank), the ideal DCG of the sorted labels, padded items left out;
* :func:`approx_mrr`: TF-Ranking's ApproxMRR, sum_j y_j / rank_j over sum_j y_j;
* :func:`approxNDCGLoss`: allRank's function, same signature and value (-mean approx NDCG).

A slate is a row of `scores`; `labels` holds its graded relevance (>= 0), with padding
marked by `padded_value_indicator` (allRank's -1). Padded entries are neither ranked nor
competitors, whatever their score (NaN included).
"""
from __future__ import annotations

from typing import Optional

import torch

from .core import validate as V
from .core.epilogue import nan_poison, reduce_values, safe_div
from .core.params import compute_dtype
from .graded import graded_rank_sums, ndcg

Tensor = torch.Tensor

#: allRank's defaults (allrank.data.dataset_loading.PADDED_Y_VALUE, allrank.models.losses.DEFAULT_EPS)
PADDED_Y_VALUE = -1
DEFAULT_EPS = 1e-10


def _check(fn: str, scores, labels, alpha, padded_value_indicator, reduction) -> tuple:
    """(relevance in the rank dtype, padding mask or None, tau) after every check, named as `fn` names them."""
    V.check_scores(fn, scores)
    V.check_reduction(fn, reduction)
    if not isinstance(labels, Tensor):
        raise TypeError(f"{fn}: `labels` must be a (batch, slate) tensor of graded relevance, "
                        f"got {V._describe(labels)}")
    V.check_storage(fn, "`labels`", labels)
    if tuple(labels.shape) != tuple(scores.shape):
        raise ValueError(f"{fn}: `labels` must have the shape of `scores` {tuple(scores.shape)} (batch, slate), "
                         f"got {tuple(labels.shape)}")
    if labels.device != scores.device:
        raise ValueError(f"{fn}: `labels` is on {labels.device} but `scores` is on {scores.device}")
    if labels.dtype == torch.bool or labels.dtype.is_complex or not (
            labels.dtype.is_floating_point or labels.dtype in V.INT_DTYPES):
        raise TypeError(f"{fn}: `labels` must be a floating or integer tensor, got {labels.dtype}")
    alpha = V.check_positive_number(fn, "alpha", alpha)
    pad_value = V.check_finite_number(fn, "padded_value_indicator", padded_value_indicator)
    big = torch.finfo(compute_dtype(scores.dtype)).max
    # the kernels multiply by alpha = 1/tau: both must be finite in the dtype the ranks are computed in
    if not 1.0 / big <= alpha <= big:
        raise ValueError(f"{fn}: `alpha` must lie in [{1.0 / big:.3g}, {big:.3g}] for {scores.dtype} scores, "
                         f"got {alpha!r}")
    lab = labels.detach()
    pad = lab == pad_value
    if lab.is_floating_point() and not bool(torch.isfinite(lab).all()):
        raise ValueError(f"{fn}: `labels` must be finite (padding is `padded_value_indicator`), got NaN or inf")
    bad = (lab < 0) & ~pad
    if bool(bad.any()):
        raise ValueError(f"{fn}: `labels` must be >= 0 or the padding value {padded_value_indicator!r}, "
                         f"got {lab[bad][0].item()!r}")
    rel_dtype = compute_dtype(scores.dtype)
    rel = torch.where(pad, torch.zeros((), dtype=lab.dtype, device=lab.device), lab).to(rel_dtype)
    return rel, (pad if bool(pad.any()) else None), 1.0 / alpha


def _ideal_dcg(rel: Tensor) -> Tensor:
    """(B,) DCG of each slate's labels sorted descending (padding counts 0), as allRank computes it."""
    top = rel.sort(dim=1, descending=True).values
    disc = torch.log2(torch.arange(2, rel.shape[1] + 2, dtype=rel.dtype, device=rel.device))
    return ((torch.exp2(top) - 1) / disc).sum(1)


def approx_ndcg(
    scores: Tensor,
    labels: Tensor,
    *,
    alpha: float = 1.0,
    eps: float = DEFAULT_EPS,
    padded_value_indicator: float = PADDED_Y_VALUE,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    r"""Approximate NDCG of each slate (Qin et al.; allRank's ``approxNDCGLoss`` formula), fused.

    .. math:: \mathrm{NDCG}_b = \frac{1}{\max(\mathrm{IDCG}_b, \epsilon)} \sum_{j:\ y_{bj} > 0}
              \frac{2^{y_{bj}} - 1}{\log_2(1 + \mathrm{rank}_{bj})}, \qquad
              \mathrm{rank}_{bj} = 1 + \sum_{k \ne j} \sigma(\alpha (s_{bk} - s_{bj}))

    with k over the slate's items that are not padding, and IDCG_b the DCG of its labels
    sorted descending at ranks 1, 2, .... This is :func:`fastrank.ndcg` with
    ``step="sigmoid", tau=1/alpha`` and the padding as `ignore`; `eps` is allRank's guard on
    IDCG (it matters only where 0 < IDCG < eps, i.e. labels below ~1.4e-10).

    It equals allRank's formula except that allRank also floors each sigmoid term at `eps`
    (``sigmoid(...).clamp(min=eps)``): where alpha * (s_j - s_k) > ~23 its rank is larger by
    less than eps per such pair (the tests bound the difference), elsewhere the two agree to
    rounding. TF-Ranking's ApproxNDCG (``alpha`` = 1/temperature, default 10) is the same
    surrogate on slates with a relevant item.

    Returns the metric (higher is better); allRank's loss is ``-approx_ndcg(...)``, or use
    :func:`approxNDCGLoss`.

    Args:
        scores: (B, S) predicted scores, one slate per row (float16/bfloat16 ranked in float32).
        labels: (B, S) graded relevance >= 0 (floating or integer), `padded_value_indicator`
            at padding; no gradient.
        alpha: sigmoid slope of the approximate rank (allRank's default 1).
        eps: lower bound of the ideal DCG (allRank's 1e-10); 0 turns it off.
        padded_value_indicator: the label that marks padding (allRank's -1).
        reduction: "mean" over every slate (a slate without a relevant item, or all padding,
            counts 0, as in allRank's ``torch.mean``), "sum", or "none" ((B,) values, 0 for
            such slates: their NDCG is 0/0 and allRank's eps makes it 0).
        backend: see :func:`fastrank.backends`.
    """
    fn = "fastrank.ltr.approx_ndcg"
    rel, pad, tau = _check(fn, scores, labels, alpha, padded_value_indicator, reduction)
    eps = V.check_positive_number(fn, "eps", eps, allow_zero=True)
    per = ndcg(scores, rel, step="sigmoid", tau=tau, ignore=pad, reduction="none", backend=backend)
    if eps > 0:
        idcg = _ideal_dcg(rel)
        tiny = (idcg > 0) & (idcg < eps)
        # allRank divides by max(IDCG, eps): DCG/IDCG * IDCG/eps where IDCG < eps (x/x is exactly 1 elsewhere)
        per = per * torch.where(tiny, idcg / eps, torch.ones_like(idcg)).to(per.dtype)
    return reduce_values(per, torch.ones_like(per, dtype=torch.bool), reduction)


def approx_mrr(
    scores: Tensor,
    labels: Tensor,
    *,
    alpha: float = 10.0,
    padded_value_indicator: float = PADDED_Y_VALUE,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    r"""Approximate MRR of each slate, as TF-Ranking's ``ApproxMRRLoss`` defines it, fused.

    .. math:: \mathrm{MRR}_b = \frac{\sum_j y_{bj} / \mathrm{rank}_{bj}}{\sum_j y_{bj}}, \qquad
              \mathrm{rank}_{bj} = 1 + \sum_{k \ne j} \sigma(\alpha (s_{bk} - s_{bj}))

    (k over the items that are not padding): the label-weighted mean of the reciprocal
    approximate ranks of the relevant items. With exactly one relevant item per slate (the
    usual MRR setting) it is the reciprocal approximate rank of that item; with several it
    is their (label-weighted) mean, not the reciprocal rank of the first one -- that is
    TF-Ranking's surrogate, and what this returns. Ranks come from
    :func:`fastrank.graded_rank_sums` (``step="sigmoid", tau=1/alpha``).

    TF-Ranking moves padded logits 1000 below the slate's minimum, so they add
    sigmoid(-1000 alpha) ~ 0 to a rank; here padding is left out exactly.

    Args:
        scores: (B, S) predicted scores. labels: (B, S) relevance >= 0, padding marked.
        alpha: sigmoid slope (TF-Ranking's default 10, i.e. temperature 0.1).
        padded_value_indicator: the label that marks padding (-1; TF-Ranking treats every
            label < 0 as padding: pass those as this value).
        reduction: "mean" over every slate (0 for a slate without a relevant item; TF-Ranking
            gives such slates weight 0 instead: average ``reduction="none"`` over the slates
            with a relevant label for its value), "sum", or "none".
        backend: see :func:`fastrank.backends`.

    Returns the metric (higher is better); TF-Ranking's loss is its negative.
    """
    fn = "fastrank.ltr.approx_mrr"
    rel, pad, tau = _check(fn, scores, labels, alpha, padded_value_indicator, reduction)
    rank_all, _ = graded_rank_sums(scores, rel, step="sigmoid", tau=tau, ignore=pad, backend=backend)
    ranked = rel > 0
    rr = safe_div(rel, rank_all, ranked).sum(1)
    total = rel.sum(1)
    per = safe_div(rr, total, total > 0)
    # a NaN score among a slate's items makes it NaN, also where it has no relevant item
    per = per + nan_poison(scores, None, pad).to(per.dtype)
    return reduce_values(per, torch.ones_like(per, dtype=torch.bool), reduction)


def approxNDCGLoss(  # noqa: N802  (allRank's name, for a drop-in import)
    y_pred: Tensor,
    y_true: Tensor,
    eps: float = DEFAULT_EPS,
    padded_value_indicator: float = PADDED_Y_VALUE,
    alpha: float = 1.0,
) -> Tensor:
    """Drop-in for allRank's ``approxNDCGLoss(y_pred, y_true, eps, padded_value_indicator, alpha)``:
    the same arguments and value, ``-mean`` over the slates of :func:`approx_ndcg`, on the
    fused kernels (see :func:`approx_ndcg` for the one difference, allRank's eps floor on
    each sigmoid term)."""
    return -approx_ndcg(y_pred, y_true, alpha=alpha, eps=eps, padded_value_indicator=padded_value_indicator)


__all__ = ["DEFAULT_EPS", "PADDED_Y_VALUE", "approxNDCGLoss", "approx_mrr", "approx_ndcg"]
