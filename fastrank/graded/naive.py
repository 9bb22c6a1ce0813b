"""The `naive` backend of the graded rank sums: the (Q, N, N) cube, every row j computed,
autograd does the backward. The oracle of the tests (docs/design.md §1.1)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core.params import SIGMOID, StepParams
from ..core.problem import dense_valid_mask, gather_packed
from ..core.step import heaviside, hrank_plus, score_diff, sigmoid_tau, suprank_neg

Tensor = torch.Tensor


def dense(scores: Tensor, rel: Tensor, valid: Tensor, params: StepParams,
          key: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The (Q, N, N) cube, every row j computed, autograd does the backward. Oracle of the tests.
    `key` orders the competitors for the choice of step (None: the relevance itself)."""
    q, n = scores.shape
    key = rel if key is None else key
    ranked = valid & (rel > 0)
    sim_diff, _ = score_diff(scores.unsqueeze(1), scores.unsqueeze(2))  # [i, j, k] = s_ik - s_ij
    not_self = ~torch.eye(n, dtype=torch.bool, device=scores.device)
    rel_j = rel.unsqueeze(2)
    rel_k = rel.unsqueeze(1)
    key_j = key.unsqueeze(2)
    key_k = key.unsqueeze(1)
    if params.step == SIGMOID:
        g = sigmoid_tau(sim_diff, params.tau)
        h = g
    else:
        h = heaviside(sim_diff)
        g = torch.where(key_k >= key_j, h, suprank_neg(sim_diff, params))
        if getattr(params, "hrank", False):
            h = torch.where(key_k > key_j, hrank_plus(sim_diff, params), h)
    zero = scores.new_zeros(())
    comp = not_self & valid.unsqueeze(1)
    ra = 1 + torch.where(comp, g, zero).sum(-1)
    rp = rel + torch.where(comp, torch.minimum(rel_j, rel_k) * h, zero).sum(-1)
    return torch.where(ranked, ra, zero), torch.where(ranked, rp, zero)


def forward(scores, rel, key, pos_idx, ignore_idx, ignore_mask, params) -> Tuple[Tensor, Tensor]:
    """The packed contract of every backend (docs/design.md §3): (Q, P) at the ranked items pos_idx."""
    valid = dense_valid_mask(scores.shape[0], scores.shape[1], ignore_idx, ignore_mask, scores.device)
    ra, rp = dense(scores, rel, valid, params, key)
    return gather_packed(ra, pos_idx), gather_packed(rp, pos_idx)
