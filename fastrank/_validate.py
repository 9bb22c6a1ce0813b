"""Argument checks shared by every public entry point.

Every failure raises ValueError or TypeError whose message names the function,
the argument, what was expected and what was given.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
REDUCTIONS = ("mean", "sum", "none")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def check_scores(fn: str, scores: Any) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{fn}: `scores` must be a torch.Tensor of shape (Q, N), got {_describe(scores)}")
    if scores.dim() != 2:
        raise ValueError(f"{fn}: `scores` must be 2-D (Q queries x N gallery items), got shape {tuple(scores.shape)}")
    if scores.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: `scores` must be a floating tensor (float16/bfloat16/float32/float64), got {scores.dtype}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"{fn}: `scores` must be non-empty, got shape {tuple(scores.shape)}")


def check_positive_number(fn: str, name: str, value: Any, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: `{name}` must be a real number, got {_describe(value)}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{fn}: `{name}` must be a finite number {bound}, got {value!r}")
    return v


def check_finite_number(fn: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: `{name}` must be a real number, got {_describe(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{fn}: `{name}` must be finite, got {value!r}")
    return v


def check_choice(fn: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{fn}: `{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_reduction(fn: str, reduction: Any) -> str:
    return check_choice(fn, "reduction", reduction, REDUCTIONS)


def check_target(fn: str, target: Any, scores: torch.Tensor) -> None:
    """Dense (Q, N) relevance, or a pair (query_labels (Q,), gallery_labels (N,)) of integer tensors."""
    q, n = scores.shape
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError(
                f"{fn}: `target` as labels must be a pair (query_labels, gallery_labels), got a sequence of {len(target)}"
            )
        for name, lab, size in (("query_labels", target[0], q), ("gallery_labels", target[1], n)):
            if not isinstance(lab, torch.Tensor):
                raise TypeError(f"{fn}: `target` {name} must be a 1-D integer tensor, got {_describe(lab)}")
            if lab.dtype not in INT_DTYPES:
                raise TypeError(f"{fn}: `target` {name} must be an integer tensor, got {lab.dtype}")
            if lab.dim() != 1 or lab.shape[0] != size:
                raise ValueError(
                    f"{fn}: `target` {name} must have shape ({size},) to match scores {tuple(scores.shape)}, "
                    f"got {tuple(lab.shape)}"
                )
            if lab.device != scores.device:
                raise ValueError(f"{fn}: `target` {name} is on {lab.device} but `scores` is on {scores.device}")
        return
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            f"{fn}: `target` must be a (Q, N) relevance tensor or a pair (query_labels, gallery_labels), "
            f"got {_describe(target)}"
        )
    if tuple(target.shape) != (q, n):
        raise ValueError(f"{fn}: `target` must have the shape of scores {(q, n)}, got {tuple(target.shape)}")
    if target.device != scores.device:
        raise ValueError(f"{fn}: `target` is on {target.device} but `scores` is on {scores.device}")
    if target.dtype.is_complex:
        raise TypeError(f"{fn}: `target` must be bool, integer or floating, got {target.dtype}")
    if target.dtype.is_floating_point and bool(torch.isnan(target).any()):
        raise ValueError(f"{fn}: `target` contains NaN; relevance must be a number (> 0 = positive)")


def check_ignore(fn: str, ignore: Any, scores: torch.Tensor) -> None:
    """None, a (Q,) integer index of one item per query (-1 = none), or a (Q, N) bool mask (True = ignored)."""
    if ignore is None:
        return
    q, n = scores.shape
    if not isinstance(ignore, torch.Tensor):
        raise TypeError(
            f"{fn}: `ignore` must be None, a (Q,) int64 index or a (Q, N) bool mask, got {_describe(ignore)}"
        )
    if ignore.device != scores.device:
        raise ValueError(f"{fn}: `ignore` is on {ignore.device} but `scores` is on {scores.device}")
    if ignore.dtype == torch.bool:
        if tuple(ignore.shape) != (q, n):
            raise ValueError(f"{fn}: `ignore` as a bool mask must have shape {(q, n)}, got {tuple(ignore.shape)}")
        return
    if ignore.dtype not in INT_DTYPES:
        raise TypeError(f"{fn}: `ignore` must be an integer index (Q,) or a bool mask (Q, N), got {ignore.dtype}")
    if tuple(ignore.shape) != (q,):
        raise ValueError(f"{fn}: `ignore` as an index must have shape ({q},), got {tuple(ignore.shape)}")
    if ignore.numel() and (int(ignore.min()) < -1 or int(ignore.max()) >= n):
        raise ValueError(
            f"{fn}: `ignore` indices must lie in [-1, {n - 1}] (-1 = none), got values in "
            f"[{int(ignore.min())}, {int(ignore.max())}]"
        )


def check_backend(fn: str, backend: Optional[str], choices: Sequence[str]) -> None:
    if backend is not None and (not isinstance(backend, str) or backend not in choices):
        raise ValueError(f"{fn}: `backend` must be None or one of {', '.join(map(repr, choices))}, got {backend!r}")
