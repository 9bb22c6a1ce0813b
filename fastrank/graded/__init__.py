"""Graded relevance on the rank-sums primitive (docs/design.md §1.1-1.2): H-AP and NDCG.

Every backend of the binary primitive has a graded twin with the same packed
contract (graded_rank_sums_packed, the op): outputs (Q, P) at the ranked items
pos_idx, relevance (Q, N) passed next to the packed problem. The family's anatomy
(docs/design.md §2.1): the public functions and the op here; naive.py (the cube, the
tests' oracle); chunked.py (the `torch` backend); triton_kernels/graded.py;
csrc/cpu/graded_rank_sums.cpp and csrc/cuda/graded_rank_sums.cu
(torch.ops.fastrank.graded_rank_sums_fwd / _bwd).

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
from typing import Optional, Sequence, Tuple

import torch

from ..core import validate as V
from ..core.backend import use_fused
from ..core.epilogue import reduce_per_query, reduce_values, safe_div
from ..core.params import GradedParams, make_graded_params
from ..core.problem import RankProblem, build_problem, check_call, gather_packed, ignore_args, prepare, scatter_packed
from ..core.registry import run, run_loss

Tensor = torch.Tensor

HIERARCHY_MODES = ("shared_prefix", "shared_levels")
#: column order of hierarchical labels: column 0 the coarsest level, or column 0 the finest (HAPPIER's files)
HIERARCHY_ORDERS = ("coarsest_first", "finest_first")
#: what relevance_from_hierarchy returns: the shared level itself, or one of HAPPIER's relevances of it
RELEVANCE_KINDS = ("levels", "pop", "map")


# --------------------------------------------------------------------------- relevance helper


def relevance_from_hierarchy(
    query_labels: Tensor,
    gallery_labels: Tensor,
    mode: str = "shared_prefix",
    *,
    order: Optional[str] = None,
    relevance: str = "levels",
    alpha: float = 1.0,
    weights: Optional[Sequence[float]] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(Q, N) graded relevance from hierarchical integer labels.

    Args:
        query_labels: (Q, L) integer labels, one column per level of the hierarchy.
        gallery_labels: (N, L) integer labels, same levels in the same columns.
        mode: how levels are counted.

            * ``"shared_prefix"`` (default; the form of HAPPIER / SupRank for hierarchical
              labels): the number of levels, from the coarsest, on which query and item
              agree, stopping at the first disagreement. Two items of the same species get
              L, same genus but another species L-1, ..., another family 0.
            * ``"shared_levels"``: the number of levels on which they agree, anywhere
              (for label matrices whose columns are independent attributes rather than a tree).

        order: which end of the columns is the coarsest level, required where it changes the
            result (``"shared_prefix"`` with L >= 2; there is no default, because reading one
            order as the other silently gives wrong relevances):

            * ``"coarsest_first"``: column 0 the coarsest level (e.g. family), column L-1
              the finest (e.g. species);
            * ``"finest_first"``: column 0 the finest level, column L-1 the coarsest, as in
              HAPPIER's label files (``[class, super_class]`` for SOP).

            Optional (and only checked) for ``"shared_levels"`` and for L = 1.
        relevance: what to return, from the shared level t_ij in {0, ..., L} of each pair:

            * ``"levels"`` (default): t_ij itself.
            * ``"pop"``: HAPPIER's "pop" relevance, (t/(L-1))^alpha divided by the number of
              items of row i at level t (so each level's items share its weight; needs L >= 2).
            * ``"map"``: HAPPIER's "map" relevance, sum over m = 1..t of weights[m-1] divided by
              the number of items of row i at level >= m (`weights`: L numbers).

            Counts run over the whole gallery row, the query's own entry included when it is
            in the gallery, as in HAPPIER. For HAPPIER's loss pass the levels as the ordering
            key: ``h_ap(scores, rel_pop, key=levels)``.
        alpha: exponent of ``"pop"`` (HAPPIER's `alpha`), finite and >= 0.
        weights: the L level weights of ``"map"`` (HAPPIER passes them as `alpha`), finite, >= 0.
        dtype: floating dtype of the result.

    Returns:
        (Q, N) relevance, 0 = irrelevant; in {0, ..., L} for ``"levels"``.

    Example:
        >>> q = torch.tensor([[0, 0, 0]]); g = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
        >>> relevance_from_hierarchy(q, g, order="coarsest_first")
        tensor([[3., 2., 1., 0.]])
        >>> relevance_from_hierarchy(q.flip(1), g.flip(1), order="finest_first")
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
    if order is not None:
        V.check_choice(fn, "order", order, HIERARCHY_ORDERS)
    elif mode == "shared_prefix" and query_labels.shape[1] >= 2:
        raise ValueError(
            f"{fn}: `order` is required for mode='shared_prefix' with {query_labels.shape[1]} levels: "
            "order='coarsest_first' (column 0 = coarsest level, e.g. family) or order='finest_first' "
            "(column 0 = finest level, as in HAPPIER's label files)"
        )
    qlab = query_labels.to(torch.int64)
    glab = gallery_labels.to(torch.int64)
    if order == "finest_first":
        # the prefix is counted from the coarsest level: read the columns from the last one
        qlab, glab = qlab.flip(1), glab.flip(1)
    V.check_choice(fn, "relevance", relevance, RELEVANCE_KINDS)
    n_levels = qlab.shape[1]
    if relevance == "pop":
        alpha = V.check_positive_number(fn, "alpha", alpha, allow_zero=True)
        if n_levels < 2:
            raise ValueError(f"{fn}: relevance='pop' needs at least 2 levels (its weights are (t/(L-1))^alpha), "
                             f"got L = {n_levels}")
    if weights is not None and relevance != "map":
        raise ValueError(f"{fn}: `weights` are the level weights of relevance='map', got relevance={relevance!r}")
    if relevance == "map":
        if weights is None:
            raise ValueError(f"{fn}: relevance='map' needs `weights`, one per level ({n_levels} numbers)")
        weights = [V.check_positive_number(fn, "weights", w, allow_zero=True) for w in weights]
        if len(weights) != n_levels:
            raise ValueError(f"{fn}: `weights` must hold one weight per level ({n_levels}), got {len(weights)}")
    q, n = qlab.shape[0], glab.shape[0]
    # the level counts are integers: exact in float64, whatever the dtype asked for
    work = torch.float64 if relevance != "levels" else dtype
    rel = torch.zeros(q, n, dtype=work, device=qlab.device)
    alive = torch.ones(q, n, dtype=torch.bool, device=qlab.device)
    # one level at a time: memory O(Q*N), never (Q, N, L)
    for level in range(n_levels):
        eq = qlab[:, level].unsqueeze(1) == glab[:, level].unsqueeze(0)
        if mode == "shared_prefix":
            alive = alive & eq
            rel += alive
        else:
            rel += eq
    if relevance == "levels":
        return rel
    return _happier_relevance(rel, n_levels, relevance, alpha, weights).to(dtype)


def _happier_relevance(levels: Tensor, n_levels: int, kind: str, alpha: float, weights) -> Tensor:
    """HAPPIER's "pop" / "map" relevance of (Q, N) float64 levels in {0, ..., L}, per row."""
    table = levels.new_zeros(levels.shape[0], n_levels + 1)  # [i, t]: the relevance of level t in row i
    counts = torch.stack([(levels == t).sum(1) for t in range(n_levels + 1)], 1).to(levels.dtype)
    if kind == "pop":
        w = torch.tensor([(t / (n_levels - 1)) ** alpha for t in range(n_levels + 1)], dtype=levels.dtype,
                         device=levels.device)
        # a level no item of the row has gets no relevance (nothing reads it)
        table = torch.where(counts > 0, w / counts.clamp(min=1), table)
    else:
        at_least = counts.flip(1).cumsum(1).flip(1)  # [i, m]: items at level >= m
        w = torch.tensor([0.0] + list(weights), dtype=levels.dtype, device=levels.device)
        share = torch.where(at_least > 0, w / at_least.clamp(min=1), table)
        share[:, 0] = 0
        table = share.cumsum(1)
    return table.gather(1, levels.long())


def _check_multi_hot(fn: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: `{name}` must be a 2-D multi-hot tensor (rows x labels), got {V._describe(x)}")
    if x.dtype != torch.bool and x.dtype not in V.INT_DTYPES and not x.is_floating_point():
        raise TypeError(f"{fn}: `{name}` must be a bool, integer or floating multi-hot tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{fn}: `{name}` must be 2-D (rows x labels, 1 = the row has the label), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype != torch.bool and x.numel() and not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{fn}: `{name}` must hold only 0 and 1 (a multi-hot matrix), "
                         f"got values in [{x.min().item()}, {x.max().item()}]" +
                         (" and NaN" if x.is_floating_point() and bool(torch.isnan(x).any()) else ""))


def relevance_from_multilabel(
    query_labels: Tensor,
    gallery_labels: Tensor,
    *,
    binary: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(Q, N) relevance for multi-label retrieval from multi-hot label matrices.

    An item is relevant to a query when they share at least one label; its relevance is
    the number of labels they share (``binary=False``, for :func:`h_ap` / :func:`ndcg` and
    the graded modules), or 1 (``binary=True``, a dense target for :func:`fastrank.sup_ap`,
    :func:`fastrank.smooth_ap`, :func:`fastrank.recall_at_k`, ...).

    Args:
        query_labels: (Q, C) multi-hot matrix (bool, or integers / floats in {0, 1}): entry
            [i, c] = 1 when query i has label c.
        gallery_labels: (N, C) multi-hot matrix over the same C labels.
        binary: relevance 1 for every item sharing a label, instead of the count.
        dtype: floating dtype of the result.

    Returns:
        (Q, N) relevance in {0, ..., C} (or {0, 1}), 0 = shares no label.

    Example:
        >>> q = torch.tensor([[1, 1, 0]]); g = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 1]])
        >>> relevance_from_multilabel(q, g)
        tensor([[2., 1., 0.]])
        >>> relevance_from_multilabel(q, g, binary=True)
        tensor([[1., 1., 0.]])
    """
    fn = "fastrank.relevance_from_multilabel"
    _check_multi_hot(fn, "query_labels", query_labels)
    _check_multi_hot(fn, "gallery_labels", gallery_labels)
    if query_labels.shape[1] != gallery_labels.shape[1]:
        raise ValueError(f"{fn}: `query_labels` and `gallery_labels` must have the same number of labels "
                         f"(columns), got {query_labels.shape[1]} and {gallery_labels.shape[1]}")
    if query_labels.device != gallery_labels.device:
        raise ValueError(
            f"{fn}: `query_labels` is on {query_labels.device} but `gallery_labels` is on {gallery_labels.device}"
        )
    if type(binary) is not bool:
        raise TypeError(f"{fn}: `binary` must be a bool, got {binary!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{fn}: `dtype` must be a floating torch.dtype, got {dtype!r}")
    # counts are integers <= C: exact in float64 (and in float32 up to 2^24 labels), and a
    # floating matmul runs on every device (integer matmul does not on CUDA)
    work = torch.float64 if dtype == torch.float64 or query_labels.shape[1] >= 1 << 24 else torch.float32
    rel = query_labels.to(work) @ gallery_labels.to(work).transpose(0, 1)
    if binary:
        rel = (rel > 0).to(work)
    return rel.to(dtype)


# --------------------------------------------------------------------------- the op


def graded_rank_sums_packed(
    backend: str,
    scores: Tensor,
    relevance: Tensor,
    key: Optional[Tensor],
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: GradedParams,
) -> Tuple[Tensor, Tensor]:
    """The op: graded (rank_all, rank_pos), each (Q, P) at the ranked items pos_idx, differentiable
    w.r.t. scores (not relevance or key, constants of the dtype of scores), on the named backend."""
    return run("graded_rank_sums", backend, scores, relevance, key, pos_idx, ignore_idx, ignore_mask, params=params)


def _packed(fn, scores, relevance, key, ignore, backend, params) -> Tuple[Tensor, Tensor, RankProblem]:
    """(rank_all, rank_pos) packed (Q, P) and the problem (its relevance in the kernel dtype)."""
    scores, pb, name = prepare(fn, scores, relevance, ignore, backend, graded=True)
    key = V.check_key(fn, key, scores)
    ra, rp = graded_rank_sums_packed(name, scores, pb.relevance, key, pb.pos_idx, pb.ignore_idx, pb.ignore_mask,
                                     params)
    return ra, rp, pb


#: the `kind` of the fused graded_loss op
_LOSS_KIND = {"h_ap": 0, "ndcg": 1}


def _graded_loss(fn, loss, scores, relevance, key, ignore, reduction, backend, params, epilogue) -> Tensor:
    """The loss per query on the fused graded_loss op (cpp, unless FASTRANK_FUSED=0), else the
    packed rank sums and `epilogue(fn, rank_all, rank_pos, problem)` in PyTorch; reduced."""
    scores, rel, name = check_call(fn, scores, relevance, ignore, backend, graded=True, fused=True,
                                   loss="graded_loss")
    fused = use_fused(name, "graded_loss")
    key = V.check_key(fn, key, scores, values=not fused)
    if fused:
        # one pass per row in C++ (a fixed number of launches in Triton): the ranked items found
        # from the relevance there (no packing), the epilogue and the gradient rows with them; it
        # checks NDCG's gain range on the way (Triton: an out-of-range row is NaN)
        value, n_pos = run_loss("graded_loss", fn, name, scores, rel, key, *ignore_args(ignore), params=params,
                                options=(_LOSS_KIND[loss],))
        return reduce_values(value, n_pos > 0, reduction)
    q, n = scores.shape
    pb = build_problem(relevance, ignore, q, n, scores.device)
    pb.relevance = rel
    ra, rp = graded_rank_sums_packed(name, scores, rel, key, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, params)
    return reduce_per_query(epilogue(fn, ra, rp, pb), scores, pb, reduction)


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
    key: Optional[Tensor] = None,
    with_hrank: bool = False,
    beta: Optional[float] = None,
    gamma: Optional[float] = None,
    leak: Optional[float] = None,
    ignore: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Graded rank sums (rank_all, rank_pos), dense (Q, N), defined where relevance > 0.

    .. math::
        \mathrm{rank\_all}[i,j] = 1 + \sum_{k \ne j\ \mathrm{valid}} g(s_{ik} - s_{ij}), \qquad
        \mathrm{rank\_pos}[i,j] = r_{ij} + \sum_{k \ne j\ \mathrm{valid}} \min(r_{ij}, r_{ik})\, h(s_{ik} - s_{ij})

    step="suprank": h = H (H(0) = 1, no gradient), g = H if key_ik >= key_ij else H^-, where
    the ordering key is the relevance itself unless `key` is given. step="sigmoid": g = h =
    sigma_tau (the key plays no part). Relevance in {0, 1} gives exactly
    :func:`fastrank.rank_sums`. Items with relevance 0 or left out by `ignore` get 0.

    Args:
        scores: (Q, N) similarities, floating (float16/bfloat16 computed in float32).
        relevance: (Q, N) graded relevance >= 0 (floating, integer or bool), finite; no gradient.
            It decides which items are ranked (> 0) and weighs rank_pos.
        key: (Q, N) ordering key (None: `relevance`): which competitors count as less relevant
            than the ranked item (key_ik < key_ij: the smooth bound H^-) and, with `with_hrank`,
            which as more (key_ik > key_ij). HAPPIER compares the hierarchy level an item shares
            with the query and uses the relevance only as a weight: pass the levels here.
            Finite, no gradient.
        with_hrank, beta, gamma, leak: HAPPIER's smoothed H-rank (step="suprank" only): in
            rank_pos, a competitor with a larger key than the ranked item counts
            leak * d for d <= 0 and min(beta * d + gamma, 1) for d > 0 (1 if gamma > 1)
            instead of H(d); the three parameters are then required (HAPPIER has no defaults).
        ignore: None, (Q,) index of one item per query (-1 = none), or (Q, N) bool mask.
        backend: "naive" (cube + autograd), "torch" (chunked), "cpp", "triton", "cuda", or
            None (FASTRANK_BACKEND, else auto: cpp on CPU, cuda/triton on GPU, as for rank_sums).
    """
    fn = "fastrank.graded_rank_sums"
    params = make_graded_params(fn, step, tau, rho, delta, start, offset, with_hrank, beta, gamma, leak)
    ra, rp, pb = _packed(fn, scores, relevance, key, ignore, backend, params)
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
    key: Optional[Tensor] = None,
    with_hrank: bool = False,
    beta: Optional[float] = None,
    gamma: Optional[float] = None,
    leak: Optional[float] = None,
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

    HAPPIER's published loss orders by the hierarchy level an item shares with the query
    and weighs by a relevance computed from it; with relevance not monotone in the level
    (its "pop" relevance on unequal classes) the two orders differ. Reproduce it with
    ``h_ap(scores, relevance, key=levels)``, `levels` and `relevance` from
    :func:`relevance_from_hierarchy` (``relevance="levels"`` and ``relevance="pop"``).
    `key`, `with_hrank`, `beta`, `gamma`, `leak` as in :func:`graded_rank_sums`.

    reduction: "mean" over queries with a relevant item (0 if none has one), "sum",
    or "none" (0 for queries without a relevant item).
    """
    fn = "fastrank.h_ap"
    V.check_reduction(fn, reduction)
    params = make_graded_params(fn, step, tau, rho, delta, start, offset, with_hrank, beta, gamma, leak)
    return _graded_loss(fn, "h_ap", scores, relevance, key, ignore, reduction, backend, params, _h_ap_epilogue)


def _h_ap_epilogue(fn: str, rank_all: Tensor, rank_pos: Tensor, pb: RankProblem) -> Tensor:
    rel = pb.relevance
    # packed (Q, P) sums in column order, as fastrank.ap does (the binary case is bit-exact)
    has = pb.pos_idx >= 0
    ratio = safe_div(rank_pos, rank_all, has)
    total = gather_packed(rel, pb.pos_idx).sum(1)
    return safe_div(ratio.sum(1), total, pb.n_pos > 0)


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
    key: Optional[Tensor] = None,
    ignore: Optional[Tensor] = None,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    r"""Smoothed NDCG on the graded rank sums (SupRank).

    .. math:: \mathrm{DCG}_i = \sum_{j: r_{ij} > 0} \frac{2^{r_{ij}} - 1}{\log_2(1 + \mathrm{rank\_all}[i,j])},
              \qquad \mathrm{NDCG}_i = \mathrm{DCG}_i / \mathrm{IDCG}_i

    IDCG_i is the DCG of the exact ordering: the relevances of the items not left
    out, sorted descending, at ranks 1, 2, .... Only rank_all is used. Returns the
    metric (higher is better). `key` (the ordering key of rank_all's step) and reduction
    as in :func:`h_ap`.
    """
    fn = "fastrank.ndcg"
    V.check_reduction(fn, reduction)
    params = make_graded_params(fn, step, tau, rho, delta, start, offset)
    return _graded_loss(fn, "ndcg", scores, relevance, key, ignore, reduction, backend, params, _ndcg_epilogue)


def _ndcg_epilogue(fn: str, rank_all: Tensor, rank_pos: Tensor, pb: RankProblem) -> Tensor:
    rel = pb.relevance
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
    return safe_div(dcg, idcg, (pb.n_pos > 0) & (idcg > 0))
