"""What the losses share after the op (docs/design.md §1.4): division that keeps masked
entries out of the gradient, NaN per query, and the reduction over queries."""
from __future__ import annotations

from typing import Optional

import torch

from .problem import RankProblem, dense_valid_mask

Tensor = torch.Tensor


def safe_div(num: Tensor, den: Tensor, keep: Tensor) -> Tensor:
    """num / den where `keep`, 0 elsewhere. Masked-out entries divide by 1, so a masked 0/0
    never leaks NaN into the gradient (torch.where's backward multiplies both branches)."""
    return torch.where(keep, num / torch.where(keep, den, torch.ones_like(den)), num.new_zeros(()))


def nan_poison(scores: Tensor, ignore_idx: Optional[Tensor], ignore_mask: Optional[Tensor]) -> Tensor:
    """(Q,): NaN for a query whose valid (not ignored) items hold a NaN score, 0 elsewhere.

    Added to the per-query value, it keeps NaN in -> NaN out where the formula cannot: a query
    without positives has no ranked item for the kernels' NaN to reach. No host sync. It is a
    constant: a gradient path to `scores` would cost a (Q, N) accumulation in the backward
    (the fused backward allocates only the gradient itself); where a query's value depends on
    its scores, the kernels' NaN already reaches its gradient.
    """
    with torch.no_grad():
        if ignore_idx is None and ignore_mask is None:
            bad = torch.isnan(scores.amax(1))  # amax propagates NaN: one reduction, no (Q, N) temporary
        else:
            q, n = scores.shape
            nan = torch.isnan(scores) & dense_valid_mask(q, n, ignore_idx, ignore_mask, scores.device)
            bad = nan.view(torch.uint8).amax(1) > 0  # on the CPU twice as fast as any(1)
        return torch.where(bad, torch.nan, 0.0).to(scores.dtype)


def reduce_per_query(values: Tensor, scores: Tensor, pb: RankProblem, reduction: str) -> Tensor:
    """Queries without positives count 0 in 'none' and are left out of 'mean' (docs/design.md §1.4);
    a query with a NaN score among its valid items is NaN (and so are 'mean' and 'sum').

    When no query has a positive, 'mean' is 0 and still connected to the graph.
    """
    values = values + nan_poison(scores, pb.ignore_idx, pb.ignore_mask).to(values.dtype)
    return reduce_values(values, pb.n_pos > 0, reduction)


def reduce_values(values: Tensor, has: Tensor, reduction: str) -> Tensor:
    """The reduction of per-query values: 'mean' over the queries where `has` (0, still connected
    to the graph, when there is none), 'sum', or 'none'."""
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.sum() / has.sum().clamp(min=1).to(values.dtype)


def reduce_fused(values: Tensor, count: Tensor, reduction: str, backend: str) -> Tensor:
    """reduce_values for a fused loss op's (score, count) pair: 'mean' over the queries with
    count > 0. On backend 'cpp' that mean is one op (torch.ops.fastrank.ranked_mean: one pass
    forward, one autograd node backward) instead of five ops and two nodes, a tenth of a
    small batch's call; the other backends keep the PyTorch ops."""
    if reduction == "mean" and backend == "cpp":
        return torch.ops.fastrank.ranked_mean(values, count)[0]
    return reduce_values(values, count > 0, reduction)
