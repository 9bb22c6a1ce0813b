"""Triton kernels of the GRADED rank-sums primitive (docs/design.md §1.1-1.2, issue 9): forward and
deterministic backward.

Same contract as `fastrank.graded.chunked.dense_forward/dense_backward`, in the packed layout of
`triton_kernels/rank_sums.py`: each query i has the packed list of its ranked items
`pos_idx[i]` (-1 = hole; relevance > 0, never ignored), validity (ignore) is one column per
query or a (Q, N) mask, the graded relevance is a dense (Q, N) floating tensor and so is the
optional ordering key (HAS_KEY; without it the key is the relevance). Per ranked item j, with
d = s_ik - s_ij, w_jk = min(rel_j, rel_k) and k over the valid competitors (relevance 0 allowed):

    rank_all[i, j] = 1     + sum_{k != j} g(d)
    rank_pos[i, j] = rel_j + sum_{k != j} w_jk h(d)

* STEP 0 (sigmoid): g = h = sigma_tau (the key plays no part).
* STEP 1 (suprank): g = H (H(0) = 1, no gradient) if key_k >= key_j, else H^-; h = H, or with
  HRANK (HAPPIER's smoothed H-rank) h = h+ (`_step.hrank_plus`) where key_k > key_j.

One sweep over every valid k, j itself included. Self terms: sigmoid gives sigma(0) = 1/2 to
rank_all and rel_j / 2 to rank_pos, so rank_all = 1/2 + sweep, rank_pos = rel_j / 2 + sweep;
suprank gives H(0) = 1 (key_j >= key_j, and never key_j > key_j for h+) and rel_j * H(0) = rel_j,
which supply "1 +" and "rel_j +" exactly.

Backward (no float atomics, so bitwise deterministic), with a_j = dL/drank_all,
b_j = dL/drank_pos and, for k != j,

    c_jk = (a_j + b_j w_jk) sigma_tau'(d)                                  (sigmoid)
    c_jk = a_j [key_k < key_j] H^-'(d) + b_j w_jk [key_k > key_j] h+'(d)  (suprank; H has no
                                                                          gradient, h+ only with HRANK)

dL/ds_ik += c_jk and dL/ds_ij -= c_jk. The self pair k = j is left out (its two terms
cancel; dropping it costs one compare and avoids adding and subtracting sigma'(0) = 1/(4 tau)):

1. rows kernel, grid (Q, cdiv(P, BLOCK_P)): out[i, p] = -tot_j = -sum_k c_jk for the ranked
   item j = pos_idx[i, p]; it also flags rows with a NaN among their valid scores.
2. columns kernel, grid (Q, cdiv(N, BLOCK_K)): grad[i, k] = sum_{j ranked} c_jk (through
   tiles of pos_idx) for valid k, 0 for ignored k, NaN at valid k of a flagged row.
3. grad.scatter_add_(1, pos_idx, out): the columns of a row's ranked items are unique, so
   every cell receives at most one addend; holes add an exact +0.0 to column 0, which never
   changes a value, so the result is deterministic.

Accumulation in float32 (float64 for float64 scores); d is formed in that dtype and the
relevance is cast to it on load. NaN: a NaN among a row's valid scores makes that row's
ranks (non-holes) and its gradient at valid entries NaN, as in `rank_sums.py`; rows without
a ranked item keep zero outputs and a zero gradient. Detected inside the kernels, so there
is no host synchronisation. Relevance and key values are not checked here (no host sync): the
callers validate them (finite, >= 0) with `fastrank.graded.check_relevance` and
`fastrank.core.validate.check_key`.

Launch: on a GPU each kernel is autotuned over (BLOCK_K, num_warps) keyed on (N rounded up
to a power of two, BLOCK_P, STEP, IGNORE, HAS_KEY, HRANK); BLOCK_P comes from P. Under TRITON_INTERPRET=1
(checked at import) one large-block configuration is used. `FASTRANK_TRITON_FAST=1` (or
`fast=True`) selects the special-function sigma on float32 GPU runs (see `_step.py`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    NAN, capped_pow2, check_dense_operand, check_step_inputs, column_block, configure_rank_kernel,
    launch_rank_backward, launch_rank_forward, rank_block_p, rank_grads, ranked_block, row_ignore,
    store_column_grad, store_ranks, valid_cols,
)
from fastrank.core.params import SUPRANK

from ._step import heaviside, hrank_plus, hrank_plus_grad, load_hrank_params, load_step_params, step_neg, step_neg_grad

Tensor = torch.Tensor


# --------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["N_KEY"])
def _graded_fwd_kernel(
    scores_ptr, pos_idx_ptr, ign_idx_ptr, ign_mask_ptr, rel_ptr, key_ptr, params_ptr, rank_all_ptr, rank_pos_ptr,
    N, P, N_KEY,
    stride_sq, stride_sn, stride_pq, stride_pp, stride_iq, stride_mq, stride_mn, stride_rq, stride_rn,
    stride_kq, stride_kn,
    STEP: tl.constexpr, IGNORE: tl.constexpr, FAST: tl.constexpr, HAS_KEY: tl.constexpr, HRANK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Forward: graded rank_all, rank_pos of BLOCK_P ranked items of one query.

    Grid (Q, cdiv(P, BLOCK_P)). Pointers:
        scores_ptr    (Q, N) float16/bfloat16/float32/float64, strides (stride_sq, stride_sn)
        pos_idx_ptr   (Q, P) int64 column of each ranked item, -1 = hole, strides (stride_pq, stride_pp)
        ign_idx_ptr   (Q,) int64 ignored column per query (-1 = none), stride stride_iq; read if IGNORE & 1
        ign_mask_ptr  (Q, N) uint8 (a bool mask viewed as bytes), nonzero = ignored, strides
                      (stride_mq, stride_mn); read if IGNORE & 2
        rel_ptr       (Q, N) graded relevance, any floating dtype (cast to the accumulation dtype
                      on load), strides (stride_rq, stride_rn)
        key_ptr       (Q, N) ordering key, any floating dtype (cast on load), strides (stride_kq,
                      stride_kn); read if HAS_KEY (else the relevance is the key)
        params_ptr    (5,) accumulation dtype: 1/tau, rho, delta, start, offset; (8,) with HRANK:
                      then beta, gamma, leak of the smoothed H-rank
        rank_all_ptr, rank_pos_ptr  (Q, P) contiguous outputs, dtype of scores; 0 at holes
    Scalars: N, P; N_KEY (N rounded up to a power of two) only keys the autotuner.
    Constexprs:
        STEP     0 sigmoid, 1 suprank
        IGNORE   bit set: 1 = ign_idx, 2 = ign_mask (0 = nothing ignored)
        FAST     sigma via tanh.approx.f32 (GPU, float32 only)
        HAS_KEY  suprank: an ordering key apart from the relevance
        HRANK    suprank: HAPPIER's smoothed H-rank h+ in rank_pos
        BLOCK_P  ranked items per program
        BLOCK_K  competitors per tile of the sweep
    """
    i = tl.program_id(0).to(tl.int64)
    ACC = params_ptr.dtype.element_ty
    inv_tau, rho, delta, start, offset = load_step_params(params_ptr)
    offs_p, in_p, j, has, s_row, sj = ranked_block(
        scores_ptr, pos_idx_ptr, i, tl.program_id(1), P, stride_sq, stride_sn, stride_pq, stride_pp, BLOCK_P, ACC
    )
    r_row = rel_ptr + i * stride_rq
    rj = tl.load(r_row + j * stride_rn, mask=has, other=0.0).to(ACC)
    k_row = key_ptr + i * stride_kq
    if HAS_KEY:
        kj = tl.load(k_row + j * stride_kn, mask=has, other=0.0).to(ACC)
    else:
        kj = rj
    if HRANK:
        beta, gamma, leak = load_hrank_params(params_ptr + 5)

    rank_all = tl.zeros((BLOCK_P,), ACC)
    rank_pos = tl.zeros((BLOCK_P,), ACC)
    if tl.max(has.to(tl.int32), axis=0) > 0:
        ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
        # one sweep: every valid competitor, j itself included
        acc_all = tl.zeros((BLOCK_P, BLOCK_K), ACC)
        acc_pos = tl.zeros((BLOCK_P, BLOCK_K), ACC)
        n_nan = tl.zeros((BLOCK_K,), tl.int32)
        for k0 in range(0, N, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            valid = valid_cols(offs_k, N, ign, mask_row, stride_mn, IGNORE)
            sk = tl.load(s_row + offs_k.to(tl.int64) * stride_sn, mask=valid, other=0.0).to(ACC)
            rk = tl.load(r_row + offs_k.to(tl.int64) * stride_rn, mask=valid, other=0.0).to(ACC)
            n_nan += (sk != sk).to(tl.int32)
            d = sk[None, :] - sj[:, None]
            w = tl.minimum(rj[:, None], rk[None, :])
            if STEP == 0:
                g = step_neg(d, inv_tau, rho, delta, start, offset, STEP, FAST)
                acc_all += tl.where(valid[None, :], g, 0.0)
                acc_pos += tl.where(valid[None, :], w * g, 0.0)
            else:
                if HAS_KEY:
                    kk = tl.load(k_row + offs_k.to(tl.int64) * stride_kn, mask=valid, other=0.0).to(ACC)
                else:
                    kk = rk
                h = heaviside(d)
                hneg = step_neg(d, inv_tau, rho, delta, start, offset, STEP, FAST)
                g = tl.where(kk[None, :] >= kj[:, None], h, hneg)
                acc_all += tl.where(valid[None, :], g, 0.0)
                if HRANK:
                    # strictly above: never j itself, whose H(0) = 1 supplies "rel_j +"
                    h = tl.where(kk[None, :] > kj[:, None], hrank_plus(d, beta, gamma, leak), h)
                acc_pos += tl.where(valid[None, :], w * h, 0.0)
        rank_all = tl.sum(acc_all, axis=1)
        rank_pos = tl.sum(acc_pos, axis=1)
        if STEP == 0:
            # 1 + sum_{k != j} = 1/2 + sum_k and rel_j + sum_{k != j} = rel_j / 2 + sum_k,
            # since k = j contributed sigma(0) = 1/2 and min(rel_j, rel_j) sigma(0) = rel_j / 2
            rank_all = rank_all + 0.5
            rank_pos = rank_pos + 0.5 * rj
        row_nan = tl.max(n_nan, axis=0) > 0
        rank_all = tl.where(row_nan, NAN, rank_all)
        rank_pos = tl.where(row_nan, NAN, rank_pos)

    store_ranks(rank_all_ptr, rank_pos_ptr, rank_all, rank_pos, i, P, offs_p, in_p, has)


@triton.jit(do_not_specialize=["N_KEY"])
def _graded_bwd_rows_kernel(
    scores_ptr, pos_idx_ptr, ign_idx_ptr, ign_mask_ptr, rel_ptr, key_ptr, params_ptr, grad_all_ptr, grad_pos_ptr,
    out_ptr, nan_flag_ptr,
    N, P, N_KEY,
    stride_sq, stride_sn, stride_pq, stride_pp, stride_iq, stride_mq, stride_mn, stride_rq, stride_rn,
    stride_kq, stride_kn, stride_aq, stride_ap, stride_bq, stride_bp,
    STEP: tl.constexpr, IGNORE: tl.constexpr, FAST: tl.constexpr, HAS_KEY: tl.constexpr, HRANK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward, per ranked item: out = -tot_j = -sum_{k valid, k != j} c_jk (what scatters onto its column).

    Grid (Q, cdiv(P, BLOCK_P)). c_jk = (a_j + b_j w_jk) sigma_tau'(s_k - s_j) (sigmoid) or
    a_j [key_k < key_j] H^-'(s_k - s_j) + b_j w_jk [key_k > key_j] h+'(s_k - s_j) (suprank, the
    h+ term with HRANK only), w_jk = min(rel_j, rel_k), a = grad_all, b = grad_pos.
    Pointers:
        scores_ptr    (Q, N) scores, strides (stride_sq, stride_sn)
        pos_idx_ptr   (Q, P) int64 ranked items, -1 = hole, strides (stride_pq, stride_pp)
        ign_idx_ptr   (Q,) int64 ignored column (-1 = none), stride stride_iq; read if IGNORE & 1
        ign_mask_ptr  (Q, N) uint8 ignore mask, strides (stride_mq, stride_mn); read if IGNORE & 2
        rel_ptr       (Q, N) graded relevance, any floating dtype, strides (stride_rq, stride_rn)
        key_ptr       (Q, N) ordering key, any floating dtype (cast on load), strides (stride_kq,
                      stride_kn); read if HAS_KEY (else the relevance is the key)
        params_ptr    (5,) accumulation dtype: 1/tau, rho, delta, start, offset; (8,) with HRANK:
                      then beta, gamma, leak of the smoothed H-rank
        grad_all_ptr  (Q, P) dL/drank_all, any float dtype, strides (stride_aq, stride_ap)
        grad_pos_ptr  (Q, P) dL/drank_pos, strides (stride_bq, stride_bp); read for sigmoid or HRANK
        out_ptr       (Q, P) contiguous, accumulation dtype: -tot, 0 at holes, NaN in NaN rows
        nan_flag_ptr  (Q,) int32, zero-initialised: set to 1 for a row with a ranked item and a
                      NaN among its valid scores (every writer stores the same value)
    Scalars: N, P; N_KEY only keys the autotuner.
    Constexprs:
        STEP     0 sigmoid, 1 suprank
        IGNORE   bit set: 1 = ign_idx, 2 = ign_mask
        FAST     approximate special functions (GPU, float32 only)
        HAS_KEY  suprank: an ordering key apart from the relevance
        HRANK    suprank: HAPPIER's smoothed H-rank h+ in rank_pos
        BLOCK_P  ranked items per program
        BLOCK_K  competitors per tile of the sweep
    """
    i = tl.program_id(0).to(tl.int64)
    ACC = params_ptr.dtype.element_ty
    inv_tau, rho, delta, _, _ = load_step_params(params_ptr)  # the derivatives need no start/offset
    offs_p, in_p, j, has, s_row, sj = ranked_block(
        scores_ptr, pos_idx_ptr, i, tl.program_id(1), P, stride_sq, stride_sn, stride_pq, stride_pp, BLOCK_P, ACC
    )
    offs_p64 = offs_p.to(tl.int64)
    r_row = rel_ptr + i * stride_rq
    rj = tl.load(r_row + j * stride_rn, mask=has, other=0.0).to(ACC)
    k_row = key_ptr + i * stride_kq
    if HAS_KEY:
        kj = tl.load(k_row + j * stride_kn, mask=has, other=0.0).to(ACC)
    else:
        kj = rj
    if HRANK:
        beta, gamma, leak = load_hrank_params(params_ptr + 5)

    out = tl.zeros((BLOCK_P,), ACC)
    if tl.max(has.to(tl.int32), axis=0) > 0:
        # convert on load: the interpreter keeps bfloat16 as raw 16-bit integers
        a = tl.load(grad_all_ptr + i * stride_aq + offs_p64 * stride_ap, mask=has, other=0.0).to(ACC)
        b = tl.zeros((BLOCK_P,), ACC)
        if (STEP == 0) or HRANK:
            b = tl.load(grad_pos_ptr + i * stride_bq + offs_p64 * stride_bp, mask=has, other=0.0).to(ACC)
        ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
        acc = tl.zeros((BLOCK_P, BLOCK_K), ACC)
        n_nan = tl.zeros((BLOCK_K,), tl.int32)
        for k0 in range(0, N, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            valid = valid_cols(offs_k, N, ign, mask_row, stride_mn, IGNORE)
            sk = tl.load(s_row + offs_k.to(tl.int64) * stride_sn, mask=valid, other=0.0).to(ACC)
            rk = tl.load(r_row + offs_k.to(tl.int64) * stride_rn, mask=valid, other=0.0).to(ACC)
            n_nan += (sk != sk).to(tl.int32)
            d = sk[None, :] - sj[:, None]
            gp = step_neg_grad(d, inv_tau, rho, delta, STEP, FAST)
            if STEP == 0:
                coef = a[:, None] + b[:, None] * tl.minimum(rj[:, None], rk[None, :])
                keep = valid[None, :] & (offs_k[None, :] != j[:, None])
                acc += tl.where(keep, coef * gp, 0.0)
            else:
                if HAS_KEY:
                    kk = tl.load(k_row + offs_k.to(tl.int64) * stride_kn, mask=valid, other=0.0).to(ACC)
                else:
                    kk = rk
                # key_k < key_j (and key_k > key_j) already exclude k = j
                keep = valid[None, :] & (kk[None, :] < kj[:, None])
                if HRANK:
                    up = valid[None, :] & (kk[None, :] > kj[:, None])
                    w = tl.minimum(rj[:, None], rk[None, :])
                    hp = b[:, None] * w * hrank_plus_grad(d, beta, gamma, leak)
                    acc += tl.where(keep, a[:, None] * gp, tl.where(up, hp, 0.0))
                else:
                    acc += tl.where(keep, a[:, None] * gp, 0.0)
        out = -tl.sum(acc, axis=1)
        row_nan = tl.max(n_nan, axis=0) > 0
        out = tl.where(row_nan, NAN, out)
        tl.store(nan_flag_ptr + i, 1, mask=row_nan)

    tl.store(out_ptr + i * P + offs_p, tl.where(has, out, 0.0), mask=in_p)


@triton.jit(do_not_specialize=["N_KEY"])
def _graded_bwd_cols_kernel(
    scores_ptr, pos_idx_ptr, ign_idx_ptr, ign_mask_ptr, rel_ptr, key_ptr, params_ptr, grad_all_ptr, grad_pos_ptr,
    nan_flag_ptr, grad_ptr,
    N, P, N_KEY,
    stride_sq, stride_sn, stride_pq, stride_pp, stride_iq, stride_mq, stride_mn, stride_rq, stride_rn,
    stride_kq, stride_kn, stride_aq, stride_ap, stride_bq, stride_bp,
    STEP: tl.constexpr, IGNORE: tl.constexpr, FAST: tl.constexpr, HAS_KEY: tl.constexpr, HRANK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward, per competitor column: grad[i, k] = sum_{j ranked, j != k} c_jk for valid k.

    Grid (Q, cdiv(N, BLOCK_K)); each program loops over the query's ranked items in tiles of
    BLOCK_P. Ignored columns get 0; rows flagged by the rows kernel get NaN at valid columns
    (launch it first). The ranked items' own columns receive the rows kernel's output
    afterwards (scatter_add on the host).
    Pointers:
        scores_ptr    (Q, N) scores, strides (stride_sq, stride_sn)
        pos_idx_ptr   (Q, P) int64 ranked items, -1 = hole, strides (stride_pq, stride_pp)
        ign_idx_ptr   (Q,) int64 ignored column (-1 = none), stride stride_iq; read if IGNORE & 1
        ign_mask_ptr  (Q, N) uint8 ignore mask, strides (stride_mq, stride_mn); read if IGNORE & 2
        rel_ptr       (Q, N) graded relevance, any floating dtype, strides (stride_rq, stride_rn)
        key_ptr       (Q, N) ordering key, any floating dtype (cast on load), strides (stride_kq,
                      stride_kn); read if HAS_KEY (else the relevance is the key)
        params_ptr    (5,) accumulation dtype: 1/tau, rho, delta, start, offset; (8,) with HRANK:
                      then beta, gamma, leak of the smoothed H-rank
        grad_all_ptr  (Q, P) dL/drank_all, strides (stride_aq, stride_ap)
        grad_pos_ptr  (Q, P) dL/drank_pos, strides (stride_bq, stride_bp); read for sigmoid or HRANK
        nan_flag_ptr  (Q,) int32 written by the rows kernel
        grad_ptr      (Q, N) contiguous output, accumulation dtype
    Scalars: N, P; N_KEY only keys the autotuner.
    Constexprs:
        STEP     0 sigmoid, 1 suprank
        IGNORE   bit set: 1 = ign_idx, 2 = ign_mask
        FAST     approximate special functions (GPU, float32 only)
        HAS_KEY  suprank: an ordering key apart from the relevance
        HRANK    suprank: HAPPIER's smoothed H-rank h+ in rank_pos
        BLOCK_P  ranked items per tile of the loop
        BLOCK_K  columns per program
    """
    i = tl.program_id(0).to(tl.int64)
    ACC = params_ptr.dtype.element_ty
    inv_tau, rho, delta, _, _ = load_step_params(params_ptr)  # the derivatives need no start/offset
    offs_k, valid, s_row, sk = column_block(
        scores_ptr, ign_idx_ptr, ign_mask_ptr, i, tl.program_id(1), N,
        stride_sq, stride_sn, stride_iq, stride_mq, stride_mn, IGNORE, BLOCK_K, ACC,
    )
    r_row = rel_ptr + i * stride_rq
    rk = tl.load(r_row + offs_k.to(tl.int64) * stride_rn, mask=valid, other=0.0).to(ACC)
    k_row = key_ptr + i * stride_kq
    if HAS_KEY:
        kk = tl.load(k_row + offs_k.to(tl.int64) * stride_kn, mask=valid, other=0.0).to(ACC)
    else:
        kk = rk
    if HRANK:
        beta, gamma, leak = load_hrank_params(params_ptr + 5)

    acc = tl.zeros((BLOCK_P, BLOCK_K), ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        in_p = offs_p < P
        offs_p64 = offs_p.to(tl.int64)
        j = tl.load(pos_idx_ptr + i * stride_pq + offs_p64 * stride_pp, mask=in_p, other=-1)
        has = j >= 0
        if tl.max(has.to(tl.int32), axis=0) > 0:
            sj = tl.load(s_row + j * stride_sn, mask=has, other=0.0).to(ACC)
            rj = tl.load(r_row + j * stride_rn, mask=has, other=0.0).to(ACC)
            a = tl.load(grad_all_ptr + i * stride_aq + offs_p64 * stride_ap, mask=has, other=0.0).to(ACC)
            d = sk[None, :] - sj[:, None]
            gp = step_neg_grad(d, inv_tau, rho, delta, STEP, FAST)
            if STEP == 0:
                b = tl.load(grad_pos_ptr + i * stride_bq + offs_p64 * stride_bp, mask=has, other=0.0).to(ACC)
                coef = a[:, None] + b[:, None] * tl.minimum(rj[:, None], rk[None, :])
                keep = has[:, None] & (offs_k[None, :] != j[:, None])
                acc += tl.where(keep, coef * gp, 0.0)
            else:
                if HAS_KEY:
                    kj = tl.load(k_row + j * stride_kn, mask=has, other=0.0).to(ACC)
                else:
                    kj = rj
                # holes fail `has`, k = j both key_k < key_j and key_k > key_j
                keep = has[:, None] & (kk[None, :] < kj[:, None])
                if HRANK:
                    b = tl.load(grad_pos_ptr + i * stride_bq + offs_p64 * stride_bp, mask=has, other=0.0).to(ACC)
                    up = has[:, None] & (kk[None, :] > kj[:, None])
                    w = tl.minimum(rj[:, None], rk[None, :])
                    hp = b[:, None] * w * hrank_plus_grad(d, beta, gamma, leak)
                    acc += tl.where(keep, a[:, None] * gp, tl.where(up, hp, 0.0))
                else:
                    acc += tl.where(keep, a[:, None] * gp, 0.0)
    store_column_grad(acc, nan_flag_ptr, grad_ptr, i, N, offs_k, valid)


# --------------------------------------------------------------------------- launch configuration


#: block caps under the interpreter, where big blocks are cheap (numpy) and launches are not;
#: tests lower them to drive the multi-tile loops with small shapes
INTERPRETER_MAX_BLOCK_P = 128
INTERPRETER_MAX_BLOCK_K = 1024


def _interpreter_block_k(args) -> int:
    return capped_pow2(args["N"], INTERPRETER_MAX_BLOCK_K)


# the forward keeps two (BLOCK_P, BLOCK_K) accumulators, which the autotuner's pruning counts; the
# key's loads and the H-rank's extra (BLOCK_P, BLOCK_K) temporaries change the register use, so the
# best config can differ: both are part of the autotune key
_KEY_EXTRA = ("HAS_KEY", "HRANK")
_fwd = configure_rank_kernel(_graded_fwd_kernel, _interpreter_block_k, tiles=2, key_extra=_KEY_EXTRA)
_bwd_rows = configure_rank_kernel(_graded_bwd_rows_kernel, _interpreter_block_k, tiles=1, key_extra=_KEY_EXTRA)
_bwd_cols = configure_rank_kernel(_graded_bwd_cols_kernel, _interpreter_block_k, tiles=1, key_extra=_KEY_EXTRA)


# --------------------------------------------------------------------------- host side


def _key_args(fn: str, scores: Tensor, relevance: Tensor, key: Optional[Tensor], params):
    """(the tensor behind key_ptr, the HAS_KEY and HRANK constexprs). Both only change the
    suprank step: a sigmoid run ignores the key and the H-rank, as the references do. Without a
    key the relevance stands behind key_ptr, never read."""
    if key is not None:
        check_dense_operand(fn, "key", key, scores)
    suprank = params.step == SUPRANK
    has_key = key is not None and suprank
    consts = dict(HAS_KEY=has_key, HRANK=bool(getattr(params, "hrank", False)) and suprank)
    return (key if has_key else relevance), consts


def forward(
    scores: Tensor,
    relevance: Tensor,
    key: Optional[Tensor],
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params,
    *,
    fast: Optional[bool] = None,
) -> Tuple[Tensor, Tensor]:
    """Graded rank_all, rank_pos, each (Q, P) in the dtype of `scores`, zero at holes of `pos_idx`.

    Args:
        scores: (Q, N) float16/bfloat16/float32/float64, any strides.
        relevance: (Q, N) floating graded relevance (>= 0, finite; not checked here), any
            strides, on the device of `scores`; read in the accumulation dtype.
        key: (Q, N) floating ordering key of the suprank step (finite, not checked here; exact
            in the accumulation dtype), any strides, on the device of `scores`; None: the relevance.
        pos_idx: (Q, P) int64 columns of the ranked items (-1 = hole, unique per row, relevance
            > 0, never ignored), e.g. `fastrank.core.problem.build_problem(relevance, ...)`.
        ignore_idx: (Q,) int64 column to leave out per query (-1 = none), or None.
        ignore_mask: (Q, N) bool, True = left out, or None.
        params: the step (fastrank.core.params.StepParams; GradedParams with `hrank` for HAPPIER's
            smoothed H-rank, suprank only).
        fast: sigma through tanh.approx.f32 (GPU, float32 math only); None reads
            FASTRANK_TRITON_FAST (default off).
    """
    fn = "fastrank.triton_kernels.graded.forward"
    check_step_inputs(fn, scores, pos_idx, ignore_idx, ignore_mask, params)
    # (Q, N) floating on the device of `scores`; its values are the caller's to validate
    check_dense_operand(fn, "relevance", relevance, scores)
    key_t, consts = _key_args(fn, scores, relevance, key, params)
    bp = rank_block_p(pos_idx.shape[1], INTERPRETER_MAX_BLOCK_P)
    # relevance and key: the pointers after the common four, their strides the last
    return launch_rank_forward(_fwd, bp, scores, pos_idx, ignore_idx, ignore_mask, params, fast,
                               extra=(relevance, key_t), consts=consts)


def backward(
    grad_all: Optional[Tensor],
    grad_pos: Optional[Tensor],
    scores: Tensor,
    relevance: Tensor,
    key: Optional[Tensor],
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params,
    *,
    fast: Optional[bool] = None,
) -> Tensor:
    """dL/dscores (Q, N), dtype of `scores`, from dL/drank_all and dL/drank_pos (each (Q, P) or None = zeros).

    Arguments as in :func:`forward`. No gradient flows to `relevance` or `key`.
    Deterministic: no floating-point atomics; every output is summed in a fixed order.
    """
    fn = "fastrank.triton_kernels.graded.backward"
    check_step_inputs(fn, scores, pos_idx, ignore_idx, ignore_mask, params)
    check_dense_operand(fn, "relevance", relevance, scores)
    key_t, consts = _key_args(fn, scores, relevance, key, params)
    grad_all, grad_pos = rank_grads(fn, ("grad_all", "grad_pos"), grad_all, grad_pos, scores, pos_idx)
    bp = rank_block_p(pos_idx.shape[1], INTERPRETER_MAX_BLOCK_P)
    # both backward kernels read grad_pos (the min(rel_j, rel_k) weight of the sigmoid and of h+)
    return launch_rank_backward(
        _bwd_rows, _bwd_cols, bp, grad_all, grad_pos, scores, pos_idx, ignore_idx, ignore_mask, params, fast,
        extra=(relevance, key_t), cols_grad_pos=True, consts=consts,
    )
