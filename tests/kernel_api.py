"""Argument checks that every Triton family's host code shares (triton_kernels/_common.py): a
direct forward(scores, pos_idx, ignore_idx, ignore_mask, params) call with a bad argument is
refused with the argument's name."""
import pytest
import torch


def check_common_arguments(forward, scores: torch.Tensor, pos_idx: torch.Tensor, params) -> None:
    """`scores` (3, 5) float, `pos_idx` (3, P) int64 on the same device, `params` valid."""
    dev = scores.device
    with pytest.raises(TypeError, match="scores"):
        forward(scores.to(torch.int32), pos_idx, None, None, params)
    with pytest.raises(ValueError, match="scores"):
        forward(scores[0], pos_idx, None, None, params)
    with pytest.raises(TypeError, match="pos_idx"):
        forward(scores, pos_idx.to(torch.int32), None, None, params)
    with pytest.raises(ValueError, match="pos_idx"):
        forward(scores, pos_idx[:2], None, None, params)
    with pytest.raises(ValueError, match="pos_idx"):
        forward(scores, pos_idx.to("meta"), None, None, params)
    with pytest.raises(ValueError, match="ignore_idx"):
        forward(scores, pos_idx, torch.zeros(4, dtype=torch.int64, device=dev), None, params)
    with pytest.raises(TypeError, match="ignore_mask"):
        forward(scores, pos_idx, None, torch.zeros(3, 5, device=dev), params)
    with pytest.raises(ValueError, match="ignore_mask"):
        forward(scores, pos_idx, None, torch.zeros(3, 4, dtype=torch.bool, device=dev), params)
