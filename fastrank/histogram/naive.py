"""The `naive` backend of the soft histograms: the (Q, N, L) weight tensor, as the published
FastAP / SoftBin code builds its bins x Q x N pulses, differentiated by autograd; the oracle
of the tests (docs/design.md §1.3)."""
from __future__ import annotations

from typing import Tuple

import torch

from ..core.params import HistParams
from ..core.problem import dense_positive_mask, dense_valid_mask

Tensor = torch.Tensor


def bin_weights(v: Tensor, p: HistParams) -> Tensor:
    """(..., L) triangular weights of bin coordinates v, written as the references do
    (relu(1 - |v - z_l|)), so autograd sees the same kinks."""
    centres = torch.arange(p.bins, dtype=v.dtype, device=v.device)
    if p.open_ends:
        v = v.clamp(0, p.bins - 1)  # beyond an end: all mass in the end bin, no gradient
    return torch.relu(1 - (v.unsqueeze(-1) - centres).abs())


def forward(scores, pos_idx, ignore_idx, ignore_mask, p: HistParams) -> Tuple[Tensor, Tensor]:
    """(Q, L) histograms through the (Q, N, L) weight tensor, the way the published code builds
    bins x Q x N pulses; autograd does the backward."""
    q, n = scores.shape
    pos = dense_positive_mask(pos_idx, n)
    valid = dense_valid_mask(q, n, ignore_idx, ignore_mask, scores.device)
    w = bin_weights(scores * p.scale + p.shift, p)  # (Q, N, L)
    zero = w.new_zeros(())
    h_all = torch.where(valid.unsqueeze(-1), w, zero).sum(1)
    h_pos = torch.where(pos.unsqueeze(-1), w, zero).sum(1)
    return h_all, h_pos
