"""Exact retrieval metrics (R@k, mAP@R, R-precision, mAP), chunked over queries.

These are the *evaluation* metrics the losses in fastrank are surrogates of. They are
computed exactly (no smoothing) from a full ranking of the gallery for every query,
``chunk`` queries at a time, so memory is O(chunk * N) rather than O(Q * N): scores, sort
indices and relevance take about 70 bytes per (query, gallery item) pair of a chunk, e.g.
1.4 GB for chunk=1024 against N=20,000 (lower `chunk` for larger galleries). Time is one
stable sort per query row (about 2-5 M gallery items per second per core on CPU).

Notation, for one query i:

* s_ij        similarity of query i and gallery item j (cosine by default; see `similarity`)
* rel_i(r)    1 if the item at rank r (1-based, by decreasing similarity) has the query's label
* P_i         number of positives of query i in the gallery (after the query itself is excluded)
* Prec_i(r)   precision at rank r = (1/r) * sum_{r' <= r} rel_i(r')

Metrics (each is a mean over the queries that have at least one positive):

* R@k          = 1[ sum_{r <= k} rel_i(r) >= 1 ]
  (the "Recall@k" of the metric-learning literature: did a positive make the top k)
* mAP@R        = (1/R) * sum_{r <= R} Prec_i(r) * rel_i(r),   R = P_i
  (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020)
* R-precision  = Prec_i(R),  R = P_i
* mAP          = (1/P_i) * sum_{r <= N} Prec_i(r) * rel_i(r)
  (average precision over the full ranking)

Conventions (documented because the references differ):

* **Ties** are broken *pessimistically*: among gallery items with exactly equal similarity,
  negatives are ranked before positives. The ranking is therefore the worst one that is
  consistent with the scores, and every metric above is the minimum over all tie-breaks
  (the order of tied positives among themselves does not change any of them). A constant
  embedding thus scores the worst case, never a lucky index order. A tie means bit-equal
  similarities as computed: cosines of parallel but unequal vectors can differ in the last bit.
* **Queries without positives** in the gallery are excluded from every mean (they have no
  defined R@k, AP or R). ``retrieval_metrics`` reports how many were used and how many were
  skipped. If no query has a positive, the metric values are NaN.
* **Self-matches**: when the gallery is the query set itself (``gallery_emb=None``) and
  ``exclude_self=True``, query i's own entry is removed from its gallery (the usual
  leave-one-out protocol). With a separate gallery nothing is removed.
* k larger than the gallery is clamped to the gallery size.
* **Magnitudes**: embeddings are first scaled by powers of two that leave every ranking (and
  every tie) unchanged, so 1e20 or 1e-30 embeddings rank as their unit-scale copies instead of
  overflowing or underflowing into all-equal similarities (see `_rescale`). A float32 gallery
  whose rows span more than float32's range is then ranked in float64 (twice the scratch memory).

>>> from fastrank.metrics import retrieval_metrics
>>> m = retrieval_metrics(test_embeddings, test_labels, ks=(1, 5))
>>> m["R@1"], m["mAP@R"], m["mAP"]
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .core import validate as V

Tensor = torch.Tensor
ArrayLike = Union[Tensor, np.ndarray]

SIMILARITIES = ("cosine", "dot", "euclidean")

__all__ = [
    "SIMILARITIES",
    "mean_average_precision",
    "map_at_r",
    "per_query_metrics",
    "recall_at_k",
    "retrieval_metrics",
]


# --------------------------------------------------------------------------- validation


def _describe(x: Any) -> str:
    if isinstance(x, (Tensor, np.ndarray)):
        return f"a {x.dtype} {type(x).__name__} of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"


def _as_tensor(fn: str, name: str, x: Any) -> Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, Tensor):
        return x
    raise TypeError(f"{fn}: `{name}` must be a torch.Tensor or numpy.ndarray, got {_describe(x)}")


def _check_embeddings(fn: str, name: str, x: Any) -> Tensor:
    t = _as_tensor(fn, name, x).detach()
    if not t.is_floating_point():
        raise TypeError(f"{fn}: `{name}` must be a floating-point (n, dim) array, got {_describe(x)}")
    if t.dim() != 2:
        raise ValueError(f"{fn}: `{name}` must be 2-D (n, dim), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{fn}: `{name}` must be non-empty, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{fn}: `{name}` contains NaN or infinite values")
    # exact ranking: never rank in half precision
    return t if t.dtype == torch.float64 else t.float()


def _check_labels(fn: str, name: str, x: Any, n: int, emb_name: str) -> Tensor:
    t = _as_tensor(fn, name, x).detach()
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{fn}: `{name}` must be an integer array of class labels, got {_describe(x)}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{fn}: `{name}` must have shape ({n},), one label per row of `{emb_name}`, "
                         f"got shape {tuple(t.shape)}")
    return t.long()


def _check_chunk(fn: str, chunk: Any) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)):
        raise TypeError(f"{fn}: `chunk` must be a positive integer, got {_describe(chunk)}")
    if chunk < 1:
        raise ValueError(f"{fn}: `chunk` must be >= 1, got {chunk}")
    return int(chunk)


def _prepare(fn: str, query_emb: Any, query_labels: Any, gallery_emb: Any, gallery_labels: Any,
             exclude_self: Any, similarity: Any, chunk: Any) -> Tuple[Tensor, Tensor, Tensor, Tensor, bool, str, int]:
    q = _check_embeddings(fn, "query_emb", query_emb)
    ql = _check_labels(fn, "query_labels", query_labels, q.shape[0], "query_emb")
    if (gallery_emb is None) != (gallery_labels is None):
        raise ValueError(f"{fn}: pass `gallery_emb` and `gallery_labels` together (or neither, to search the "
                         "query set itself)")
    exclude_self = V.check_flag(fn, "exclude_self", exclude_self)
    if not isinstance(similarity, str) or similarity not in SIMILARITIES:
        raise ValueError(f"{fn}: `similarity` must be one of {', '.join(map(repr, SIMILARITIES))}, got {similarity!r}")
    chunk = _check_chunk(fn, chunk)
    if gallery_emb is None:
        g, gl, self_search = q, ql, exclude_self
        g_name = "query_emb"
    else:
        g = _check_embeddings(fn, "gallery_emb", gallery_emb)
        gl = _check_labels(fn, "gallery_labels", gallery_labels, g.shape[0], "gallery_emb")
        if g.shape[1] != q.shape[1]:
            raise ValueError(f"{fn}: `query_emb` and `gallery_emb` must have the same dim, got {q.shape[1]} and "
                             f"{g.shape[1]}")
        if g.device != q.device:
            raise ValueError(f"{fn}: `query_emb` is on {q.device} but `gallery_emb` is on {g.device}")
        self_search = False
        g_name = "gallery_emb"
    dtype = torch.promote_types(q.dtype, g.dtype)
    q, g = q.to(dtype), g.to(dtype)
    ql, gl = ql.to(q.device), gl.to(q.device)
    q, g = _rescale(fn, q, g, similarity, g_name)
    if similarity == "cosine":
        q, g = F.normalize(q, dim=1), F.normalize(g, dim=1)
    return q, ql, g, gl, self_search, similarity, chunk


def _pow2_scale(x: Tensor, exponent: Tensor) -> Tensor:
    """x * 2**exponent in float64, in two factors: 2**1073 alone overflows."""
    half = torch.div(exponent, 2, rounding_mode="floor")
    return x * torch.exp2(half.to(x.dtype)) * torch.exp2((exponent - half).to(x.dtype))


def _max_exponent(x: Tensor, dim: Optional[int]) -> Tensor:
    """e with max|x| in [2**(e-1), 2**e) (0 for zeros), per row (dim=1) or over the whole tensor."""
    top = x.abs().amax(dim=dim, keepdim=True) if dim is not None else x.abs().amax().reshape(1, 1)
    return torch.frexp(top)[1].to(torch.int64)


def _rescale(fn: str, q: Tensor, g: Tensor, similarity: str, g_name: str) -> Tuple[Tensor, Tensor]:
    """Scales by powers of two that no ranking can see, so that similarities neither overflow
    (1e20 embeddings: dot products or squared distances of 1e40) nor underflow (1e-30: a norm of
    0, every similarity equal, every metric its all-ties value).

    cosine ranks are invariant to a scale per row, dot ranks to a scale per query and one for the
    whole gallery, euclidean ranks to one scale for everything. Each is chosen to put the largest
    magnitude in [0.5, 1). Powers of two are exact: for inputs that did not overflow or underflow
    before, every similarity (and so every tie) is the old one times a power of two. A float32
    input whose scaled values do not all fit float32 (a gallery spanning more than float32's range
    once one scale is applied to all of it) is ranked in float64, where they do; a float64 gallery
    that leaves a non-zero row at 0 cannot be ranked and is refused."""
    q64, g64 = q.double(), g.double()
    if similarity == "cosine":
        q64, g64 = _pow2_scale(q64, -_max_exponent(q64, 1)), _pow2_scale(g64, -_max_exponent(g64, 1))
    elif similarity == "dot":
        q64, g64 = _pow2_scale(q64, -_max_exponent(q64, 1)), _pow2_scale(g64, -_max_exponent(g64, None))
    else:
        e = torch.maximum(_max_exponent(q64, None), _max_exponent(g64, None))
        q64, g64 = _pow2_scale(q64, -e), _pow2_scale(g64, -e)
    if q.dtype == torch.float64:
        for name, before, after in (("query_emb", q, q64), (g_name, g, g64)):
            lost = (before != 0).any(1) & (after == 0).all(1)
            if bool(lost.any()):
                raise ValueError(
                    f"{fn}: `{name}` spans more magnitudes than float64 can rank with similarity={similarity!r}: "
                    f"row {int(lost.nonzero()[0])} is non-zero but vanishes next to the largest row "
                    f"(|x| up to {float(before.abs().max()):.3g}); rescale the embeddings"
                )
        return q64, g64
    q32, g32 = q64.to(q.dtype), g64.to(q.dtype)
    if torch.equal(q32.double(), q64) and torch.equal(g32.double(), g64):
        return q32, g32
    return q64, g64


# --------------------------------------------------------------------------- core


def _similarity(q: Tensor, g: Tensor, similarity: str) -> Tensor:
    if similarity == "euclidean":
        # rank by increasing distance; direct differences, not the |q|^2 - 2qg + |g|^2 expansion, which
        # loses precision (and can reorder near neighbours) through cancellation
        return -torch.cdist(q, g, compute_mode="donot_use_mm_for_euclid_dist")
    return q @ g.T


def _sorted_relevance(scores: Tensor, rel: Tensor, valid: Optional[Tensor]) -> Tensor:
    """Relevance (bool, c x N) in ranking order: decreasing score, negatives before positives on ties,
    excluded entries (valid == False) last and never relevant."""
    if valid is not None:
        scores = scores.masked_fill(~valid, -math.inf)
        rel = rel & valid
    # lexicographic order (score desc, rel asc) with two stable sorts: the secondary key first
    perm1 = torch.argsort(rel.to(torch.uint8), dim=1, stable=True)
    s1 = scores.gather(1, perm1)
    r1 = rel.gather(1, perm1)
    perm2 = torch.argsort(s1, dim=1, descending=True, stable=True)
    return r1.gather(1, perm2)


def _chunk_stats(rel_sorted: Tensor, ks: Sequence[int]) -> Dict[str, Tensor]:
    """Per-query metrics of one chunk from its relevance in ranking order (c x N bool).

    Counts are integers held exactly in float64, so every per-query value is the exact
    fraction rounded once or twice: results do not depend on the embeddings' dtype."""
    c, n = rel_sorted.shape
    dtype = torch.float64
    relf = rel_sorted.to(dtype)
    hits = torch.cumsum(relf, dim=1)                                   # positives in the top r
    ranks = torch.arange(1, n + 1, device=rel_sorted.device, dtype=dtype)
    prec_at_hit = hits / ranks * relf                                  # Prec(r) * rel(r)
    num_pos = hits[:, -1]                                              # P_i
    denom = num_pos.clamp(min=1)
    out: Dict[str, Tensor] = {"num_pos": num_pos}
    out["AP"] = prec_at_hit.sum(1) / denom
    within_r = ranks.unsqueeze(0) <= num_pos.unsqueeze(1)              # r <= R = P_i
    out["AP@R"] = (prec_at_hit * within_r).sum(1) / denom
    r_idx = (num_pos.long() - 1).clamp(min=0).unsqueeze(1)
    out["R-precision"] = hits.gather(1, r_idx).squeeze(1) / denom
    for k in ks:
        out[f"R@{k}"] = (hits[:, min(k, n) - 1] > 0).to(dtype)
    return out


def _iter_chunks(q: Tensor, ql: Tensor, g: Tensor, gl: Tensor, self_search: bool, similarity: str,
                 chunk: int, ks: Sequence[int]) -> Iterator[Dict[str, Tensor]]:
    n = g.shape[0]
    for start in range(0, q.shape[0], chunk):
        stop = min(start + chunk, q.shape[0])
        scores = _similarity(q[start:stop], g, similarity)
        rel = ql[start:stop].unsqueeze(1) == gl.unsqueeze(0)
        valid = None
        if self_search:
            rows = torch.arange(stop - start, device=q.device)
            valid = torch.ones(stop - start, n, dtype=torch.bool, device=q.device)
            valid[rows, rows + start] = False
        yield _chunk_stats(_sorted_relevance(scores, rel, valid), ks)


@torch.no_grad()
def per_query_metrics(query_emb: ArrayLike, query_labels: ArrayLike, gallery_emb: Optional[ArrayLike] = None,
                      gallery_labels: Optional[ArrayLike] = None, ks: Sequence[int] = (1, 2, 4, 8),
                      exclude_self: bool = True, chunk: int = 1024, similarity: str = "cosine") -> Dict[str, Tensor]:
    """Every metric for every query, as (Q,) tensors, plus ``num_pos`` (P_i, the query's positives).

    Entries of queries with ``num_pos == 0`` are meaningless (set to 0) and are what
    :func:`retrieval_metrics` leaves out of its means. See the module docstring for the formulas,
    the tie rule and the arguments.

    >>> per_query_metrics(emb, labels)["AP"].shape
    torch.Size([Q])
    """
    fn = "per_query_metrics"
    ks = V.check_ks(fn, ks)
    q, ql, g, gl, self_search, similarity, chunk = _prepare(
        fn, query_emb, query_labels, gallery_emb, gallery_labels, exclude_self, similarity, chunk)
    parts = list(_iter_chunks(q, ql, g, gl, self_search, similarity, chunk, ks))
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


@torch.no_grad()
def retrieval_metrics(query_emb: ArrayLike, query_labels: ArrayLike, gallery_emb: Optional[ArrayLike] = None,
                      gallery_labels: Optional[ArrayLike] = None, ks: Sequence[int] = (1, 2, 4, 8),
                      exclude_self: bool = True, chunk: int = 1024,
                      similarity: str = "cosine") -> Dict[str, Union[float, int]]:
    """Exact R@k for each k in `ks`, mAP@R, R-precision and mAP of `query_emb` against a gallery.

    Args:
        query_emb: (Q, D) float embeddings of the queries (torch tensor or numpy array).
        query_labels: (Q,) integer class labels; gallery items of the same label are positives.
        gallery_emb, gallery_labels: (N, D) and (N,) gallery; both None (default) to search the
            query set itself.
        ks: the k of R@k; each must be >= 1 (k > N is treated as N).
        exclude_self: with ``gallery_emb=None``, remove each query from its own gallery.
            Ignored (nothing removed) with a separate gallery.
        chunk: queries ranked at a time; scratch memory is about ``chunk * N * 70`` bytes.
        similarity: "cosine" (default; embeddings L2-normalised first), "dot", or "euclidean"
            (ranking by increasing Euclidean distance).

    Returns:
        ``{"R@1": ..., "R@2": ..., "mAP@R": ..., "R-precision": ..., "mAP": ...,
        "num_queries": Q_used, "num_skipped": Q - Q_used}``, metrics as floats in [0, 1]
        averaged over the Q_used queries that have at least one positive (NaN if none has).

    Formulas (rel(r): item at rank r is a positive, Prec(r) precision at r, P positives):
        R@k = 1[sum_{r<=k} rel(r) >= 1];  mAP@R = (1/P) sum_{r<=P} Prec(r) rel(r);
        R-precision = Prec(P);  AP = (1/P) sum_r Prec(r) rel(r).
    Ties are broken pessimistically (negatives first), so each value is the worst over tie-breaks.

    >>> m = retrieval_metrics(torch.randn(100, 8), torch.arange(100) % 5)
    >>> sorted(m)
    ['R-precision', 'R@1', 'R@2', 'R@4', 'R@8', 'mAP', 'mAP@R', 'num_queries', 'num_skipped']
    """
    fn = "retrieval_metrics"
    ks = V.check_ks(fn, ks)
    q, ql, g, gl, self_search, similarity, chunk = _prepare(
        fn, query_emb, query_labels, gallery_emb, gallery_labels, exclude_self, similarity, chunk)
    keys = [f"R@{k}" for k in ks] + ["mAP@R", "R-precision", "mAP"]
    src = {f"R@{k}": f"R@{k}" for k in ks}
    src.update({"mAP@R": "AP@R", "R-precision": "R-precision", "mAP": "AP"})
    sums = {key: 0.0 for key in keys}
    used = 0
    for stats in _iter_chunks(q, ql, g, gl, self_search, similarity, chunk, ks):
        has_pos = stats["num_pos"] > 0
        used += int(has_pos.sum())
        for key in keys:
            # float64 accumulation: the mean of many per-query values is exact to ~1e-15
            sums[key] += float(stats[src[key]][has_pos].double().sum())
    out: Dict[str, Union[float, int]] = {key: (sums[key] / used if used else math.nan) for key in keys}
    out["num_queries"] = used
    out["num_skipped"] = q.shape[0] - used
    return out


def recall_at_k(query_emb: ArrayLike, query_labels: ArrayLike, gallery_emb: Optional[ArrayLike] = None,
                gallery_labels: Optional[ArrayLike] = None, ks: Union[int, Sequence[int]] = (1, 2, 4, 8),
                exclude_self: bool = True, chunk: int = 1024, similarity: str = "cosine") -> Dict[int, float]:
    """Exact R@k: fraction of queries (with >= 1 positive) that have a positive among their top k.

    ``R@k = mean_i 1[ sum_{r <= k} rel_i(r) >= 1 ]``, ties broken pessimistically. Not the
    smooth surrogate :func:`fastrank.recall_at_k` (a loss); this is the evaluation metric.
    Arguments as in :func:`retrieval_metrics`; returns ``{k: R@k}``.

    >>> recall_at_k(emb, labels, ks=(1, 10))
    {1: 0.93, 10: 0.99}
    """
    ks = V.check_ks("recall_at_k", ks)
    m = retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks=ks, exclude_self=exclude_self,
                          chunk=chunk, similarity=similarity)
    return {k: m[f"R@{k}"] for k in ks}


def map_at_r(query_emb: ArrayLike, query_labels: ArrayLike, gallery_emb: Optional[ArrayLike] = None,
             gallery_labels: Optional[ArrayLike] = None, exclude_self: bool = True, chunk: int = 1024,
             similarity: str = "cosine") -> float:
    """Exact mAP@R (Musgrave et al., ECCV 2020): ``mean_i (1/R_i) sum_{r <= R_i} Prec_i(r) rel_i(r)``,
    with R_i the number of positives of query i. Arguments as in :func:`retrieval_metrics`.

    >>> map_at_r(emb, labels)
    0.71
    """
    return retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks=(1,), exclude_self=exclude_self,
                             chunk=chunk, similarity=similarity)["mAP@R"]


def mean_average_precision(query_emb: ArrayLike, query_labels: ArrayLike, gallery_emb: Optional[ArrayLike] = None,
                           gallery_labels: Optional[ArrayLike] = None, exclude_self: bool = True, chunk: int = 1024,
                           similarity: str = "cosine") -> float:
    """Exact mAP over the full ranking: ``mean_i (1/P_i) sum_r Prec_i(r) rel_i(r)``, ties broken
    pessimistically. Arguments as in :func:`retrieval_metrics`.

    >>> mean_average_precision(emb, labels)
    0.78
    """
    return retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks=(1,), exclude_self=exclude_self,
                             chunk=chunk, similarity=similarity)["mAP"]
