"""Triton kernels of the soft histograms of histogram AP (docs/design.md §1.3): forward and deterministic backward.

Same contract as `fastrank.histogram.naive.forward` / `fastrank.histogram.chunked.forward/backward` and
the C++ kernel (csrc/histogram.h, csrc/cpu/histogram.cpp); the op-family table (fastrank/core/registry.py)
calls the two public functions below.

A score s maps to the bin coordinate v = scale * s + shift; bin l (0 <= l < L) receives the
triangular weight [1 - |v - l|]_+, so a score touches at most bins lo = floor(v) and lo + 1,
with weights 1 - t and t (t = v - lo) and slopes dw/dv = -1 and +1 (both 0 at t = 0: torch's
conventions for relu and abs, which the references differentiate). With open ends (SoftBin)
v <= 0 (v >= L-1) puts all its mass in bin 0 (L-1), with no gradient; without (FastAP) mass
beyond the ends is lost.

    h_all[i, l] = sum over valid k of w_l(v_ik)      h_pos[i, l] = sum over p of w_l(v_i,pos_idx[i,p])

Forward, grid (Q, cdiv(L, BLOCK_L), SPLIT): each program owns BLOCK_L bins of one query and
sweeps the query's columns in tiles of BLOCK_K. A tile's (lo, w_lo, w_hi) is turned into a
(BLOCK_K, BLOCK_L) one-hot matrix (`offs_l == lo` / `offs_l == lo + 1`) added to a register
accumulator of that shape, reduced over the tile axis with tl.sum once at the end into the
BLOCK_L bins: no atomics, no shared-memory scatter, a fixed summation order. h_pos comes from
a second sweep, over pos_idx[i]. With SPLIT > 1 (a GPU with few queries and long rows) split s
takes every SPLIT-th tile and writes a partial histogram; the host sums the SPLIT partials in a
fixed order (torch.sum over dim 0).

Backward (no float atomics, so bitwise reproducible), with a = dL/dh_all, b = dL/dh_pos:
1. columns kernel, grid (Q, cdiv(N, BLOCK_K)):
   grad[i, k] = scale * (a[i, lo] * dw_lo + a[i, lo+1] * dw_hi) for valid k, 0 for ignored k;
   it also flags rows with a NaN among their valid scores (every writer stores the same 1).
2. positives kernel, grid (Q, cdiv(P, BLOCK_P)): grad[i, j] += scale * (b[i, lo] * dw_lo +
   b[i, lo+1] * dw_hi) at j = pos_idx[i, p] (read-modify-write; the columns of a row are
   unique, so each cell has one writer; holes are masked). In a flagged row it adds nothing
   and its first program writes NaN at every valid column instead.
A bin's gradient enters only where its slope is nonzero (where(slope, b_hi - b_lo, 0)), so a
non-finite gradient of a bin the score does not slope into does not leak in.

Accumulation in float32 (float64 for float64 scores); v is formed in that dtype. NaN: a NaN
among a row's valid scores makes that row's h_all and h_pos NaN in every bin and its gradient
NaN at every valid column (0 at ignored ones), as in the C++ kernel; detected inside the
kernels, so there is no host synchronisation. +-inf scores are ordinary: beyond the ends.

Launch: on a GPU the forward and the columns kernel are autotuned over (BLOCK_K, num_warps),
keyed on (N rounded up to a power of two, BLOCK_L, OPEN, IGNORE, SPLIT); BLOCK_L = L rounded up to a
power of two, at most 128 (more bins: more bin-blocks in the grid). The positives kernel
read-modify-writes, so it is never autotuned (benchmark runs would add twice): one config.
Under TRITON_INTERPRET=1 (checked at import) one large-block configuration is used.
Bitwise reproducibility holds for a fixed launch configuration, i.e. within a process (the
autotuner caches its pick) and always under the interpreter.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastrank.core.params import HistParams

from ._common import (
    INTERPRETED, NAN, acc_dtype, capped_pow2, check_packed_inputs, column_block, configure_kernel, device_constants,
    fit_row, grads_or_zeros, ignore_args, next_pow2, prune_tile_configs, ranked_block, row_ignore, valid_cols,
)

Tensor = torch.Tensor


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _load_hist_params(params_ptr):
    """(scale, shift, top = L - 1) from the (3,) params tensor (`_params_tensor`), as scalars of
    the accumulation dtype. Once per program (a device-function call costs the interpreter
    about a millisecond)."""
    scale = tl.load(params_ptr + 0)
    shift = tl.load(params_ptr + 1)
    top = tl.load(params_ptr + 2)
    return scale, shift, top


@triton.jit
def _soft_bin(v, top, OPEN: tl.constexpr):
    """(lo, w_lo, w_hi, slope) of bin coordinates v (any shape, accumulation dtype).

    lo (int32) is the first touched bin (-1 and L-1 leave one bin inside; -2 = none: beyond
    closed ends, or NaN); bins lo and lo + 1 get weights w_lo and w_hi, with dw/dv = -slope and
    +slope, slope = 1 inside a bin interval and 0 at integer v and on clamped (open-end) scores.
    `top` = L - 1 in the accumulation dtype. Mirrors fastrank::soft_bin (csrc/histogram.h).
    """
    inside = (v > -1.0) & (v < top + 1.0)  # false for NaN and +-inf
    f = tl.floor(tl.where(inside, v, 0.0))  # guarded: never converts inf/NaN to an integer
    t = tl.where(inside, v, 0.0) - f
    lo = tl.where(inside, f.to(tl.int32), -2)
    w_lo = tl.where(inside, 1.0 - t, 0.0)
    w_hi = tl.where(inside, t, 0.0)
    slope = tl.where(inside & (t > 0.0), 1.0, 0.0)
    if OPEN:
        below = v <= 0.0
        above = v >= top
        end = below | above
        lo = tl.where(below, 0, tl.where(above, top.to(tl.int32), lo))
        w_lo = tl.where(end, 1.0, w_lo)
        w_hi = tl.where(end, 0.0, w_hi)
        slope = tl.where(end, 0.0, slope)
    return lo, w_lo.to(v.dtype), w_hi.to(v.dtype), slope.to(v.dtype)


@triton.jit
def _one_hot_bins(lo, w_lo, w_hi, offs_l):
    """(BLOCK_K, BLOCK_L): w_lo in column lo, w_hi in column lo + 1, 0 elsewhere (one-hot compare)."""
    lo2 = lo[:, None]
    return tl.where(offs_l[None, :] == lo2, w_lo[:, None], tl.where(offs_l[None, :] == lo2 + 1, w_hi[:, None], 0.0))


# --------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["N_KEY"])
def _hist_fwd_kernel(
    scores_ptr, pos_idx_ptr, ign_idx_ptr, ign_mask_ptr, params_ptr, h_all_ptr, h_pos_ptr,
    N, P, L, N_KEY,
    stride_sq, stride_sn, stride_pq, stride_pp, stride_iq, stride_mq, stride_mn, stride_hs,
    OPEN: tl.constexpr, IGNORE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Forward: h_all and h_pos of BLOCK_L bins of one query (one split of its columns).

    Grid (Q, cdiv(L, BLOCK_L), SPLIT). Pointers:
        scores_ptr    (Q, N) float16/bfloat16/float32/float64, strides (stride_sq, stride_sn)
        pos_idx_ptr   (Q, P) int64 columns of the positives, -1 = hole, strides (stride_pq, stride_pp)
        ign_idx_ptr   (Q,) int64 ignored column per query (-1 = none), stride stride_iq; read if IGNORE & 1
        ign_mask_ptr  (Q, N) uint8 (a bool mask viewed as bytes), nonzero = ignored, strides
                      (stride_mq, stride_mn); read if IGNORE & 2
        params_ptr    (3,) accumulation dtype: scale, shift, L - 1
        h_all_ptr, h_pos_ptr  (SPLIT, Q, L) contiguous outputs (split stride stride_hs): the
                      histograms in the dtype of scores if SPLIT == 1, else partial sums in the
                      accumulation dtype; all bins NaN in a row with a NaN among its valid scores
    Scalars: N, P, L; N_KEY (N rounded up to a power of two) only keys the autotuner.
    Constexprs:
        OPEN     open end bins (SoftBin) or closed (FastAP)
        IGNORE   bit set: 1 = ign_idx, 2 = ign_mask (0 = nothing ignored)
        SPLIT    programs sharing a row's columns (tile t goes to split t mod SPLIT)
        BLOCK_L  bins per program (a power of two >= L unless L > 128)
        BLOCK_K  columns (and positives) per tile
    """
    i = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(1)
    pid_s = tl.program_id(2)
    scale, shift, top = _load_hist_params(params_ptr)
    ACC = params_ptr.dtype.element_ty

    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
    s_row = scores_ptr + i * stride_sq

    # (BLOCK_K, BLOCK_L) register accumulators, reduced over the tile axis once at the end:
    # the sweep itself is elementwise (no cross-thread reduction, no barrier per tile)
    acc = tl.zeros((BLOCK_K, BLOCK_L), ACC)
    n_nan = tl.zeros((BLOCK_K,), tl.int32)
    for k0 in range(pid_s * BLOCK_K, N, SPLIT * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid = valid_cols(offs_k, N, ign, mask_row, stride_mn, IGNORE)
        s = tl.load(s_row + offs_k.to(tl.int64) * stride_sn, mask=valid, other=0.0).to(ACC)
        v = s * scale + shift
        n_nan += (v != v).to(tl.int32)  # masked columns read 0: v = shift is finite
        lo, w_lo, w_hi, _ = _soft_bin(v, top, OPEN)
        acc += _one_hot_bins(tl.where(valid, lo, -2), w_lo, w_hi, offs_l)
    h_all = tl.sum(acc, axis=0)

    acc = tl.zeros((BLOCK_K, BLOCK_L), ACC)
    for p0 in range(pid_s * BLOCK_K, P, SPLIT * BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)
        j = tl.load(pos_idx_ptr + i * stride_pq + offs_p.to(tl.int64) * stride_pp, mask=offs_p < P, other=-1)
        has = j >= 0
        s = tl.load(s_row + j * stride_sn, mask=has, other=0.0).to(ACC)
        lo, w_lo, w_hi, _ = _soft_bin(s * scale + shift, top, OPEN)
        acc += _one_hot_bins(tl.where(has, lo, -2), w_lo, w_hi, offs_l)
    h_pos = tl.sum(acc, axis=0)

    # a NaN score poisons its whole query, as in the references (and the C++ kernel)
    row_nan = tl.max(n_nan, axis=0) > 0
    h_all = tl.where(row_nan, NAN, h_all)
    h_pos = tl.where(row_nan, NAN, h_pos)
    out_ty = h_all_ptr.dtype.element_ty
    out_off = pid_s.to(tl.int64) * stride_hs + i * L + offs_l
    in_l = offs_l < L
    tl.store(h_all_ptr + out_off, h_all.to(out_ty), mask=in_l)
    tl.store(h_pos_ptr + out_off, h_pos.to(out_ty), mask=in_l)


@triton.jit(do_not_specialize=["N_KEY"])
def _hist_bwd_cols_kernel(
    scores_ptr, ign_idx_ptr, ign_mask_ptr, params_ptr, grad_all_ptr, grad_ptr, nan_flag_ptr,
    N, L, N_KEY,
    stride_sq, stride_sn, stride_iq, stride_mq, stride_mn, stride_aq, stride_al,
    OPEN: tl.constexpr, IGNORE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward through h_all: grad[i, k] = scale * (a[lo] * dw_lo + a[lo+1] * dw_hi) for valid k.

    Grid (Q, cdiv(N, BLOCK_K)). Ignored columns (and NaN scores) get 0 here; the positives
    kernel runs next. Pointers:
        scores_ptr    (Q, N) scores, strides (stride_sq, stride_sn)
        ign_idx_ptr   (Q,) int64 ignored column (-1 = none), stride stride_iq; read if IGNORE & 1
        ign_mask_ptr  (Q, N) uint8 ignore mask, strides (stride_mq, stride_mn); read if IGNORE & 2
        params_ptr    (3,) accumulation dtype: scale, shift, L - 1
        grad_all_ptr  (Q, L) dL/dh_all, any float dtype, strides (stride_aq, stride_al)
        grad_ptr      (Q, N) contiguous output, accumulation dtype
        nan_flag_ptr  (Q,) int32, zero-initialised: set to 1 for a row with a NaN among its
                      valid scores (every writer stores the same value)
    Scalars: N, L; N_KEY only keys the autotuner.
    Constexprs:
        OPEN     open end bins
        IGNORE   bit set: 1 = ign_idx, 2 = ign_mask
        BLOCK_K  columns per program
    """
    i = tl.program_id(0).to(tl.int64)
    scale, shift, top = _load_hist_params(params_ptr)
    ACC = params_ptr.dtype.element_ty

    offs_k, valid, _, s = column_block(
        scores_ptr, ign_idx_ptr, ign_mask_ptr, i, tl.program_id(1), N,
        stride_sq, stride_sn, stride_iq, stride_mq, stride_mn, IGNORE, BLOCK_K, ACC,
    )
    v = s * scale + shift
    is_nan = (v != v) & valid
    lo, _, _, slope = _soft_bin(v, top, OPEN)
    hi = lo + 1
    a_row = grad_all_ptr + i * stride_aq
    take_lo = valid & (slope > 0.0) & (lo >= 0)
    take_hi = valid & (slope > 0.0) & (hi < L)
    a_lo = tl.load(a_row + lo.to(tl.int64) * stride_al, mask=take_lo, other=0.0).to(ACC)
    a_hi = tl.load(a_row + hi.to(tl.int64) * stride_al, mask=take_hi, other=0.0).to(ACC)
    g = tl.where(slope > 0.0, a_hi - a_lo, 0.0) * scale
    tl.store(grad_ptr + i * N + offs_k, tl.where(valid, g, 0.0), mask=offs_k < N)
    tl.store(nan_flag_ptr + i, 1, mask=tl.max(is_nan.to(tl.int32), axis=0) > 0)


@triton.jit
def _hist_bwd_pos_kernel(
    scores_ptr, pos_idx_ptr, ign_idx_ptr, ign_mask_ptr, params_ptr, grad_pos_ptr, nan_flag_ptr, grad_ptr,
    N, P, L,
    stride_sq, stride_sn, stride_pq, stride_pp, stride_iq, stride_mq, stride_mn, stride_bq, stride_bl,
    OPEN: tl.constexpr, IGNORE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward through h_pos, added in place at the positives' columns; NaN rows filled.

    Grid (Q, max(1, cdiv(P, BLOCK_P))); run after the columns kernel. Pointers:
        scores_ptr    (Q, N) scores, strides (stride_sq, stride_sn)
        pos_idx_ptr   (Q, P) int64 positives, -1 = hole (unique per row), strides (stride_pq, stride_pp)
        ign_idx_ptr   (Q,) int64 ignored column, stride stride_iq; read if IGNORE & 1 (NaN rows only)
        ign_mask_ptr  (Q, N) uint8 ignore mask, strides (stride_mq, stride_mn); read if IGNORE & 2 (NaN rows)
        params_ptr    (3,) accumulation dtype: scale, shift, L - 1
        grad_pos_ptr  (Q, L) dL/dh_pos, any float dtype, strides (stride_bq, stride_bl)
        nan_flag_ptr  (Q,) int32 written by the columns kernel
        grad_ptr      (Q, N) contiguous, accumulation dtype: read-modify-written at positive columns
                      (one writer per cell); in a flagged row program 0 writes NaN at valid columns
    Scalars: N, P, L.
    Constexprs:
        OPEN     open end bins
        IGNORE   bit set: 1 = ign_idx, 2 = ign_mask
        BLOCK_P  positives per program
        BLOCK_N  columns per tile of the NaN fill
    """
    i = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    g_row = grad_ptr + i * N
    row_nan = tl.load(nan_flag_ptr + i) != 0
    if row_nan:
        if pid_p == 0:
            ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
            for k0 in range(0, N, BLOCK_N):
                offs_k = k0 + tl.arange(0, BLOCK_N)
                valid = valid_cols(offs_k, N, ign, mask_row, stride_mn, IGNORE)
                nan = tl.full((BLOCK_N,), NAN, grad_ptr.dtype.element_ty)
                tl.store(g_row + offs_k, nan, mask=valid)
    else:
        scale, shift, top = _load_hist_params(params_ptr)
        ACC = params_ptr.dtype.element_ty
        _, _, j, has, _, s = ranked_block(
            scores_ptr, pos_idx_ptr, i, pid_p, P, stride_sq, stride_sn, stride_pq, stride_pp, BLOCK_P, ACC
        )
        lo, _, _, slope = _soft_bin(s * scale + shift, top, OPEN)
        hi = lo + 1
        b_row = grad_pos_ptr + i * stride_bq
        b_lo = tl.load(b_row + lo.to(tl.int64) * stride_bl, mask=has & (slope > 0.0) & (lo >= 0), other=0.0)
        b_hi = tl.load(b_row + hi.to(tl.int64) * stride_bl, mask=has & (slope > 0.0) & (hi < L), other=0.0)
        g = tl.where(slope > 0.0, b_hi.to(ACC) - b_lo.to(ACC), 0.0) * scale
        old = tl.load(g_row + j, mask=has, other=0.0)
        tl.store(g_row + j, old + g, mask=has)


# --------------------------------------------------------------------------- launch configuration


#: caps under the interpreter, where big blocks are cheap (numpy) and launches are not;
#: tests lower them to drive the multi-tile loops (and the split / bin-block grids) with small shapes
INTERPRETER_MAX_BLOCK_K = 1024
INTERPRETER_MAX_BLOCK_P = 1024
INTERPRETER_SPLIT = 1
#: bins per forward program (GPU and interpreter); more bins take more bin-blocks in the grid
MAX_BLOCK_L = 128
#: positives per program of the positives kernel, and columns per tile of its NaN fill (GPU)
_BLOCK_P, _BLOCK_N = 128, 1024


def _block_l(bins: int) -> int:
    return capped_pow2(bins, MAX_BLOCK_L)


def _interpreter_block_k(args) -> int:
    return capped_pow2(args["N"], INTERPRETER_MAX_BLOCK_K)


def _prune_fwd(configs, named_args, **kwargs):
    """The (BLOCK_K, BLOCK_L) one-hot tile: BLOCK_L plays the role of the tile's rows."""
    bl = kwargs.get("BLOCK_L", named_args.get("BLOCK_L", 32))
    return prune_tile_configs(configs, named_args, rows=bl, n_floor=16)


def _prune_cols(configs, named_args, **kwargs):
    return fit_row(configs, named_args, n_floor=128)


_fwd = configure_kernel(
    _hist_fwd_kernel, _interpreter_block_k, (16, 32, 64, 128, 256, 512, 1024), (2, 4, 8),
    ["N_KEY", "BLOCK_L", "OPEN", "IGNORE", "SPLIT"], _prune_fwd,
)
_bwd_cols = configure_kernel(
    _hist_bwd_cols_kernel, _interpreter_block_k, (128, 256, 512, 1024, 2048), (2, 4, 8),
    ["N_KEY", "OPEN", "IGNORE"], _prune_cols,
)
_bwd_pos = _hist_bwd_pos_kernel  # read-modify-write: never autotuned


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(q: int, n_lblocks: int, n: int, device: torch.device) -> int:
    """Forward programs per (query, bin-block): 1 unless the grid would leave a GPU mostly idle
    and rows are long enough to share (each split keeps >= 2048 columns)."""
    if INTERPRETED:
        return max(1, min(int(INTERPRETER_SPLIT), triton.cdiv(max(n, 1), 2)))
    target = 4 * _sm_count(device)
    programs = q * n_lblocks
    if programs >= target:
        return 1
    return max(1, min(64, triton.cdiv(n, 2048), triton.cdiv(target, programs)))


# --------------------------------------------------------------------------- host side


def _params_tensor(params: HistParams, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(scale, shift, L - 1), as `_load_hist_params` reads them."""
    return device_constants((params.scale, params.shift, params.bins - 1), dtype, device)


def _check_inputs(fn: str, scores, pos_idx, ignore_idx, ignore_mask, params) -> None:
    check_packed_inputs(fn, scores, pos_idx, ignore_idx, ignore_mask)
    check_params(fn, params, scores.dtype)


def check_params(fn: str, params, dtype: torch.dtype) -> None:
    """A HistParams with bins >= 2 and a finite, nonzero scale and finite shift (in `dtype`'s accumulation dtype)."""
    if not isinstance(params, HistParams):
        raise TypeError(f"{fn}: `params` must be a fastrank.core.params.HistParams, got {type(params).__name__}")
    if isinstance(params.bins, bool) or not isinstance(params.bins, int) or params.bins < 2:
        raise ValueError(f"{fn}: `params.bins` must be an integer >= 2, got {params.bins!r}")
    for name in ("scale", "shift"):
        val = float(getattr(params, name))
        if not math.isfinite(val):
            raise ValueError(f"{fn}: `params.{name}` must be finite, got {val}")
    if float(params.scale) == 0.0:
        raise ValueError(f"{fn}: `params.scale` must be nonzero")
    params.check_dtype(dtype)  # scale and shift finite in the accumulation dtype


def forward(
    scores: Tensor,
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: HistParams,
) -> Tuple[Tensor, Tensor]:
    """h_all, h_pos, each (Q, params.bins) in the dtype of `scores`.

    Args:
        scores: (Q, N) float16/bfloat16/float32/float64, any strides (accumulated in float32,
            float64 for float64).
        pos_idx: (Q, P) int64 columns of the positives (-1 = hole; unique per row, never
            ignored; entries in [-1, N), not checked: that would synchronise).
        ignore_idx: (Q,) int64 column to leave out of h_all per query (-1 = none), or None.
        ignore_mask: (Q, N) bool, True = left out of h_all, or None.
        params: fastrank.core.params.HistParams(bins, scale, shift, open_ends).
    """
    fn = "fastrank.triton_kernels.histogram.forward"
    _check_inputs(fn, scores, pos_idx, ignore_idx, ignore_mask, params)
    q, n = scores.shape
    p = pos_idx.shape[1]
    bins = int(params.bins)
    if q == 0 or n == 0:
        z = torch.zeros((q, bins), dtype=scores.dtype, device=scores.device)
        return z, z.clone()
    acc = acc_dtype(scores.dtype)
    ign_idx, ign_mask, ign_strides, mode = ignore_args(pos_idx, ignore_idx, ignore_mask)
    bl = _block_l(bins)
    n_lb = triton.cdiv(bins, bl)
    split = _num_splits(q, n_lb, n, scores.device)
    # one split: the histograms themselves; several: float partials, summed below
    shape = (q, bins) if split == 1 else (split, q, bins)
    h_all = torch.empty(shape, dtype=scores.dtype if split == 1 else acc, device=scores.device)
    h_pos = torch.empty_like(h_all)
    _fwd[(q, n_lb, split)](
        scores, pos_idx, ign_idx, ign_mask, _params_tensor(params, acc, scores.device), h_all, h_pos,
        n, p, bins, next_pow2(n),
        *scores.stride(), *pos_idx.stride(), *ign_strides, q * bins,
        OPEN=bool(params.open_ends), IGNORE=mode, SPLIT=split, BLOCK_L=bl,
    )
    if split == 1:
        return h_all, h_pos
    # partial histograms summed in a fixed order (a plain reduction: no atomics)
    return h_all.sum(0).to(scores.dtype), h_pos.sum(0).to(scores.dtype)


def backward(
    grad_h_all: Optional[Tensor],
    grad_h_pos: Optional[Tensor],
    scores: Tensor,
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: HistParams,
) -> Tensor:
    """dL/dscores (Q, N), contiguous, in the dtype of `scores`, from dL/dh_all and dL/dh_pos
    (each (Q, bins), any float dtype and strides, or None for zero).

    Deterministic: no floating-point atomics; every output cell has one writer per kernel.
    """
    fn = "fastrank.triton_kernels.histogram.backward"
    _check_inputs(fn, scores, pos_idx, ignore_idx, ignore_mask, params)
    q, n = scores.shape
    p = pos_idx.shape[1]
    bins = int(params.bins)
    acc = acc_dtype(scores.dtype)
    grad_h_all, grad_h_pos = grads_or_zeros(
        fn, ("grad_h_all", "grad_h_pos"), (grad_h_all, grad_h_pos), (q, bins), f"shape (Q, bins) = {(q, bins)}", scores
    )
    if q == 0 or n == 0:
        return torch.zeros_like(scores, memory_format=torch.contiguous_format)
    ign_idx, ign_mask, ign_strides, mode = ignore_args(pos_idx, ignore_idx, ignore_mask)
    prm = _params_tensor(params, acc, scores.device)
    grad = torch.empty((q, n), dtype=acc, device=scores.device)
    nan_flag = torch.zeros((q,), dtype=torch.int32, device=scores.device)
    _bwd_cols[lambda m: (q, triton.cdiv(n, m["BLOCK_K"]))](
        scores, ign_idx, ign_mask, prm, grad_h_all, grad, nan_flag,
        n, bins, next_pow2(n),
        *scores.stride(), *ign_strides, *grad_h_all.stride(),
        OPEN=bool(params.open_ends), IGNORE=mode,
    )
    if INTERPRETED:
        bp = capped_pow2(p, INTERPRETER_MAX_BLOCK_P)
        bn = capped_pow2(n, INTERPRETER_MAX_BLOCK_K)
    else:
        bp, bn = max(16, min(next_pow2(p), _BLOCK_P)), _BLOCK_N
    _bwd_pos[(q, max(1, triton.cdiv(p, bp)))](
        scores, pos_idx, ign_idx, ign_mask, prm, grad_h_pos, nan_flag, grad,
        n, p, bins,
        *scores.stride(), *pos_idx.stride(), *ign_strides, *grad_h_pos.stride(),
        OPEN=bool(params.open_ends), IGNORE=mode, BLOCK_P=bp, BLOCK_N=bn, num_warps=4,
    )
    return grad if grad.dtype == scores.dtype else grad.to(scores.dtype)
