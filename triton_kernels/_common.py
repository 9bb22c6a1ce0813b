"""Pieces shared by the Triton kernel modules: interpreter detection, dtypes, the
valid-column test, and the argument checks of the packed problem (fastrank/_problem.py)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: kernels run in Triton's CPU interpreter (CI); read once, at import, as Triton does
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@triton.jit
def valid_cols(offs_k, N, ign, mask_row_ptr, stride_mn, IGNORE: tl.constexpr):
    """Columns that take part: inside the row, not the ignored index (IGNORE & 1), not masked (IGNORE & 2)."""
    valid = offs_k < N
    if IGNORE & 1:
        valid = valid & (offs_k != ign)
    if IGNORE & 2:
        m = tl.load(mask_row_ptr + offs_k.to(tl.int64) * stride_mn, mask=offs_k < N, other=1)
        valid = valid & (m == 0)
    return valid


def check_tensor(fn: str, name: str, t, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{fn}: `{name}` must be {dims}-D, got shape {tuple(t.shape)}")


def check_packed_inputs(fn: str, scores, pos_idx, ignore_idx, ignore_mask) -> None:
    """Types, shapes and devices of (scores, pos_idx, ignore_idx, ignore_mask); messages name the argument."""
    check_tensor(fn, "scores", scores, 2)
    if scores.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: `scores` must be float16, bfloat16, float32 or float64, got {scores.dtype}")
    dev = scores.device
    if INTERPRETED:
        if dev.type != "cpu":
            raise ValueError(f"{fn}: under TRITON_INTERPRET=1 `scores` must be a CPU tensor, got {dev}")
    elif dev.type != "cuda":
        raise ValueError(f"{fn}: `scores` must be a CUDA tensor (or set TRITON_INTERPRET=1 for CPU), got {dev}")
    q, _ = scores.shape
    check_tensor(fn, "pos_idx", pos_idx, 2)
    if pos_idx.dtype != torch.int64:
        raise TypeError(f"{fn}: `pos_idx` must be int64, got {pos_idx.dtype}")
    if pos_idx.shape[0] != q:
        raise ValueError(f"{fn}: `pos_idx` must be (Q, P) with Q = {q}, got shape {tuple(pos_idx.shape)}")
    if pos_idx.device != dev:
        raise ValueError(f"{fn}: `pos_idx` is on {pos_idx.device} but `scores` is on {dev}")
    if ignore_idx is not None:
        check_tensor(fn, "ignore_idx", ignore_idx, 1)
        if ignore_idx.dtype != torch.int64:
            raise TypeError(f"{fn}: `ignore_idx` must be int64, got {ignore_idx.dtype}")
        if ignore_idx.shape[0] != q:
            raise ValueError(f"{fn}: `ignore_idx` must have shape ({q},), got {tuple(ignore_idx.shape)}")
        if ignore_idx.device != dev:
            raise ValueError(f"{fn}: `ignore_idx` is on {ignore_idx.device} but `scores` is on {dev}")
    if ignore_mask is not None:
        check_tensor(fn, "ignore_mask", ignore_mask, 2)
        if ignore_mask.dtype != torch.bool:
            raise TypeError(f"{fn}: `ignore_mask` must be bool, got {ignore_mask.dtype}")
        if ignore_mask.shape != scores.shape:
            raise ValueError(
                f"{fn}: `ignore_mask` must have the shape of `scores` {tuple(scores.shape)}, "
                f"got {tuple(ignore_mask.shape)}"
            )
        if ignore_mask.device != dev:
            raise ValueError(f"{fn}: `ignore_mask` is on {ignore_mask.device} but `scores` is on {dev}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: elements of a (rows, BLOCK_K) tile per thread kept on a GPU (float32; half for float64):
#: enough independent work per thread to hide latency, few enough that the accumulator and the
#: handful of live temporaries stay in registers (ptxas for sm_90 spills beyond ~64)
PER_THREAD_MIN, PER_THREAD_MAX = 8, 32


def prune_tile_configs(configs, named_args, rows: int, n_floor: int):
    """Autotune pruning shared by the kernels: keep configs whose (rows, BLOCK_K) tile fits the
    per-thread budget and whose BLOCK_K is not much wider than the row (at least `n_floor`)."""
    n_cap = max(n_floor, next_pow2(int(named_args.get("N", 1 << 30))))
    prm = named_args.get("params_ptr")
    wide = 2 if prm is not None and prm.dtype == torch.float64 else 1

    def per_thread(c):
        return rows * c.kwargs["BLOCK_K"] * wide / (32 * c.num_warps)

    fit = [c for c in configs if c.kwargs["BLOCK_K"] <= n_cap] or configs[:1]
    good = [c for c in fit if PER_THREAD_MIN <= per_thread(c) <= PER_THREAD_MAX]
    if good:
        return good
    # tiny rows or wide tiles: the config whose tile is closest to the budget
    return [min(fit, key=lambda c: abs(per_thread(c) - PER_THREAD_MAX))]
