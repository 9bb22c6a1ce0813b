"""Reference implementations of the rank-sums primitive (docs/design.md §1.1).

* `naive_rank_sums` builds the Q x N x N tensor of score differences, the way
  the published Smooth-AP and ROADMAP code does, and is differentiated by
  autograd: the oracle of the tests and the baseline of the benchmark.
* `torch_rank_sums_forward` / `torch_rank_sums_backward` evaluate only the rows
  of ranked positives, in blocks whose size is bounded by `FASTRANK_TORCH_CHUNK`
  elements, and recompute the step in the backward pass: the pure-PyTorch
  fallback backend (any device, memory O(Q*N + chunk)).

All functions take the packed problem of `fastrank._problem.RankProblem`:
`pos_idx` (Q, P) int64 holds the column of each ranked positive (-1 = hole);
outputs are (Q, P), zero at holes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _validate as V
from ._step import SIGMOID, StepParams, heaviside, score_diff, sigmoid_tau, suprank_neg

Tensor = torch.Tensor


def dense_positive_mask(pos_idx: Tensor, n: int) -> Tensor:
    """(Q, N) bool mask of ranked positives, from the packed index (holes dropped)."""
    q = pos_idx.shape[0]
    mask = torch.zeros(q, n + 1, dtype=torch.bool, device=pos_idx.device)
    # holes go to the spare column n, so no two writes ever target the same cell
    mask.scatter_(1, torch.where(pos_idx >= 0, pos_idx, n), True)
    return mask[:, :n]


def dense_valid_mask(q: int, n: int, ignore_idx: Optional[Tensor], ignore_mask: Optional[Tensor], device) -> Tensor:
    """(Q, N) bool mask of items that take part in the ranking (not ignored)."""
    valid = torch.ones(q, n + 1, dtype=torch.bool, device=device)
    if ignore_idx is not None:
        valid.scatter_(1, torch.where(ignore_idx >= 0, ignore_idx, n).unsqueeze(1), False)
    valid = valid[:, :n]
    if ignore_mask is not None:
        valid = valid & ~ignore_mask
    return valid


def gather_packed(full: Tensor, pos_idx: Tensor) -> Tensor:
    """(Q, P) packed values full[i, pos_idx[i, p]] of a (Q, N) tensor, 0 at holes."""
    has = pos_idx >= 0
    return torch.where(has, full.gather(1, pos_idx.clamp(min=0)), torch.zeros((), dtype=full.dtype, device=full.device))


def scatter_packed(packed: Tensor, pos_idx: Tensor, n: int) -> Tensor:
    """The inverse of gather_packed: (Q, N) with packed[i, p] at column pos_idx[i, p], 0 elsewhere
    (differentiable w.r.t. packed). Holes go to a spare column n, dropped afterwards."""
    cols = torch.where(pos_idx >= 0, pos_idx, n)
    return packed.new_zeros(packed.shape[0], n + 1).scatter(1, cols, packed)[:, :n]


# --------------------------------------------------------------------------- naive


def naive_rank_sums(
    scores: Tensor,
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: StepParams,
) -> Tuple[Tensor, Tensor]:
    """rank_all, rank_pos through the full (Q, N, N) difference tensor; autograd does the backward.

    sim_diff[i, j, k] = s_ik - s_ij, as in Smooth-AP's `sim_all_repeat - sim_all_repeat.permute(0, 2, 1)`
    and ROADMAP's `quick_forward`; every row j is computed and the positive rows are read afterwards.
    """
    q, n = scores.shape
    pos = dense_positive_mask(pos_idx, n)
    valid = dense_valid_mask(q, n, ignore_idx, ignore_mask, scores.device)
    sim_diff, _ = score_diff(scores.unsqueeze(1), scores.unsqueeze(2))  # (Q, N, N); equal infinities tie
    not_self = ~torch.eye(n, dtype=torch.bool, device=scores.device)
    if params.step == SIGMOID:
        g = sigmoid_tau(sim_diff, params.tau)
        h = g
    else:
        # competitors at least as relevant as j (positives) get the exact step, the others H^-
        h = heaviside(sim_diff)
        g = torch.where(pos.unsqueeze(1), h, suprank_neg(sim_diff, params))
    # where, not multiply: a left-out item takes no part at all, even when its score is NaN
    zero = scores.new_zeros(())
    rank_all = 1 + torch.where(not_self & valid.unsqueeze(1), g, zero).sum(-1)
    rank_pos = 1 + torch.where(not_self & pos.unsqueeze(1), h, zero).sum(-1)
    return gather_packed(rank_all, pos_idx), gather_packed(rank_pos, pos_idx)


# --------------------------------------------------------------------------- torch (chunked)


def _chunk_elements() -> int:
    return V.env_positive_int("FASTRANK_TORCH_CHUNK", 1 << 22)


def _blocks(q: int, p: int, n: int):
    """Yield (q0, q1, p0, p1) blocks of at most ~FASTRANK_TORCH_CHUNK pair evaluations."""
    budget = max(1, _chunk_elements())
    per_row = max(1, p * n)
    if per_row <= budget:
        rows = max(1, budget // per_row)
        for q0 in range(0, q, rows):
            yield q0, min(q, q0 + rows), 0, p
    else:
        cols = max(1, budget // max(1, n))
        for q0 in range(q):
            for p0 in range(0, p, cols):
                yield q0, q0 + 1, p0, min(p, p0 + cols)


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


def torch_rank_sums_forward(
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
    for q0, q1, p0, p1 in _blocks(q, p, n):
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


def torch_rank_sums_backward(
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
    for q0, q1, p0, p1 in _blocks(q, p, n):
        d, tied, has, cidx, comp_valid, comp_pos = _block_terms(scores, pos_idx, valid, pos, q0, q1, p0, p1)
        comp_valid = comp_valid & ~tied  # a tie of two infinities is a constant
        comp_pos = comp_pos & ~tied
        a = grad_rank_all[q0:q1, p0:p1].unsqueeze(2)
        b = grad_rank_pos[q0:q1, p0:p1].unsqueeze(2)
        x = d / params.tau
        in_range = (x >= -50) & (x <= 50)
        sig = sigmoid_tau(d, params.tau)
        dsig = torch.where(in_range, sig * (1 - sig) / params.tau, 0)
        zero = d.new_zeros(())
        if params.step == SIGMOID:
            c = torch.where(comp_valid, a * dsig, zero) + torch.where(comp_pos, b * dsig, zero)
        else:
            dneg = torch.where(d > params.delta, torch.full_like(d, params.rho), dsig)
            c = torch.where(comp_valid & ~comp_pos, a * dneg, zero)
        grad[q0:q1, :n] += c.sum(1)
        grad[q0:q1].scatter_add_(1, torch.where(has, cidx, n), -c.sum(2))
    return grad[:, :n]
