"""The `torch` backend of the rank sums: only the rows of ranked positives, in blocks of at most
~FASTRANK_TORCH_CHUNK pair evaluations, the step recomputed in the backward pass. The
pure-PyTorch fallback (any device, memory O(Q*N + chunk)); docs/design.md §1.1.

Both functions take the packed problem (docs/design.md §3): `pos_idx` (Q, P) int64 holds the
column of each ranked positive (-1 = hole); outputs are (Q, P), zero at holes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core.chunks import blocks
from ..core.params import SIGMOID, StepParams
from ..core.problem import dense_positive_mask, dense_valid_mask
from ..core.step import heaviside, score_diff, sigmoid_tau, sigmoid_tau_grad, suprank_neg, suprank_neg_grad

Tensor = torch.Tensor


def _block_terms(scores, pos_idx, valid, pos, q0, q1, p0, p1):
    s = scores[q0:q1]  # (Qc, N)
    idx = pos_idx[q0:q1, p0:p1]  # (Qc, Pc)
    has = idx >= 0
    cidx = idx.clamp(min=0)
    sj = s.gather(1, cidx)
    d, tied = score_diff(s.unsqueeze(1), sj.unsqueeze(2))  # (Qc, Pc, N): s_ik - s_ij
    n = s.shape[1]
    not_self = torch.arange(n, device=s.device).view(1, 1, n) != cidx.unsqueeze(2)
    comp_valid = valid[q0:q1].unsqueeze(1) & not_self & has.unsqueeze(2)
    comp_pos = pos[q0:q1].unsqueeze(1) & comp_valid
    return d, tied, has, cidx, comp_valid, comp_pos


def forward(
    scores: Tensor,
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: StepParams,
) -> Tuple[Tensor, Tensor]:
    q, n = scores.shape
    p = pos_idx.shape[1]
    pos = dense_positive_mask(pos_idx, n)
    valid = dense_valid_mask(q, n, ignore_idx, ignore_mask, scores.device)
    rank_all = torch.zeros(q, p, dtype=scores.dtype, device=scores.device)
    rank_pos = torch.zeros_like(rank_all)
    for q0, q1, p0, p1 in blocks(q, p, n):
        d, _, has, _, comp_valid, comp_pos = _block_terms(scores, pos_idx, valid, pos, q0, q1, p0, p1)
        zero = d.new_zeros(())
        if params.step == SIGMOID:
            g = sigmoid_tau(d, params.tau)
            ra = torch.where(comp_valid, g, zero).sum(-1)
            rp = torch.where(comp_pos, g, zero).sum(-1)
        else:
            h = heaviside(d)
            rp = torch.where(comp_pos, h, zero).sum(-1)
            ra = rp + torch.where(comp_valid & ~comp_pos, suprank_neg(d, params), zero).sum(-1)
        rank_all[q0:q1, p0:p1] = torch.where(has, 1 + ra, 0)
        rank_pos[q0:q1, p0:p1] = torch.where(has, 1 + rp, 0)
    return rank_all, rank_pos


def backward(
    grad_rank_all: Tensor,
    grad_rank_pos: Tensor,
    scores: Tensor,
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: StepParams,
) -> Tensor:
    """d L / d scores from d L / d rank_all and d L / d rank_pos, recomputing the step per block."""
    q, n = scores.shape
    p = pos_idx.shape[1]
    pos = dense_positive_mask(pos_idx, n)
    valid = dense_valid_mask(q, n, ignore_idx, ignore_mask, scores.device)
    # spare column n absorbs the scatter of holes
    grad = torch.zeros(q, n + 1, dtype=scores.dtype, device=scores.device)
    for q0, q1, p0, p1 in blocks(q, p, n):
        d, tied, has, cidx, comp_valid, comp_pos = _block_terms(scores, pos_idx, valid, pos, q0, q1, p0, p1)
        comp_valid = comp_valid & ~tied  # a tie of two infinities is a constant
        comp_pos = comp_pos & ~tied
        a = grad_rank_all[q0:q1, p0:p1].unsqueeze(2)
        b = grad_rank_pos[q0:q1, p0:p1].unsqueeze(2)
        zero = d.new_zeros(())
        if params.step == SIGMOID:
            dsig = sigmoid_tau_grad(d, params.tau)
            c = torch.where(comp_valid, a * dsig, zero) + torch.where(comp_pos, b * dsig, zero)
        else:
            c = torch.where(comp_valid & ~comp_pos, a * suprank_neg_grad(d, params), zero)
        grad[q0:q1, :n] += c.sum(1)
        grad[q0:q1].scatter_add_(1, torch.where(has, cidx, n), -c.sum(2))
    return grad[:, :n]
