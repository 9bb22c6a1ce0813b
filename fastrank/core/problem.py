"""From user inputs (dense relevance or labels, ignore) to the packed problem the kernels take
(docs/design.md §3), and the conversions between the packed and the dense layout.

Kernels never see labels or a dense relevance: they get `pos_idx` (Q, P), the
columns of each query's ranked positives (-1 = hole, P = the largest count), and
the ignore information. For labels this is built by sorting the gallery labels
once, so no (Q, N) mask is ever formed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from . import validate as V
from .backend import CHOICES, resolve, use_fused

Tensor = torch.Tensor
Target = Union[Tensor, Sequence[Tensor]]


@dataclass
class RankProblem:
    pos_idx: Tensor  # (Q, P) int64, -1 = hole; columns ascending within a row
    n_pos: Tensor  # (Q,) int64 number of ranked positives per query
    ignore_idx: Optional[Tensor]  # (Q,) int64 or None
    ignore_mask: Optional[Tensor]  # (Q, N) bool or None
    #: graded family: (Q, N) relevance in the compute dtype (validate.check_relevance); else None
    relevance: Optional[Tensor] = None


def _pack_rows(rows: Tensor, cols: Tensor, counts: Tensor, q: int, device) -> Tensor:
    """Scatter (row, col) pairs, sorted by row, into a (Q, max count) table padded with -1."""
    p = int(counts.max()) if counts.numel() else 0
    out = torch.full((q, p), -1, dtype=torch.int64, device=device)
    if rows.numel():
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(rows.numel(), device=device) - starts[rows]
        out[rows, slot] = cols
    return out


def _positives_from_labels(qlab: Tensor, glab: Tensor) -> Tensor:
    q, n = qlab.shape[0], glab.shape[0]
    glab = glab.to(torch.int64)
    qlab = qlab.to(torch.int64)
    order = torch.argsort(glab, stable=True)
    sorted_g = glab[order]
    lo = torch.searchsorted(sorted_g, qlab, right=False)
    hi = torch.searchsorted(sorted_g, qlab, right=True)
    counts = hi - lo
    p = int(counts.max()) if q else 0
    ar = torch.arange(p, device=qlab.device)
    take = (lo.unsqueeze(1) + ar).clamp(max=max(n - 1, 0))
    # the stable sort keeps equal labels in column order, so rows come out ascending
    return torch.where(ar < counts.unsqueeze(1), order[take], -1)


def _drop_ignored(pos_idx: Tensor, ignore_idx: Optional[Tensor], ignore_mask: Optional[Tensor]) -> Tensor:
    if ignore_idx is None and ignore_mask is None:
        return pos_idx
    has = pos_idx >= 0
    drop = torch.zeros_like(has)
    if ignore_idx is not None:
        drop |= pos_idx == ignore_idx.unsqueeze(1)
    if ignore_mask is not None:
        drop |= ignore_mask.gather(1, pos_idx.clamp(min=0)) & has
    if not bool(drop.any()):
        return pos_idx
    n_big = torch.iinfo(torch.int64).max
    key = torch.where(has & ~drop, pos_idx, n_big)
    key = key.sort(dim=1).values  # kept columns first, still ascending
    keep = key != n_big
    width = int(keep.sum(1).max()) if key.shape[0] else 0
    return torch.where(keep, key, -1)[:, :width]


def ignore_args(ignore: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(ignore_idx int64, ignore_mask bool): the one of the two forms `ignore` takes, the other None."""
    if ignore is None:
        return None, None
    if ignore.dtype == torch.bool:
        return None, ignore.contiguous()
    return ignore.to(torch.int64).contiguous(), None


def target_args(target: Target) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(query_labels, gallery_labels, relevance) as the fused loss ops take a target: a label
    pair or a dense relevance, the other None."""
    if isinstance(target, (tuple, list)):
        return target[0], target[1], None
    return None, None, target


def build_problem(target: Target, ignore: Optional[Tensor], q: int, n: int, device) -> RankProblem:
    """Packs positives and ignore; arguments must already be validated (fastrank.core.validate)."""
    ignore_idx, ignore_mask = ignore_args(ignore)
    if isinstance(target, (tuple, list)):
        # labels never meet the ignore information until here
        pos_idx = _drop_ignored(_positives_from_labels(target[0], target[1]), ignore_idx, ignore_mask)
    else:  # the dense mask drops ignored items before packing
        pos = target if target.dtype == torch.bool else target > 0
        if ignore_mask is not None:
            pos = pos & ~ignore_mask
        if ignore_idx is not None:
            pos = pos.clone()
            rows = torch.nonzero(ignore_idx >= 0).squeeze(1)
            pos[rows, ignore_idx[rows]] = False
        nz = pos.nonzero()
        # counts from the nonzero rows: O(nnz), where pos.sum(1) casts all Q*N bools (~150 ms at 8192^2)
        counts = torch.bincount(nz[:, 0], minlength=q)
        pos_idx = _pack_rows(nz[:, 0], nz[:, 1], counts, q, device)
    n_pos = (pos_idx >= 0).sum(1)
    return RankProblem(pos_idx.contiguous(), n_pos, ignore_idx, ignore_mask)


def dense_relevance(target: Target, q: int, n: int) -> Tensor:
    """(Q, N) bool positives; only for elementwise losses (calibration) that are O(Q*N) anyway."""
    if isinstance(target, (tuple, list)):
        # as int64: torch has no type promotion for uint16/32/64, even against each other
        return target[0].to(torch.int64).unsqueeze(1) == target[1].to(torch.int64).unsqueeze(0)
    return target if target.dtype == torch.bool else target > 0


def prepare(
    fn: str,
    scores: Tensor,
    target: Target,
    ignore: Optional[Tensor],
    backend: Optional[str],
    *,
    graded: bool = False,
) -> Tuple[Tensor, RankProblem, str]:
    """Validates the arguments every op shares (check_call), then packs the problem; returns
    (scores in a kernel dtype, packed problem, backend name).

    graded=True: `target` is a graded (Q, N) relevance, checked as such and kept in
    `problem.relevance`; its ranked items (> 0, not ignored) are packed into pos_idx exactly as
    the positives of a binary target are, so both families share one layout."""
    scores, rel, name = check_call(fn, scores, target, ignore, backend, graded=graded)
    q, n = scores.shape
    problem = build_problem(target, ignore, q, n, scores.device)
    if graded:
        problem.relevance = rel
    return scores, problem, name


def check_call(
    fn: str,
    scores: Tensor,
    target: Target,
    ignore: Optional[Tensor],
    backend: Optional[str],
    *,
    graded: bool = False,
    fused: bool = False,
    loss: Optional[str] = None,
) -> Tuple[Tensor, Optional[Tensor], str]:
    """Validates the arguments every op shares; returns (scores in a kernel dtype, the graded
    relevance in that dtype or None, backend name). The fused loss ops take the target as given
    from here, without packing.

    fused=True: the caller has a fused loss op, which checks the values of the target and of
    the ignore index itself, in its pass over the row. Where that op will run (`use_fused`),
    the passes over the data are left to it: always the target's NaN scan, and, while
    torch.compile traces, the ignore index's range (its host sync would break the graph; in
    eager it stays here, an O(Q) check with the clearer message). `loss` names the fused op (a
    LOSS_OPS name) for `use_fused`; on `triton` and `cuda` its kernels take the ignore index's
    range too (an out-of-range entry makes its query NaN, no host sync), and on `triton` half
    scores as they are (the CUDA op takes them cast to float32, as here)."""
    V.check_scores(fn, scores)
    V.check_backend(fn, backend, CHOICES)
    name = resolve(fn, backend, scores.device)
    in_op = fused and use_fused(name, loss)
    on_device = in_op and name in ("triton", "cuda")
    if graded:
        rel = V.check_relevance(fn, target, scores, values=not in_op)
    else:
        rel = None
        V.check_target(fn, target, scores, values=not in_op)
    V.check_ignore(fn, ignore, scores, values=not (in_op and (on_device or torch.compiler.is_compiling())))
    # half inputs: differences are formed in fp32 (fp16 spacing near 1 is ~0.1 tau); the fused
    # Triton kernels read half scores and form them in fp32 themselves
    if scores.dtype in (torch.float16, torch.bfloat16) and not (on_device and name == "triton"):
        scores = scores.float()
    return scores, rel, name


# --------------------------------------------------------------------------- layout conversions


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
