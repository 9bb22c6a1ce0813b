"""Graded relevance on the rank-sums primitive (docs/design.md §1.1-1.2, issue 9): H-AP and NDCG.

Every backend of the binary primitive has a graded twin with the same packed
contract (fastrank.ops.graded_rank_sums_packed): outputs (Q, P) at the ranked items
pos_idx, relevance (Q, N) passed next to the packed problem.

* `naive`: the (Q, N, N) cube, autograd (this file; the tests' oracle).
* `torch`: chunked over query rows, a custom autograd.Function that recomputes the
  step in the backward pass, memory bounded by FASTRANK_TORCH_CHUNK (this file).
* `cpp`: csrc/cpu/graded_rank_sums.cpp; `cuda`: csrc/cuda/graded_rank_sums.cu;
  `triton`: triton_kernels/graded.py.

Graded primitive, for query i and every *ranked* item j (rel_ij > 0, not ignored),
with d = s_ik - s_ij and k running over the valid (not ignored) items, k != j:

    rank_all[i,j] = 1     + sum_k  g(d; k vs j)
    rank_pos[i,j] = rel_j + sum_k  min(rel_j, rel_k) * h(d)

* step="suprank": h = H (exact step, H(0) = 1, no gradient); g = H when
  rel_k >= rel_j, else the upper bound H^- of docs/design.md §1.1.
* step="sigmoid": g = h = sigma_tau for every competitor (as Smooth-AP).

With relevance in {0, 1} this is exactly :func:`fastrank.rank_sums`. Relevance is
a constant: no gradient flows to it. Outputs are dense (Q, N), 0 at items that
are not ranked (rel = 0 or ignored).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch

from . import _validate as V
from ._backend import CHOICES, resolve
from ._problem import build_problem
from ._step import SIGMOID, StepParams, heaviside, score_diff, sigmoid_tau, suprank_neg
from .ap import reduce_per_query, safe_div
from .ops import graded_rank_sums_packed
from .reference import _blocks, dense_valid_mask, gather_packed, scatter_packed
from .rank_sums import make_params

Tensor = torch.Tensor

HIERARCHY_MODES = ("shared_prefix", "shared_levels")


# --------------------------------------------------------------------------- relevance helper


def relevance_from_hierarchy(
    query_labels: Tensor,
    gallery_labels: Tensor,
    mode: str = "shared_prefix",
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(Q, N) graded relevance from hierarchical integer labels.

    Args:
        query_labels: (Q, L) integer labels, column 0 the coarsest level (e.g. family),
            column L-1 the finest (e.g. species).
        gallery_labels: (N, L) integer labels, same levels.
        mode: how levels are counted.

            * ``"shared_prefix"`` (default; the form of HAPPIER / SupRank for hierarchical
              labels): the number of leading levels, from the coarsest, on which query and
              item agree, stopping at the first disagreement. Two items of the same species
              get L, same genus but another species L-1, ..., another family 0.
            * ``"shared_levels"``: the number of levels on which they agree, anywhere
              (for label matrices whose columns are independent attributes rather than a tree).

        dtype: floating dtype of the result.

    Returns:
        (Q, N) relevance in {0, ..., L}, 0 = irrelevant.

    Example:
        >>> q = torch.tensor([[0, 0, 0]]); g = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
        >>> relevance_from_hierarchy(q, g)
        tensor([[3., 2., 1., 0.]])
        >>> relevance_from_hierarchy(q, g, "shared_levels")
        tensor([[3., 2., 2., 2.]])
    """
    fn = "fastrank.relevance_from_hierarchy"
    for name, lab in (("query_labels", query_labels), ("gallery_labels", gallery_labels)):
        if not isinstance(lab, torch.Tensor):
            raise TypeError(f"{fn}: `{name}` must be a 2-D integer tensor (rows x levels), got {V._describe(lab)}")
        if lab.dtype not in V.INT_DTYPES:
            raise TypeError(f"{fn}: `{name}` must be an integer tensor, got {lab.dtype}")
        if lab.dim() != 2:
            raise ValueError(
                f"{fn}: `{name}` must be 2-D (rows x levels, column 0 = coarsest), got shape {tuple(lab.shape)}; "
                "for a single level use labels.unsqueeze(1)"
            )
    if query_labels.shape[1] != gallery_labels.shape[1]:
        raise ValueError(
            f"{fn}: `query_labels` and `gallery_labels` must have the same number of levels, "
            f"got {query_labels.shape[1]} and {gallery_labels.shape[1]}"
        )
    if query_labels.shape[1] == 0:
        raise ValueError(f"{fn}: the label matrices need at least one level, got shape {tuple(query_labels.shape)}")
    if query_labels.device != gallery_labels.device:
        raise ValueError(
            f"{fn}: `query_labels` is on {query_labels.device} but `gallery_labels` is on {gallery_labels.device}"
        )
    V.check_choice(fn, "mode", mode, HIERARCHY_MODES)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{fn}: `dtype` must be a floating torch.dtype, got {dtype!r}")
    qlab = query_labels.to(torch.int64)
    glab = gallery_labels.to(torch.int64)
    q, n = qlab.shape[0], glab.shape[0]
    rel = torch.zeros(q, n, dtype=dtype, device=qlab.device)
    alive = torch.ones(q, n, dtype=torch.bool, device=qlab.device)
    # one level at a time: memory O(Q*N), never (Q, N, L)
    for level in range(qlab.shape[1]):
        eq = qlab[:, level].unsqueeze(1) == glab[:, level].unsqueeze(0)
        if mode == "shared_prefix":
            alive = alive & eq
            rel += alive
        else:
            rel += eq
    return rel


# --------------------------------------------------------------------------- validation


def check_relevance(fn: str, relevance: Any, scores: Tensor) -> Tensor:
    """(Q, N) graded relevance: floating, integer or bool, finite, >= 0, on the device of scores.

    Returns it detached in the dtype the ranks are computed in (that of scores, float32 for
    half scores), where it is checked as well: a value that does not survive the cast (float64
    1e-50 becomes 0 in float32 and 1e39 inf; a subnormal is flushed on GPUs) is rejected."""
    q, n = scores.shape
    if not isinstance(relevance, torch.Tensor):
        raise TypeError(f"{fn}: `relevance` must be a (Q, N) tensor of graded relevance, got {V._describe(relevance)}")
    if tuple(relevance.shape) != (q, n):
        raise ValueError(f"{fn}: `relevance` must have the shape of scores {(q, n)}, got {tuple(relevance.shape)}")
    if relevance.device != scores.device:
        raise ValueError(f"{fn}: `relevance` is on {relevance.device} but `scores` is on {scores.device}")
    if relevance.dtype.is_complex or not (
        relevance.dtype.is_floating_point or relevance.dtype in V.INT_DTYPES or relevance.dtype == torch.bool
    ):
        raise TypeError(f"{fn}: `relevance` must be a floating or integer tensor, got {relevance.dtype}")
    dtype = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    rel = relevance.detach().to(dtype).contiguous()
    if relevance.dtype == torch.bool or relevance.numel() == 0:
        return rel
    # one reduction pass (aminmax propagates NaN); isfinite + any would take three
    stats = list(torch.aminmax(relevance))
    if relevance.dtype.is_floating_point:  # integers cannot underflow
        stats.append(torch.where(relevance > 0, relevance, torch.inf).amin())
    lo, hi, *smallest = torch.stack(stats).double().tolist()  # one host sync
    if math.isnan(lo) or math.isinf(hi) or math.isinf(lo):
        raise ValueError(f"{fn}: `relevance` must be finite, got NaN or inf values")
    if lo < 0:
        raise ValueError(f"{fn}: `relevance` must be >= 0 (0 = irrelevant), got a minimum of {lo!r}")
    info = torch.finfo(dtype)
    # the cast is monotone: its extremes are the casts of the extremes
    if math.isinf(torch.tensor(hi, dtype=torch.float64).to(dtype).item()):
        raise ValueError(
            f"{fn}: `relevance` has values up to {hi:g}, beyond the largest {dtype} ({info.max:g}), the dtype "
            "the ranks are computed in; rescale the relevance or pass float64 scores"
        )
    if smallest and math.isfinite(smallest[0]) and torch.tensor(smallest[0], dtype=torch.float64).to(dtype) < info.tiny:
        raise ValueError(
            f"{fn}: `relevance` has positive values down to {smallest[0]:g}, below the smallest normal {dtype} "
            f"({info.tiny:g}), the dtype the ranks are computed in (they become 0 or lose their precision); "
            "rescale the relevance or pass float64 scores"
        )
    return rel


def _prepare(fn, scores, relevance, ignore, backend) -> Tuple[Tensor, Tensor, str, Any]:
    """Validates; returns (scores in a kernel dtype, relevance in that dtype, backend, packed problem).

    The ranked items (relevance > 0, not ignored) are packed into pos_idx exactly as the
    positives of a binary target are, so the kernels share the binary ops' layout."""
    V.check_scores(fn, scores)
    rel = check_relevance(fn, relevance, scores)
    V.check_ignore(fn, ignore, scores)
    V.check_backend(fn, backend, CHOICES)
    name = resolve(fn, backend, scores.device)
    q, n = scores.shape
    pb = build_problem(relevance, ignore, q, n, scores.device)
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    return scores, rel, name, pb


def _packed(fn, scores, relevance, ignore, backend, params) -> Tuple[Tensor, Tensor, Tensor, Any]:
    """(rank_all, rank_pos) packed (Q, P), the relevance in the kernel dtype, and the problem."""
    scores, rel, name, pb = _prepare(fn, scores, relevance, ignore, backend)
    ra, rp = graded_rank_sums_packed(name, scores, rel, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, params)
    return ra, rp, rel, pb


# --------------------------------------------------------------------------- naive


def naive_graded_rank_sums(scores: Tensor, rel: Tensor, valid: Tensor, params: StepParams) -> Tuple[Tensor, Tensor]:
    """The (Q, N, N) cube, every row j computed, autograd does the backward. Oracle of the tests."""
    q, n = scores.shape
    ranked = valid & (rel > 0)
    sim_diff, _ = score_diff(scores.unsqueeze(1), scores.unsqueeze(2))  # [i, j, k] = s_ik - s_ij
    not_self = ~torch.eye(n, dtype=torch.bool, device=scores.device)
    rel_j = rel.unsqueeze(2)
    rel_k = rel.unsqueeze(1)
    if params.step == SIGMOID:
        g = sigmoid_tau(sim_diff, params.tau)
        h = g
    else:
        h = heaviside(sim_diff)
        g = torch.where(rel_k >= rel_j, h, suprank_neg(sim_diff, params))
    zero = scores.new_zeros(())
    comp = not_self & valid.unsqueeze(1)
    ra = 1 + torch.where(comp, g, zero).sum(-1)
    rp = rel + torch.where(comp, torch.minimum(rel_j, rel_k) * h, zero).sum(-1)
    return torch.where(ranked, ra, zero), torch.where(ranked, rp, zero)


# --------------------------------------------------------------------------- torch (chunked)
#
# Works on the ranked items only, as the binary torch backend does: blocks of
# (query rows, ranked items) x N pairs, so Q * P * N work rather than the cube's Q * N * N.


def _block_terms(scores, rel, valid, pos_idx, q0, q1, p0, p1):
    s = scores[q0:q1]  # (Qc, N)
    r = rel[q0:q1]
    idx = pos_idx[q0:q1, p0:p1]  # (Qc, Pc)
    has = idx >= 0
    cidx = idx.clamp(min=0)
    d, tied = score_diff(s.unsqueeze(1), s.gather(1, cidx).unsqueeze(2))  # (Qc, Pc, N): s_ik - s_ij
    rel_j = r.gather(1, cidx).unsqueeze(2)
    rel_k = r.unsqueeze(1)
    n = s.shape[1]
    not_self = torch.arange(n, device=s.device).view(1, 1, n) != cidx.unsqueeze(2)
    comp = valid[q0:q1].unsqueeze(1) & not_self & has.unsqueeze(2)
    return d, tied, rel_j, rel_k, comp, has, cidx


def torch_graded_packed_forward(scores, rel, pos_idx, ignore_idx, ignore_mask, params) -> Tuple[Tensor, Tensor]:
    """(rank_all, rank_pos) (Q, P) at the ranked items pos_idx, 0 at holes."""
    q, n = scores.shape
    scores = scores.detach()
    valid = dense_valid_mask(q, n, ignore_idx, ignore_mask, scores.device)
    rank_all = scores.new_zeros(pos_idx.shape)
    rank_pos = scores.new_zeros(pos_idx.shape)
    for q0, q1, p0, p1 in _blocks(q, pos_idx.shape[1], n):
        d, _, rel_j, rel_k, comp, has, _ = _block_terms(scores, rel, valid, pos_idx, q0, q1, p0, p1)
        zero = d.new_zeros(())
        w = torch.minimum(rel_j, rel_k)
        if params.step == SIGMOID:
            g = sigmoid_tau(d, params.tau)
            ra = torch.where(comp, g, zero).sum(-1)
            rp = torch.where(comp, w * g, zero).sum(-1)
        else:
            h = heaviside(d)
            ra = torch.where(comp, torch.where(rel_k >= rel_j, h, suprank_neg(d, params)), zero).sum(-1)
            rp = torch.where(comp, w * h, zero).sum(-1)
        rank_all[q0:q1, p0:p1] = torch.where(has, 1 + ra, zero)
        rank_pos[q0:q1, p0:p1] = torch.where(has, rel_j.squeeze(2) + rp, zero)
    return rank_all, rank_pos


def torch_graded_packed_backward(
    grad_all, grad_pos, scores, rel, pos_idx, ignore_idx, ignore_mask, params
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
    for q0, q1, p0, p1 in _blocks(q, pos_idx.shape[1], n):
        d, tied, rel_j, rel_k, comp, _, cidx = _block_terms(scores, rel, valid, pos_idx, q0, q1, p0, p1)
        comp = comp & ~tied  # a tie of two infinities is a constant
        a = grad_all[q0:q1, p0:p1].unsqueeze(2)
        zero = d.new_zeros(())
        x = d / params.tau
        in_range = (x >= -50) & (x <= 50)
        sig = sigmoid_tau(d, params.tau)
        dsig = torch.where(in_range, sig * (1 - sig) / params.tau, zero)
        if params.step == SIGMOID:
            b = grad_pos[q0:q1, p0:p1].unsqueeze(2)
            c = torch.where(comp, (a + b * torch.minimum(rel_j, rel_k)) * dsig, zero)
        else:
            dneg = torch.where(d > params.delta, torch.full_like(d, params.rho), dsig)
            c = torch.where(comp & (rel_k < rel_j), a * dneg, zero)
        grad[q0:q1] += c.sum(1)
        # ranked columns are unique within a row; holes add an exact 0 (their c is 0)
        grad[q0:q1].scatter_add_(1, cidx, -c.sum(2))
    return grad


def _ranked_index(rel: Tensor, valid: Tensor) -> Tensor:
    """pos_idx of the ranked items (relevance > 0, valid), as build_problem packs them."""
    return build_problem(valid & (rel > 0), None, rel.shape[0], rel.shape[1], rel.device).pos_idx


def torch_graded_forward(scores: Tensor, rel: Tensor, valid: Tensor, params: StepParams) -> Tuple[Tensor, Tensor]:
    """Dense (Q, N) form of torch_graded_packed_forward (0 where not ranked), for tests and references."""
    pos_idx = _ranked_index(rel, valid)
    ign = ~valid
    ra, rp = torch_graded_packed_forward(scores, rel, pos_idx, None, ign, params)
    n = scores.shape[1]
    return scatter_packed(ra, pos_idx, n), scatter_packed(rp, pos_idx, n)


def torch_graded_backward(
    grad_all: Tensor, grad_pos: Tensor, scores: Tensor, rel: Tensor, valid: Tensor, params: StepParams
) -> Tensor:
    """Dense (Q, N) form of torch_graded_packed_backward: gradients of the dense rank sums."""
    pos_idx = _ranked_index(rel, valid)
    ga, gp = gather_packed(grad_all, pos_idx), gather_packed(grad_pos, pos_idx)
    return torch_graded_packed_backward(ga, gp, scores, rel, pos_idx, None, ~valid, params)


# ---- the packed contract of fastrank.ops.graded_rank_sums_packed


def naive_graded_packed(scores, rel, pos_idx, ignore_idx, ignore_mask, params) -> Tuple[Tensor, Tensor]:
    valid = dense_valid_mask(scores.shape[0], scores.shape[1], ignore_idx, ignore_mask, scores.device)
    ra, rp = naive_graded_rank_sums(scores, rel, valid, params)
    return gather_packed(ra, pos_idx), gather_packed(rp, pos_idx)


# --------------------------------------------------------------------------- public API


def graded_rank_sums(
    scores: Tensor,
    relevance: Tensor,
    *,
    step: str = "suprank",
    tau: float = 0.01,
    rho: float = 100.0,
    delta: float = 0.05,
    start: float = 0.5,
    offset: Optional[float] = None,
    ignore: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Graded rank sums (rank_all, rank_pos), dense (Q, N), defined where relevance > 0.

    .. math::
        \mathrm{rank\_all}[i,j] = 1 + \sum_{k \ne j\ \mathrm{valid}} g(s_{ik} - s_{ij}), \qquad
        \mathrm{rank\_pos}[i,j] = r_{ij} + \sum_{k \ne j\ \mathrm{valid}} \min(r_{ij}, r_{ik})\, h(s_{ik} - s_{ij})

    step="suprank": h = H (H(0) = 1, no gradient), g = H if r_ik >= r_ij else H^-.
    step="sigmoid": g = h = sigma_tau. Relevance in {0, 1} gives exactly
    :func:`fastrank.rank_sums`. Items with relevance 0 or left out by `ignore` get 0.

    Args:
        scores: (Q, N) similarities, floating (float16/bfloat16 computed in float32).
        relevance: (Q, N) graded relevance >= 0 (floating, integer or bool), finite; no gradient.
        ignore: None, (Q,) index of one item per query (-1 = none), or (Q, N) bool mask.
        backend: "naive" (cube + autograd), "torch" (chunked), "cpp", "triton", "cuda", or
            None (FASTRANK_BACKEND, else auto: cpp on CPU, cuda/triton on GPU, as for rank_sums).
    """
    fn = "fastrank.graded_rank_sums"
    params = make_params(fn, step, tau, rho, delta, start, offset)
    ra, rp, _, pb = _packed(fn, scores, relevance, ignore, backend, params)
    n = scores.shape[1]
    return scatter_packed(ra, pb.pos_idx, n), scatter_packed(rp, pb.pos_idx, n)


def h_ap(
    scores: Tensor,
    relevance: Tensor,
    *,
    step: str = "suprank",
    tau: float = 0.01,
    rho: float = 100.0,
    delta: float = 0.05,
    start: float = 0.5,
    offset: Optional[float] = None,
    ignore: Optional[Tensor] = None,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    r"""H-AP (HAPPIER, Ramzi et al., ECCV 2022): AP for graded relevance.

    .. math:: \mathrm{H\text{-}AP}_i = \frac{\sum_{j: r_{ij} > 0} \mathrm{rank\_pos}[i,j] / \mathrm{rank\_all}[i,j]}
                                          {\sum_j r_{ij}}

    with the ranks of :func:`graded_rank_sums` (sums over items not left out by
    `ignore`). Binary relevance gives :func:`fastrank.sup_ap` (step="suprank") or
    :func:`fastrank.smooth_ap` (step="sigmoid"). Returns the metric (higher is
    better): use ``1 - h_ap(...)`` as a loss.

    reduction: "mean" over queries with a relevant item (0 if none has one), "sum",
    or "none" (0 for queries without a relevant item).
    """
    fn = "fastrank.h_ap"
    V.check_reduction(fn, reduction)
    params = make_params(fn, step, tau, rho, delta, start, offset)
    rank_all, rank_pos, rel, pb = _packed(fn, scores, relevance, ignore, backend, params)
    # packed (Q, P) sums in column order, as fastrank.ap does (the binary case is bit-exact)
    has = pb.pos_idx >= 0
    ratio = safe_div(rank_pos, rank_all, has)
    total = gather_packed(rel, pb.pos_idx).sum(1)
    ap = safe_div(ratio.sum(1), total, pb.n_pos > 0)
    return reduce_per_query(ap, scores, pb, reduction)


def _check_gain_range(fn: str, rel: Tensor) -> None:
    """The gain 2^rel - 1 must be finite in the computation dtype (fp32: rel < 128)."""
    if rel.numel() == 0:
        return
    top = float(rel.max())
    limit = math.log2(torch.finfo(rel.dtype).max)
    if top >= limit:
        raise ValueError(
            f"{fn}: `relevance` up to {top:g} overflows the gain 2^rel - 1 in {rel.dtype} (needs rel < {limit:.0f}); "
            "rescale the relevance or pass float64 scores"
        )


def ndcg(
    scores: Tensor,
    relevance: Tensor,
    *,
    step: str = "suprank",
    tau: float = 0.01,
    rho: float = 100.0,
    delta: float = 0.05,
    start: float = 0.5,
    offset: Optional[float] = None,
    ignore: Optional[Tensor] = None,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    r"""Smoothed NDCG on the graded rank sums (SupRank).

    .. math:: \mathrm{DCG}_i = \sum_{j: r_{ij} > 0} \frac{2^{r_{ij}} - 1}{\log_2(1 + \mathrm{rank\_all}[i,j])},
              \qquad \mathrm{NDCG}_i = \mathrm{DCG}_i / \mathrm{IDCG}_i

    IDCG_i is the DCG of the exact ordering: the relevances of the items not left
    out, sorted descending, at ranks 1, 2, .... Only rank_all is used. Returns the
    metric (higher is better). reduction as in :func:`h_ap`.
    """
    fn = "fastrank.ndcg"
    V.check_reduction(fn, reduction)
    params = make_params(fn, step, tau, rho, delta, start, offset)
    rank_all, _, rel, pb = _packed(fn, scores, relevance, ignore, backend, params)
    _check_gain_range(fn, rel)
    # the ranked items (relevance > 0, not ignored) are exactly the packed ones
    has = pb.pos_idx >= 0
    zero = rel.new_zeros(())
    r = gather_packed(rel, pb.pos_idx)
    # 2^r - 1 rounds to 0 for r below ~1e-7 in float32: expm1 keeps small gains; exp2 keeps the
    # large ones exact up to the limit _check_gain_range allows
    gain = torch.where(has, torch.where(r < 1, torch.expm1(r * math.log(2)), torch.exp2(r) - 1), zero)
    # NDCG is a ratio of sums of gains: scaling a row by its largest gain changes nothing but
    # keeps those sums finite where several gains near the dtype's largest value would overflow
    if gain.shape[1]:  # P = 0 when nothing is ranked anywhere
        top = gain.amax(1, keepdim=True)
        gain = gain / torch.where(top > 0, top, torch.ones_like(top))
    # rank_all >= 1 where ranked; log2(2) = 1 at holes keeps the masked terms finite
    disc = torch.log2(1 + torch.where(has, rank_all, torch.ones_like(rank_all)))
    dcg = torch.where(has, gain / disc, zero).sum(1)
    ideal_gain = gain.sort(dim=1, descending=True).values
    ideal_disc = torch.log2(torch.arange(2, gain.shape[1] + 2, dtype=rel.dtype, device=rel.device))
    idcg = (ideal_gain / ideal_disc).sum(1)
    has = pb.n_pos > 0
    value = safe_div(dcg, idcg, has & (idcg > 0))
    return reduce_per_query(value, scores, pb, reduction)
