"""The `naive` backend of the rank sums: the Q x N x N cube, the way the published Smooth-AP
and ROADMAP code computes it, differentiated by autograd. The oracle of the tests and the
baseline of the benchmark (docs/design.md §1.1)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core.params import SIGMOID, StepParams
from ..core.problem import dense_positive_mask, dense_valid_mask, gather_packed
from ..core.step import heaviside, score_diff, sigmoid_tau, suprank_neg

Tensor = torch.Tensor


def forward(
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
