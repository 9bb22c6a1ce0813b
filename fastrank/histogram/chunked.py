"""The `torch` backend of the soft histograms (docs/design.md §1.3): blocks of query rows,
weights and their slopes written out, no (Q, N, L) tensor beyond one block.

A score s maps to a bin coordinate v = scale * s + shift; bin l (l = 0..L-1) receives
the triangular weight [1 - |v - l|]_+, so every score touches at most two adjacent
bins. With `open_ends`, a score below bin 0 or above bin L-1 falls fully into that end
bin (SoftBin); without, its mass beyond the ends is lost (FastAP, as published).

    h_all[i, l] = sum over valid j of w_l(v_ij)       h_pos[i, l] = sum over positives j of w_l(v_ij)
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..core.chunks import rows_per_chunk
from ..core.params import HistParams
from ..core.problem import dense_positive_mask, dense_valid_mask

Tensor = torch.Tensor


def _weights_and_slopes(v: Tensor, p: HistParams) -> Tuple[Tensor, Tensor]:
    centres = torch.arange(p.bins, dtype=v.dtype, device=v.device)
    inside = torch.ones_like(v, dtype=torch.bool)
    if p.open_ends:
        inside = (v >= 0) & (v <= p.bins - 1)
        v = v.clamp(0, p.bins - 1)
    diff = v.unsqueeze(-1) - centres
    w = torch.relu(1 - diff.abs())
    # d w / d v = -sign(v - l) inside the support, 0 on its edges and at the centre (torch's
    # conventions for relu and abs), 0 for clamped (open-end) coordinates
    slope = torch.where(w > 0, -torch.sign(diff), torch.zeros_like(diff)) * inside.unsqueeze(-1)
    return w, slope


def forward(scores, pos_idx, ignore_idx, ignore_mask, p: HistParams) -> Tuple[Tensor, Tensor]:
    q, n = scores.shape
    pos = dense_positive_mask(pos_idx, n)
    valid = dense_valid_mask(q, n, ignore_idx, ignore_mask, scores.device)
    h_all = scores.new_zeros(q, p.bins)
    h_pos = scores.new_zeros(q, p.bins)
    step = rows_per_chunk(n, p.bins)
    for q0 in range(0, q, step):
        q1 = min(q, q0 + step)
        w, _ = _weights_and_slopes(scores[q0:q1] * p.scale + p.shift, p)
        zero = w.new_zeros(())
        h_all[q0:q1] = torch.where(valid[q0:q1].unsqueeze(-1), w, zero).sum(1)
        h_pos[q0:q1] = torch.where(pos[q0:q1].unsqueeze(-1), w, zero).sum(1)
    return h_all, h_pos


def backward(
    grad_all: Tensor, grad_pos: Tensor, scores, pos_idx, ignore_idx, ignore_mask, p: HistParams
) -> Tensor:
    q, n = scores.shape
    pos = dense_positive_mask(pos_idx, n)
    valid = dense_valid_mask(q, n, ignore_idx, ignore_mask, scores.device)
    grad = torch.zeros_like(scores)
    step = rows_per_chunk(n, p.bins)
    for q0 in range(0, q, step):
        q1 = min(q, q0 + step)
        _, slope = _weights_and_slopes(scores[q0:q1] * p.scale + p.shift, p)
        g = grad_all[q0:q1].unsqueeze(1) + torch.where(pos[q0:q1].unsqueeze(-1), grad_pos[q0:q1].unsqueeze(1), 0.0)
        grad[q0:q1] = torch.where(valid[q0:q1], (g * slope).sum(-1) * p.scale, 0.0)
    # a NaN score has NaN weights: keep it visible in the gradient too
    return torch.where(torch.isnan(scores) & valid, scores, grad)
