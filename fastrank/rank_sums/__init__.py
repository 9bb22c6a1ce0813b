"""The shared primitive: smoothed rank sums of every ranked positive (docs/design.md §1.1).

The family's anatomy (docs/design.md §2.1): the public function and the packed op here,
naive.py (the cube, the oracle), chunked.py (the `torch` backend), Triton in
triton_kernels/rank_sums.py, C++ in csrc/cpu/rank_sums.cpp and csrc/cuda/rank_sums.cu
(torch.ops.fastrank.rank_sums_fwd / _bwd). Its losses: fastrank.ap, fastrank.recall.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..core import validate as V
from ..core.params import StepParams, make_params
from ..core.problem import Target, prepare, scatter_packed
from ..core.registry import run

Tensor = torch.Tensor


class RankSums(NamedTuple):
    """Output of :func:`rank_sums`.

    Dense layout (default): `rank_all`, `rank_pos` are (Q, N), defined at the
    ranked positives and 0 elsewhere; `index` is None. Packed layout: they are
    (Q, P) with `index[i, p]` the column of the p-th positive of query i (-1 = none).
    """

    rank_all: Tensor
    rank_pos: Tensor
    index: Optional[Tensor]


def rank_sums_packed(
    backend: str,
    scores: Tensor,
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: StepParams,
) -> Tuple[Tensor, Tensor]:
    """The op: (rank_all, rank_pos), each (Q, P), differentiable w.r.t. scores, on the named backend."""
    return run("rank_sums", backend, scores, pos_idx, ignore_idx, ignore_mask, params=params)


def rank_sums(
    scores: Tensor,
    target: Target,
    *,
    step: str = "sigmoid",
    tau: float = 0.01,
    rho: float = 100.0,
    delta: float = 0.05,
    start: float = 0.5,
    offset: Optional[float] = None,
    ignore: Optional[Tensor] = None,
    packed: bool = False,
    backend: Optional[str] = None,
) -> RankSums:
    r"""Smoothed ranks of every positive j of every query i, differentiable w.r.t. `scores`.

    .. math::
        \mathrm{rank\_all}[i,j] = 1 + \sum_{k \ne j\ \mathrm{valid}} g(s_{ik} - s_{ij}), \qquad
        \mathrm{rank\_pos}[i,j] = 1 + \sum_{k \in P_i,\ k \ne j} h(s_{ik} - s_{ij})

    `step="sigmoid"` (Smooth-AP): g = h = sigma_tau. `step="suprank"` (ROADMAP):
    positives get the exact step H (H(0) = 1, no gradient), negatives the upper bound
    H^- (sigma_tau for d <= 0, start + sigma_tau up to delta, rho*(d - delta) + offset
    beyond; offset defaults to sigma_tau(delta) + start).

    Args:
        scores: (Q, N) similarities, floating. float16/bfloat16 are computed in float32.
        target: (Q, N) relevance (bool/int/float, > 0 = positive) or a pair
            (query_labels (Q,), gallery_labels (N,)) of integer tensors (positive = same label).
        ignore: None, a (Q,) integer index of one gallery item per query to leave out
            (-1 = none), or a (Q, N) bool mask (True = leave out). Left-out items are
            neither ranked nor competitors.
        packed: return (Q, P) outputs plus the column index instead of (Q, N).
        backend: "naive", "torch", "cpp", ... or None (FASTRANK_BACKEND, else auto).

    Example:
        >>> s = torch.randn(4, 6); labels = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> r = fastrank.rank_sums(s, (labels[:4], labels))
        >>> r.rank_all.shape
        torch.Size([4, 6])
    """
    fn = "fastrank.rank_sums"
    packed = V.check_flag(fn, "packed", packed)
    params = make_params(fn, step, tau, rho, delta, start, offset)
    scores, pb, name = prepare(fn, scores, target, ignore, backend)
    ra, rp = rank_sums_packed(name, scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, params)
    if packed:
        return RankSums(ra, rp, pb.pos_idx)
    n = scores.shape[1]
    return RankSums(scatter_packed(ra, pb.pos_idx, n), scatter_packed(rp, pb.pos_idx, n), None)
