"""Recall@k surrogates on the rank-sums primitive (docs/design.md §1.2): SupRank's and Patel et al.'s.

Both are epilogues on rank_all of the ranked positives; no new kernel.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .core import validate as V
from .core.backend import use_fused
from .core.epilogue import reduce_fused, reduce_per_query
from .core.params import make_params
from .core.problem import Target, build_problem, check_call, ignore_args, target_args
from .core.registry import run_loss
from .rank_sums import rank_sums_packed

Tensor = torch.Tensor

VARIANTS = ("suprank", "patel")
_DEFAULT_STEP = {"suprank": "suprank", "patel": "sigmoid"}


def recall_at_k(
    scores: Tensor,
    target: Target,
    *,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    tau: float = 0.01,
    temp: float = 1.0,
    step: Optional[str] = None,
    variant: str = "suprank",
    rho: float = 100.0,
    delta: float = 0.05,
    start: float = 0.5,
    offset: Optional[float] = None,
    ignore: Optional[Tensor] = None,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    r"""Smooth Recall@k averaged over `ks` (higher is better; the loss is ``1 - recall_at_k(...)``).

    variant="suprank" (SupRank, Ramzi et al.):

    .. math:: R_i = \frac{1}{|K|} \sum_{k \in K} \frac{\sum_{j \in P_i} \sigma_{temp}(k - \mathrm{rank\_all}[i,j])}
              {\min(|P_i|, k)}

    variant="patel" (Patel et al., CVPR 2022): the inner sum is clamped at k,
    :math:`\min(\sum_j \sigma_{temp}(k - \mathrm{rank\_all}[i,j]), k) / \min(k, |P_i|)`.

    `step` ranks with "suprank" or "sigmoid"; None takes the variant's published choice
    (suprank for "suprank", sigmoid for "patel"). `tau` (and rho/delta/start/offset for
    suprank) parametrise the ranking step, `temp` the sigmoid around k. A k larger than
    the gallery is allowed: min(|P_i|, k) keeps the score in [0, 1]. Patel et al. rank
    the query as a competitor but not as a positive: pass a square target with
    ``ignore=None`` and drop the self-positive by setting the diagonal of a dense target
    to 0, or leave it out entirely with ``ignore=torch.arange(Q)``.

    Example:
        >>> r = fastrank.recall_at_k(scores, (labels, labels), ks=(1, 4), ignore=torch.arange(len(labels)))
    """
    fn = "fastrank.recall_at_k"
    V.check_choice(fn, "variant", variant, VARIANTS)
    ks = V.check_ks(fn, ks)
    temp = V.check_positive_number(fn, "temp", temp)
    V.check_reduction(fn, reduction)
    params = make_params(fn, _DEFAULT_STEP[variant] if step is None else step, tau, rho, delta, start, offset)
    scores, _, name = check_call(fn, scores, target, ignore, backend, fused=True, loss="recall_loss")
    if use_fused(name, "recall_loss"):
        # one pass per row in C++ (docs/design.md §2.4): no packing, the gradient rows with it
        total, n_pos = run_loss("recall_loss", fn, name, scores, *target_args(target), *ignore_args(ignore),
                                params=params, options=(list(ks), float(temp), variant == "patel"))
        return reduce_fused(total, n_pos, reduction, name)
    pb = build_problem(target, ignore, scores.shape[0], scores.shape[1], scores.device)
    rank_all, _ = rank_sums_packed(name, scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, params)
    has = pb.pos_idx >= 0
    n_pos = pb.n_pos.to(rank_all.dtype)
    total = torch.zeros(scores.shape[0], dtype=rank_all.dtype, device=scores.device)
    # times 1/temp, not / temp: a temp below the dtype's smallest normal is rounded or flushed to 0
    # and rank == k gave 0/0. The inverse is capped at sqrt(max): distinct ranks differ by at least
    # an ulp of 1, so sigma is already an exact step there (sigma(0) = 0.5), and the gradient at a
    # rank equal to k (0.25/temp) keeps ~sqrt(max) of headroom for the kernels' backward
    inv_temp = min(1.0 / temp, math.sqrt(torch.finfo(rank_all.dtype).max))
    for k in ks:
        hit = torch.where(has, torch.sigmoid((k - rank_all) * inv_temp), 0.0).sum(1)
        if variant == "patel":
            hit = hit.clamp(max=float(k))
        total = total + hit / n_pos.clamp(max=float(k)).clamp(min=1.0)
    return reduce_per_query(total / len(ks), scores, pb, reduction)
