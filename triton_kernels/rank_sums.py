"""Triton kernels of the rank-sums primitive (docs/design.md §1.1): forward and deterministic backward.

Same contract as `fastrank.rank_sums.chunked.forward/backward` and the C++
kernel (csrc/cpu/rank_sums.cpp); the op-family table (fastrank/core/registry.py) calls the two
public functions below.

The kernels never see labels or a dense positive mask: each query i has the packed
list of its ranked positives `pos_idx[i]` (-1 = hole), and validity (ignore) is
either one column per query or a (Q, N) mask. Per ranked positive j (d = s_ik - s_ij):

* sweep: every valid competitor k, j itself included, gets the "negative" step g
  (sigmoid: sigma_tau; suprank: H^-);
* positive sweep over pos_idx[i]: sigmoid: rank_pos sums sigma; suprank: rank_pos
  sums H and rank_all adds H - H^- (positives get the exact step, not H^-).

Self terms: sigmoid counts sigma(0) = 1/2 for k = j in both sums, so
rank = 1/2 + sweep; suprank counts H^-(0) + (H(0) - H^-(0)) = 1 in rank_all and
H(0) = 1 in rank_pos, which supply the "1 +".

Backward (no float atomics, so bitwise deterministic), with a_j = dL/drank_all,
b_j = dL/drank_pos, and w_j = b_j (sigmoid) or -a_j (suprank, whose positives get H
and therefore no gradient; the sweep gave them H^-, whose gradient is taken back):

1. rows kernel, grid (Q, cdiv(P, BLOCK_P)), per ranked positive j:
   tot_j  = a_j sum_{k valid} g'(d_jk) + (sigmoid: b_j; suprank: -a_j) sum_{k in P} g'(d_jk)
   corr_j = sum_{t in P} w_t g'(s_ij - s_it)      (j as a competitor of the other positives)
   out[i, p] = corr_j - tot_j; it also flags rows with a NaN among their valid scores.
2. columns kernel, grid (Q, cdiv(N, BLOCK_K)), per competitor k:
   grad[i, k] = sum_{j in P} a_j g'(d_jk) for valid k, 0 for ignored k, NaN for a flagged row.
3. grad.scatter_add_(1, pos_idx, out): the columns of a row's positives are unique,
   so every cell receives at most one addend; holes add an exact +0.0 to column 0,
   which never changes a value, so the result is deterministic and contiguous.

Accumulation in float32 (float64 for float64 scores); d is formed in that dtype.
NaN: a NaN among a row's valid scores makes that row's ranks (non-holes) and its
gradient at valid entries NaN, as in the C++ kernel; rows without a positive keep
zero outputs. Detected inside the kernels, so there is no host synchronisation.

Launch: on a GPU each kernel is autotuned over (BLOCK_K, num_warps) keyed on
(N rounded up to a power of two, BLOCK_P, STEP, IGNORE); BLOCK_P comes from P.
Under TRITON_INTERPRET=1 (checked at import) one large-block configuration is used.
`FASTRANK_TRITON_FAST=1` (or `fast=True`) selects the special-function sigma on
float32 GPU runs (see `_step.py`); it is never used in the interpreter or for float64.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastrank.core.params import StepParams

from ._step import heaviside, load_step_params, step_neg, step_neg_grad

from ._common import (
    NAN, capped_pow2, check_step_inputs, column_block, configure_rank_kernel, launch_rank_backward,
    launch_rank_forward, rank_block_p, rank_grads, ranked_block, row_ignore, store_column_grad, store_ranks,
    valid_cols,
)

Tensor = torch.Tensor


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _sweep(
    s_row, sj, N, ign, mask_row, stride_sn, stride_mn, inv_tau, rho, delta, start, offset,
    STEP: tl.constexpr, IGNORE: tl.constexpr, FAST: tl.constexpr, GRAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """(total, n_inf, n_nan) of the sweep over every valid competitor k of the row, the ranked
    items sj (BLOCK_P, in ACC) themselves included, in tiles of BLOCK_K columns.

    total_j = sum_k g(s_k - s_j), or sum_k g'(s_k - s_j) if GRAD. n_nan (BLOCK_K,) int32 counts
    the NaNs among the row's valid scores per lane (tl.max(n_nan) > 0: a NaN row; the callers
    reduce it where they use it). Suprank's forward counts its H^- = +inf terms in n_inf (int32,
    per ranked item) and leaves them out of total, so that the positive sweep can take back a
    positive's +inf without inf - inf; n_inf is 0 otherwise. Constexprs STEP, IGNORE, FAST as
    in the kernels; GRAD: the derivative (backward) instead of the step. One call per program,
    the loop inside: a device-function call costs the interpreter about a millisecond."""
    acc = tl.zeros((BLOCK_P, BLOCK_K), ACC)
    n_nan = tl.zeros((BLOCK_K,), tl.int32)
    n_inf = tl.zeros((BLOCK_P,), tl.int32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid = valid_cols(offs_k, N, ign, mask_row, stride_mn, IGNORE)
        sk = tl.load(s_row + offs_k.to(tl.int64) * stride_sn, mask=valid, other=0.0).to(ACC)
        n_nan += (sk != sk).to(tl.int32)
        d = sk[None, :] - sj[:, None]
        if GRAD:
            acc += tl.where(valid[None, :], step_neg_grad(d, inv_tau, rho, delta, STEP, FAST), 0.0)
        else:
            g = step_neg(d, inv_tau, rho, delta, start, offset, STEP, FAST)
            if STEP == 1:
                big = valid[None, :] & (g == float("inf"))
                n_inf += tl.sum(big.to(tl.int32), axis=1)
                acc += tl.where(valid[None, :] & ~big, g, 0.0)
            else:
                acc += tl.where(valid[None, :], g, 0.0)
    return tl.sum(acc, axis=1), n_inf, n_nan


# --------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["N_KEY"])
def _rank_sums_fwd_kernel(
    scores_ptr, pos_idx_ptr, ign_idx_ptr, ign_mask_ptr, params_ptr, rank_all_ptr, rank_pos_ptr,
    N, P, N_KEY,
    stride_sq, stride_sn, stride_pq, stride_pp, stride_iq, stride_mq, stride_mn,
    STEP: tl.constexpr, IGNORE: tl.constexpr, FAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Forward: rank_all, rank_pos of BLOCK_P ranked positives of one query.

    Grid (Q, cdiv(P, BLOCK_P)). Pointers:
        scores_ptr    (Q, N) float16/bfloat16/float32/float64, strides (stride_sq, stride_sn)
        pos_idx_ptr   (Q, P) int64 column of each ranked positive, -1 = hole, strides (stride_pq, stride_pp)
        ign_idx_ptr   (Q,) int64 ignored column per query (-1 = none), stride stride_iq; read if IGNORE & 1
        ign_mask_ptr  (Q, N) uint8 (a bool mask viewed as bytes), nonzero = ignored, strides
                      (stride_mq, stride_mn); read if IGNORE & 2
        params_ptr    (5,) accumulation dtype: 1/tau, rho, delta, start, offset
        rank_all_ptr, rank_pos_ptr  (Q, P) contiguous outputs, dtype of scores; 0 at holes
    Scalars: N, P; N_KEY (N rounded up to a power of two) only keys the autotuner.
    Constexprs:
        STEP     0 sigmoid, 1 suprank
        IGNORE   bit set: 1 = ign_idx, 2 = ign_mask (0 = nothing ignored)
        FAST     sigma via tanh.approx.f32 (GPU, float32 only)
        BLOCK_P  ranked positives per program
        BLOCK_K  competitors per tile of the sweep
    """
    i = tl.program_id(0).to(tl.int64)
    ACC = params_ptr.dtype.element_ty
    inv_tau, rho, delta, start, offset = load_step_params(params_ptr)
    offs_p, in_p, j, has, s_row, sj = ranked_block(
        scores_ptr, pos_idx_ptr, i, tl.program_id(1), P, stride_sq, stride_sn, stride_pq, stride_pp, BLOCK_P, ACC
    )

    rank_all = tl.zeros((BLOCK_P,), ACC)
    rank_pos = tl.zeros((BLOCK_P,), ACC)
    if tl.max(has.to(tl.int32), axis=0) > 0:
        ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
        # sweep: every valid competitor, j itself included, gets g; suprank's H^- = +inf terms
        # (d = +inf, or an overflowing line) are counted apart in n_inf
        rank_all, n_inf, n_nan = _sweep(
            s_row, sj, N, ign, mask_row, stride_sn, stride_mn, inv_tau, rho, delta, start, offset,
            STEP, IGNORE, FAST, False, BLOCK_P, BLOCK_K, ACC,
        )
        # positive sweep through pos_idx (positives are never ignored)
        for t0 in range(0, P, BLOCK_P):
            offs_t = t0 + tl.arange(0, BLOCK_P)
            jt = tl.load(pos_idx_ptr + i * stride_pq + offs_t.to(tl.int64) * stride_pp, mask=offs_t < P, other=-1)
            has_t = jt >= 0
            st = tl.load(s_row + jt * stride_sn, mask=has_t, other=0.0).to(ACC)
            d = st[None, :] - sj[:, None]
            if STEP == 0:
                h = step_neg(d, inv_tau, rho, delta, start, offset, STEP, FAST)
                rank_pos += tl.sum(tl.where(has_t[None, :], h, 0.0), axis=1)
            else:
                h = heaviside(d)
                hneg = step_neg(d, inv_tau, rho, delta, start, offset, STEP, FAST)
                big = has_t[None, :] & (hneg == float("inf"))
                n_inf -= tl.sum(big.to(tl.int32), axis=1)
                rank_pos += tl.sum(tl.where(has_t[None, :], h, 0.0), axis=1)
                rank_all += tl.sum(tl.where(has_t[None, :], h - tl.where(big, 0.0, hneg), 0.0), axis=1)
        if STEP == 0:
            # 1 + sum_{k != j} = 1/2 + sum_k, since k = j contributed sigma(0) = 1/2
            rank_all = rank_all + 0.5
            rank_pos = rank_pos + 0.5
        rank_all = tl.where(n_inf > 0, float("inf"), rank_all)
        row_nan = tl.max(n_nan, axis=0) > 0
        rank_all = tl.where(row_nan, NAN, rank_all)
        rank_pos = tl.where(row_nan, NAN, rank_pos)

    store_ranks(rank_all_ptr, rank_pos_ptr, rank_all, rank_pos, i, P, offs_p, in_p, has)


@triton.jit(do_not_specialize=["N_KEY"])
def _rank_sums_bwd_rows_kernel(
    scores_ptr, pos_idx_ptr, ign_idx_ptr, ign_mask_ptr, params_ptr, grad_all_ptr, grad_pos_ptr,
    out_ptr, nan_flag_ptr,
    N, P, N_KEY,
    stride_sq, stride_sn, stride_pq, stride_pp, stride_iq, stride_mq, stride_mn,
    stride_aq, stride_ap, stride_bq, stride_bp,
    STEP: tl.constexpr, IGNORE: tl.constexpr, FAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward, per ranked positive: out = corr - tot (what scatters onto the positives' columns).

    Grid (Q, cdiv(P, BLOCK_P)). With a = grad_all, b = grad_pos, g' the derivative of the
    sweep's step and w = b (sigmoid) or -a (suprank):
        tot_j  = a_j sum_{k valid} g'(s_k - s_j) + (b_j | -a_j) sum_{k in P} g'(s_k - s_j)
        corr_j = sum_{t in P} w_t g'(s_j - s_t)
    Pointers:
        scores_ptr    (Q, N) scores, strides (stride_sq, stride_sn)
        pos_idx_ptr   (Q, P) int64 ranked positives, -1 = hole, strides (stride_pq, stride_pp)
        ign_idx_ptr   (Q,) int64 ignored column (-1 = none), stride stride_iq; read if IGNORE & 1
        ign_mask_ptr  (Q, N) uint8 ignore mask, strides (stride_mq, stride_mn); read if IGNORE & 2
        params_ptr    (5,) accumulation dtype: 1/tau, rho, delta, start, offset
        grad_all_ptr  (Q, P) dL/drank_all, any float dtype, strides (stride_aq, stride_ap)
        grad_pos_ptr  (Q, P) dL/drank_pos, strides (stride_bq, stride_bp); read for sigmoid only
        out_ptr       (Q, P) contiguous, accumulation dtype: corr - tot, 0 at holes, NaN in NaN rows
        nan_flag_ptr  (Q,) int32, zero-initialised: set to 1 for a row with a positive and a NaN
                      among its valid scores (every writer stores the same value)
    Scalars: N, P; N_KEY only keys the autotuner.
    Constexprs:
        STEP     0 sigmoid, 1 suprank
        IGNORE   bit set: 1 = ign_idx, 2 = ign_mask
        FAST     approximate special functions (GPU, float32 only)
        BLOCK_P  ranked positives per program, and per tile of the positive sweep
        BLOCK_K  competitors per tile of the sweep
    """
    i = tl.program_id(0).to(tl.int64)
    ACC = params_ptr.dtype.element_ty
    inv_tau, rho, delta, _, _ = load_step_params(params_ptr)  # the derivatives need no start/offset
    offs_p, in_p, j, has, s_row, sj = ranked_block(
        scores_ptr, pos_idx_ptr, i, tl.program_id(1), P, stride_sq, stride_sn, stride_pq, stride_pp, BLOCK_P, ACC
    )

    out = tl.zeros((BLOCK_P,), ACC)
    if tl.max(has.to(tl.int32), axis=0) > 0:
        a = tl.load(grad_all_ptr + i * stride_aq + offs_p.to(tl.int64) * stride_ap, mask=has, other=0.0).to(ACC)
        ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
        sum_all, _no_inf, n_nan = _sweep(  # (n_inf is the forward's; a fresh name: `_` holds a scalar)
            s_row, sj, N, ign, mask_row, stride_sn, stride_mn, inv_tau, rho, delta, 0.0, 0.0,  # g': no start/offset
            STEP, IGNORE, FAST, True, BLOCK_P, BLOCK_K, ACC,
        )
        sum_pos = tl.zeros((BLOCK_P,), ACC)
        corr = tl.zeros((BLOCK_P,), ACC)
        for t0 in range(0, P, BLOCK_P):
            offs_t = t0 + tl.arange(0, BLOCK_P)
            in_t = offs_t < P
            jt = tl.load(pos_idx_ptr + i * stride_pq + offs_t.to(tl.int64) * stride_pp, mask=in_t, other=-1)
            has_t = jt >= 0
            st = tl.load(s_row + jt * stride_sn, mask=has_t, other=0.0).to(ACC)
            # convert before negating: the interpreter keeps bfloat16 as raw 16-bit integers
            if STEP == 0:
                w_ptr = grad_pos_ptr + i * stride_bq + offs_t.to(tl.int64) * stride_bp
                w = tl.load(w_ptr, mask=has_t, other=0.0).to(ACC)
            else:
                w_ptr = grad_all_ptr + i * stride_aq + offs_t.to(tl.int64) * stride_ap
                w = -tl.load(w_ptr, mask=has_t, other=0.0).to(ACC)
            # this program's positives ranked against positive t ...
            d1 = st[None, :] - sj[:, None]
            g1 = step_neg_grad(d1, inv_tau, rho, delta, STEP, FAST)
            sum_pos += tl.sum(tl.where(has_t[None, :], g1, 0.0), axis=1)
            # ... and competing in the rank of positive t
            d2 = sj[:, None] - st[None, :]
            g2 = step_neg_grad(d2, inv_tau, rho, delta, STEP, FAST)
            corr += tl.sum(tl.where(has_t[None, :], w[None, :] * g2, 0.0), axis=1)
        if STEP == 0:
            b = tl.load(grad_pos_ptr + i * stride_bq + offs_p.to(tl.int64) * stride_bp, mask=has, other=0.0).to(ACC)
            tot = a * sum_all + b * sum_pos
        else:
            tot = a * (sum_all - sum_pos)
        out = corr - tot
        row_nan = tl.max(n_nan, axis=0) > 0
        out = tl.where(row_nan, NAN, out)
        tl.store(nan_flag_ptr + i, 1, mask=row_nan)

    tl.store(out_ptr + i * P + offs_p, tl.where(has, out, 0.0), mask=in_p)


@triton.jit(do_not_specialize=["N_KEY"])
def _rank_sums_bwd_cols_kernel(
    scores_ptr, pos_idx_ptr, ign_idx_ptr, ign_mask_ptr, params_ptr, grad_all_ptr, nan_flag_ptr,
    grad_ptr,
    N, P, N_KEY,
    stride_sq, stride_sn, stride_pq, stride_pp, stride_iq, stride_mq, stride_mn,
    stride_aq, stride_ap,
    STEP: tl.constexpr, IGNORE: tl.constexpr, FAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward, per competitor column: grad[i, k] = sum_{j in P} a_j g'(s_k - s_j) for valid k.

    Grid (Q, cdiv(N, BLOCK_K)); each program loops over the query's ranked positives in
    tiles of BLOCK_P. Ignored columns get 0; rows flagged by the rows kernel get NaN at
    valid columns (launch it first). Positive columns receive the rows kernel's output
    afterwards (scatter_add on the host).
    Pointers:
        scores_ptr    (Q, N) scores, strides (stride_sq, stride_sn)
        pos_idx_ptr   (Q, P) int64 ranked positives, -1 = hole, strides (stride_pq, stride_pp)
        ign_idx_ptr   (Q,) int64 ignored column (-1 = none), stride stride_iq; read if IGNORE & 1
        ign_mask_ptr  (Q, N) uint8 ignore mask, strides (stride_mq, stride_mn); read if IGNORE & 2
        params_ptr    (5,) accumulation dtype: 1/tau, rho, delta, start, offset
        grad_all_ptr  (Q, P) dL/drank_all, strides (stride_aq, stride_ap)
        nan_flag_ptr  (Q,) int32 written by the rows kernel
        grad_ptr      (Q, N) contiguous output, accumulation dtype
    Scalars: N, P; N_KEY only keys the autotuner.
    Constexprs:
        STEP     0 sigmoid, 1 suprank
        IGNORE   bit set: 1 = ign_idx, 2 = ign_mask
        FAST     approximate special functions (GPU, float32 only)
        BLOCK_P  ranked positives per tile of the loop
        BLOCK_K  columns per program
    """
    i = tl.program_id(0).to(tl.int64)
    ACC = params_ptr.dtype.element_ty
    inv_tau, rho, delta, _, _ = load_step_params(params_ptr)  # the derivatives need no start/offset
    offs_k, valid, s_row, sk = column_block(
        scores_ptr, ign_idx_ptr, ign_mask_ptr, i, tl.program_id(1), N,
        stride_sq, stride_sn, stride_iq, stride_mq, stride_mn, IGNORE, BLOCK_K, ACC,
    )

    acc = tl.zeros((BLOCK_P, BLOCK_K), ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        in_p = offs_p < P
        j = tl.load(pos_idx_ptr + i * stride_pq + offs_p.to(tl.int64) * stride_pp, mask=in_p, other=-1)
        has = j >= 0
        if tl.max(has.to(tl.int32), axis=0) > 0:
            sj = tl.load(s_row + j * stride_sn, mask=has, other=0.0).to(ACC)
            a = tl.load(grad_all_ptr + i * stride_aq + offs_p.to(tl.int64) * stride_ap, mask=has, other=0.0)
            d = sk[None, :] - sj[:, None]
            # holes have a = 0 and g' is always finite, so they add exact zeros
            acc += a.to(ACC)[:, None] * step_neg_grad(d, inv_tau, rho, delta, STEP, FAST)
    store_column_grad(acc, nan_flag_ptr, grad_ptr, i, N, offs_k, valid)


# --------------------------------------------------------------------------- launch configuration


#: block caps under the interpreter, where big blocks are cheap (numpy) and launches are not;
#: tests lower them to drive the multi-tile loops with small shapes
INTERPRETER_MAX_BLOCK_P = 128
INTERPRETER_MAX_BLOCK_K = 1024


def _interpreter_block_k(args) -> int:
    return capped_pow2(args["N"], INTERPRETER_MAX_BLOCK_K)


_fwd = configure_rank_kernel(_rank_sums_fwd_kernel, _interpreter_block_k)
_bwd_rows = configure_rank_kernel(_rank_sums_bwd_rows_kernel, _interpreter_block_k)
_bwd_cols = configure_rank_kernel(_rank_sums_bwd_cols_kernel, _interpreter_block_k)


# --------------------------------------------------------------------------- host side


def forward(
    scores: Tensor,
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: StepParams,
    *,
    fast: Optional[bool] = None,
) -> Tuple[Tensor, Tensor]:
    """rank_all, rank_pos, each (Q, P) in the dtype of `scores`, zero at holes of `pos_idx`.

    Args:
        scores: (Q, N) float16/bfloat16/float32/float64, any strides.
        pos_idx: (Q, P) int64 columns of the ranked positives (-1 = hole, unique per row,
            never ignored).
        ignore_idx: (Q,) int64 column to leave out per query (-1 = none), or None.
        ignore_mask: (Q, N) bool, True = left out, or None.
        params: the step (fastrank.core.params.StepParams).
        fast: sigma through tanh.approx.f32 (GPU, float32 math only); None reads
            FASTRANK_TRITON_FAST (default off).
    """
    fn = "fastrank.triton_kernels.rank_sums.forward"
    check_step_inputs(fn, scores, pos_idx, ignore_idx, ignore_mask, params)
    bp = rank_block_p(pos_idx.shape[1], INTERPRETER_MAX_BLOCK_P)
    return launch_rank_forward(_fwd, bp, scores, pos_idx, ignore_idx, ignore_mask, params, fast)


def backward(
    grad_rank_all: Optional[Tensor],
    grad_rank_pos: Optional[Tensor],
    scores: Tensor,
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: StepParams,
    *,
    fast: Optional[bool] = None,
) -> Tensor:
    """dL/dscores (Q, N), dtype of `scores`, from dL/drank_all and dL/drank_pos (each (Q, P) or None).

    Deterministic: no floating-point atomics; every output is summed in a fixed order.
    """
    fn = "fastrank.triton_kernels.rank_sums.backward"
    check_step_inputs(fn, scores, pos_idx, ignore_idx, ignore_mask, params)
    grad_rank_all, grad_rank_pos = rank_grads(
        fn, ("grad_rank_all", "grad_rank_pos"), grad_rank_all, grad_rank_pos, scores, pos_idx
    )
    bp = rank_block_p(pos_idx.shape[1], INTERPRETER_MAX_BLOCK_P)
    return launch_rank_backward(
        _bwd_rows, _bwd_cols, bp, grad_rank_all, grad_rank_pos, scores, pos_idx, ignore_idx, ignore_mask, params, fast,
    )
