"""The `torch` backend of the graded rank sums: the ranked items only, as the binary `torch`
backend does, in blocks of (query rows, ranked items) x N pairs (Q * P * N work rather than the
cube's Q * N * N), a custom backward that recomputes the step; memory bounded by
FASTRANK_TORCH_CHUNK (docs/design.md §1.1). `dense_forward` / `dense_backward` are the same on
the dense (Q, N) layout, the reference of the Triton kernel tests."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core.chunks import blocks
from ..core.params import SIGMOID, StepParams
from ..core.problem import build_problem, dense_valid_mask, gather_packed, scatter_packed
from ..core.step import (heaviside, hrank_plus, hrank_plus_grad, score_diff, sigmoid_tau, sigmoid_tau_grad,
                         suprank_neg, suprank_neg_grad)

Tensor = torch.Tensor


def _block_terms(scores, rel, key, valid, pos_idx, q0, q1, p0, p1):
    s = scores[q0:q1]  # (Qc, N)
    r = rel[q0:q1]
    kr = r if key is None else key[q0:q1]
    idx = pos_idx[q0:q1, p0:p1]  # (Qc, Pc)
    has = idx >= 0
    cidx = idx.clamp(min=0)
    d, tied = score_diff(s.unsqueeze(1), s.gather(1, cidx).unsqueeze(2))  # (Qc, Pc, N): s_ik - s_ij
    rel_j = r.gather(1, cidx).unsqueeze(2)
    rel_k = r.unsqueeze(1)
    n = s.shape[1]
    not_self = torch.arange(n, device=s.device).view(1, 1, n) != cidx.unsqueeze(2)
    comp = valid[q0:q1].unsqueeze(1) & not_self & has.unsqueeze(2)
    # the ordering key of the competitor against the ranked item's: above (> 0), equal, below
    kj = kr.gather(1, cidx).unsqueeze(2)
    kk = kr.unsqueeze(1)
    return d, tied, rel_j, rel_k, (kk >= kj), (kk > kj), comp, has, cidx


def forward(scores, rel, key, pos_idx, ignore_idx, ignore_mask, params) -> Tuple[Tensor, Tensor]:
    """(rank_all, rank_pos) (Q, P) at the ranked items pos_idx, 0 at holes."""
    q, n = scores.shape
    scores = scores.detach()
    valid = dense_valid_mask(q, n, ignore_idx, ignore_mask, scores.device)
    rank_all = scores.new_zeros(pos_idx.shape)
    rank_pos = scores.new_zeros(pos_idx.shape)
    for q0, q1, p0, p1 in blocks(q, pos_idx.shape[1], n):
        d, _, rel_j, rel_k, not_below, above, comp, has, _ = _block_terms(
            scores, rel, key, valid, pos_idx, q0, q1, p0, p1)
        zero = d.new_zeros(())
        w = torch.minimum(rel_j, rel_k)
        if params.step == SIGMOID:
            g = sigmoid_tau(d, params.tau)
            ra = torch.where(comp, g, zero).sum(-1)
            rp = torch.where(comp, w * g, zero).sum(-1)
        else:
            h = heaviside(d)
            ra = torch.where(comp, torch.where(not_below, h, suprank_neg(d, params)), zero).sum(-1)
            if getattr(params, "hrank", False):
                h = torch.where(above, hrank_plus(d, params), h)
            rp = torch.where(comp, w * h, zero).sum(-1)
        rank_all[q0:q1, p0:p1] = torch.where(has, 1 + ra, zero)
        rank_pos[q0:q1, p0:p1] = torch.where(has, rel_j.squeeze(2) + rp, zero)
    return rank_all, rank_pos


def backward(
    grad_all, grad_pos, scores, rel, key, pos_idx, ignore_idx, ignore_mask, params
) -> Tensor:
    """d L / d scores (Q, N) given the packed gradients of rank_all and rank_pos (None = zeros),
    recomputing the step per block (docs/design.md §1.1 backward)."""
    q, n = scores.shape
    scores = scores.detach()
    valid = dense_valid_mask(q, n, ignore_idx, ignore_mask, scores.device)
    zeros = scores.new_zeros(pos_idx.shape)
    grad_all = zeros if grad_all is None else grad_all.to(scores.dtype)
    grad_pos = zeros if grad_pos is None else grad_pos.to(scores.dtype)
    grad = torch.zeros(q, n, dtype=scores.dtype, device=scores.device)
    for q0, q1, p0, p1 in blocks(q, pos_idx.shape[1], n):
        d, tied, rel_j, rel_k, not_below, above, comp, _, cidx = _block_terms(
            scores, rel, key, valid, pos_idx, q0, q1, p0, p1)
        comp = comp & ~tied  # a tie of two infinities is a constant
        a = grad_all[q0:q1, p0:p1].unsqueeze(2)
        zero = d.new_zeros(())
        if params.step == SIGMOID:
            b = grad_pos[q0:q1, p0:p1].unsqueeze(2)
            c = torch.where(comp, (a + b * torch.minimum(rel_j, rel_k)) * sigmoid_tau_grad(d, params.tau), zero)
        else:
            c = torch.where(comp & ~not_below, a * suprank_neg_grad(d, params), zero)
            if getattr(params, "hrank", False):
                b = grad_pos[q0:q1, p0:p1].unsqueeze(2)
                c = c + torch.where(comp & above, b * torch.minimum(rel_j, rel_k) * hrank_plus_grad(d, params), zero)
        grad[q0:q1] += c.sum(1)
        # ranked columns are unique within a row; holes add an exact 0 (their c is 0)
        grad[q0:q1].scatter_add_(1, cidx, -c.sum(2))
    return grad


def _ranked_index(rel: Tensor, valid: Tensor) -> Tensor:
    """pos_idx of the ranked items (relevance > 0, valid), as build_problem packs them."""
    return build_problem(valid & (rel > 0), None, rel.shape[0], rel.shape[1], rel.device).pos_idx


def dense_forward(scores: Tensor, rel: Tensor, valid: Tensor, params: StepParams,
                  key: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Dense (Q, N) form of forward (0 where not ranked), for tests and references."""
    pos_idx = _ranked_index(rel, valid)
    ign = ~valid
    ra, rp = forward(scores, rel, key, pos_idx, None, ign, params)
    n = scores.shape[1]
    return scatter_packed(ra, pos_idx, n), scatter_packed(rp, pos_idx, n)


def dense_backward(
    grad_all: Tensor, grad_pos: Tensor, scores: Tensor, rel: Tensor, valid: Tensor, params: StepParams,
    key: Optional[Tensor] = None,
) -> Tensor:
    """Dense (Q, N) form of backward: gradients of the dense rank sums."""
    pos_idx = _ranked_index(rel, valid)
    ga, gp = gather_packed(grad_all, pos_idx), gather_packed(grad_pos, pos_idx)
    return backward(ga, gp, scores, rel, key, pos_idx, None, ~valid, params)
