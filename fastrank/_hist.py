"""Soft histograms (docs/design.md §1.3) in PyTorch: the `naive` and `torch` backends of histogram AP.

A score s maps to a bin coordinate v = scale * s + shift; bin l (l = 0..L-1) receives
the triangular weight [1 - |v - l|]_+, so every score touches at most two adjacent
bins. With `open_ends`, a score below bin 0 or above bin L-1 falls fully into that end
bin (SoftBin); without, its mass beyond the ends is lost (FastAP, as published).

    h_all[i, l] = sum over valid j of w_l(v_ij)       h_pos[i, l] = sum over positives j of w_l(v_ij)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

import torch

from ._step import compute_dtype
from .reference import _chunk_elements, dense_positive_mask, dense_valid_mask

Tensor = torch.Tensor


@dataclass(frozen=True)
class HistParams:
    bins: int  # L, the number of bin centres
    scale: float  # v = scale * s + shift
    shift: float
    open_ends: bool
    fn: str = field(default="fastrank.histogram_ap", compare=False)  # for error messages

    def as_op_args(self):
        return (int(self.bins), float(self.scale), float(self.shift), bool(self.open_ends))

    def check_dtype(self, dtype: torch.dtype) -> None:
        """The kernels map scores to bins in the compute dtype (float32 for float16/bfloat16/float32):
        a scale or shift that is not finite there makes inf * s - inf = NaN of every score, and a
        zero scale 0 * inf = NaN of an infinite one. Both come from a `range` too narrow (or too
        far out) for the bins."""
        big = torch.finfo(compute_dtype(dtype)).max
        if not (0 < abs(self.scale) <= big and abs(self.shift) <= big):
            raise ValueError(
                f"{self.fn}: `range` gives the bin map v = {self.scale!r} * s + {self.shift!r}, which needs a "
                f"non-zero scale and both finite in {compute_dtype(dtype)} for {dtype} scores; widen the range "
                f"or use fewer bins"
            )


def bin_weights(v: Tensor, p: HistParams) -> Tensor:
    """(..., L) triangular weights of bin coordinates v, written as the references do
    (relu(1 - |v - z_l|)), so autograd sees the same kinks."""
    centres = torch.arange(p.bins, dtype=v.dtype, device=v.device)
    if p.open_ends:
        v = v.clamp(0, p.bins - 1)  # beyond an end: all mass in the end bin, no gradient
    return torch.relu(1 - (v.unsqueeze(-1) - centres).abs())


def naive_histograms(scores, pos_idx, ignore_idx, ignore_mask, p: HistParams) -> Tuple[Tensor, Tensor]:
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


def _rows_per_chunk(n: int, bins: int) -> int:
    budget = _chunk_elements()
    return max(1, budget // max(1, n * bins))


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


def torch_histograms_forward(scores, pos_idx, ignore_idx, ignore_mask, p: HistParams) -> Tuple[Tensor, Tensor]:
    q, n = scores.shape
    pos = dense_positive_mask(pos_idx, n)
    valid = dense_valid_mask(q, n, ignore_idx, ignore_mask, scores.device)
    h_all = scores.new_zeros(q, p.bins)
    h_pos = scores.new_zeros(q, p.bins)
    step = _rows_per_chunk(n, p.bins)
    for q0 in range(0, q, step):
        q1 = min(q, q0 + step)
        w, _ = _weights_and_slopes(scores[q0:q1] * p.scale + p.shift, p)
        zero = w.new_zeros(())
        h_all[q0:q1] = torch.where(valid[q0:q1].unsqueeze(-1), w, zero).sum(1)
        h_pos[q0:q1] = torch.where(pos[q0:q1].unsqueeze(-1), w, zero).sum(1)
    return h_all, h_pos


def torch_histograms_backward(
    grad_all: Tensor, grad_pos: Tensor, scores, pos_idx, ignore_idx, ignore_mask, p: HistParams
) -> Tensor:
    q, n = scores.shape
    pos = dense_positive_mask(pos_idx, n)
    valid = dense_valid_mask(q, n, ignore_idx, ignore_mask, scores.device)
    grad = torch.zeros_like(scores)
    step = _rows_per_chunk(n, p.bins)
    for q0 in range(0, q, step):
        q1 = min(q, q0 + step)
        _, slope = _weights_and_slopes(scores[q0:q1] * p.scale + p.shift, p)
        g = grad_all[q0:q1].unsqueeze(1) + torch.where(pos[q0:q1].unsqueeze(-1), grad_pos[q0:q1].unsqueeze(1), 0.0)
        grad[q0:q1] = torch.where(valid[q0:q1], (g * slope).sum(-1) * p.scale, 0.0)
    # a NaN score has NaN weights: keep it visible in the gradient too
    return torch.where(torch.isnan(scores) & valid, scores, grad)
