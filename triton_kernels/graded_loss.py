"""Fused graded loss kernels (docs/design.md §2.4): H-AP and NDCG from the dense relevance as given,
in a fixed number of launches and without any host synchronisation. The Triton twin of the C++
`graded_loss` op (csrc/cpu/graded_rank_sums.cpp, `graded_loss_rows`).

The same four launches as the binary kernels of loss.py (three without the gradient), whose
split policy (`loss.splits`), block sizes (`loss._blocks`, its INTERPRETER_* caps and `SPLIT`,
which tests lower there) and autograd Function (`loss._FusedLoss`) this module uses:

1. `_compact_kernel`, grid (Q,): the ranked items (valid, relevance > 0) in column order into
   `cols` (Q, N) int32, their count and a flag word into `meta` (Q, 2): bit 1 = a NaN among the
   row's valid scores, bit 2 = invalid input: a relevance anywhere in the row (ignored items
   included, as the C++ op checks them) that is not finite, negative, a positive subnormal or,
   for NDCG, >= log2(max) of the dtype (the gain 2^r - 1 would overflow); a key anywhere in the
   row that is not finite (the C++ op's kKeyNotFinite); an ignore index outside [-1, N).
2. `_sums_kernel`, grid (Q, C): per ranked item j (relevance r_j, ordering key y_j: the `key`
   given, else the relevance; d = s_k - s_j, one sweep over every valid k, j included;
   w_k = min(r_j, r_k), 0 for an irrelevant k):
       sigmoid: rank_all_j = sum_k sigma(d),  rank_pos_j = sum_k w_k sigma(d)   (+ 1/2, + r_j/2 for j itself)
       suprank: rank_all_j = sum_k [y_k >= y_j] H(d) + [y_k < y_j] H^-(d),  rank_pos_j = sum_k w_k h_k(d)
   with h_k = H, or with HAPPIER's smoothed H-rank (HRANK, H-AP only) h_k = h+ where y_k > y_j;
   with the gradient S1_j = sum_k sigma'(d) (suprank: [y_k < y_j] H^-'(d)), S2_j = sum_k w_k sigma'(d)
   (sigmoid; suprank with HRANK: sum_k w_k [y_k > y_j] h+'(d)); for NDCG also j's place in the ideal
   ordering, #{k ranked: r_k > r_j, or r_k = r_j and k < j} (the stable sort by decreasing relevance
   the C++ op makes, without a sort; the key plays no part in it). The
   split of a row across C programs is that of loss.py (tiles of ranked items dealt round-robin,
   or chunks of columns into partial sums added in a fixed order).
3. `_epilogue_kernel`, grid (Q,): the partials reduced, `HapEpilogue` / `NdcgEpilogue` of
   csrc/epilogue.h transcribed (H-AP: sum_j rank_pos_j / rank_all_j over sum_j r_j; NDCG: DCG over
   IDCG with the gains 2^r - 1 divided by the row's largest), the score and n_pos; with the
   gradient the coefficients a_j = d score / d rank_all_j, b_j = d score / d rank_pos_j and each
   ranked item's own share own_j = a_j S1_j + b_j S2_j, stored as -own_j at its column.
4. `_grad_kernel`, grid (Q, cdiv(N, BLOCK_K)): the gradient row, per column k,
       sigmoid: sum_j (a_j + b_j w_k) sigma'(s_k - s_j),
       suprank: sum_j [y_k < y_j] a_j H^-'(s_k - s_j) + [y_k > y_j] b_j w_k h+'(s_k - s_j) (h+ with HRANK)
   plus -own_k at a ranked column; 0 at ignored columns.

Outputs: the score (Q,) in the accumulation dtype (float32; float64 for float64 scores), n_pos
(Q,) int64 (the ranked items), the gradient rows (Q, N) in the accumulation dtype. A query
without ranked items scores 0 with a zero gradient row. A row flagged NaN scores NaN, its
gradient row NaN at the valid columns when it has ranked items (0 without); a row flagged
invalid scores NaN with a NaN gradient row: where the C++ op raises, this path (no host sync)
makes that query NaN, so `mean` and `sum` are NaN too. No float atomics: bitwise reproducible.

Memory beyond the scores and the gradient rows: the int32 columns and NB accumulation-dtype
(Q, N) planes (rank_all, rank_pos, with the gradient S1 and for the sigmoid or HRANK S2, for NDCG
the ideal place), since the ranked count is known only on the device; the split scratch as in loss.py.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastrank.core.params import SIGMOID, SUPRANK, StepParams

from . import loss as _loss
from ._common import (
    acc_dtype, check_operand, check_tensor, device_constants, ignore_args, row_ignore, use_fast, valid_cols,
)
from ._step import heaviside, hrank_plus, hrank_plus_grad, load_hrank_params, load_step_params, step_neg, step_neg_grad

Tensor = torch.Tensor

# KIND constexpr: which epilogue of csrc/epilogue.h (the C++ op's `kind`)
KIND_HAP = 0
KIND_NDCG = 1
KINDS = {"h_ap": KIND_HAP, "ndcg": KIND_NDCG}

LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _gain(r):
    """NDCG's gain 2^r - 1 (csrc/epilogue.h ndcg_gain): expm1(r ln 2) below 1, exp2(r) - 1 above.
    expm1 as (u - 1) x / log(u), u = exp(x) (Kahan): accurate to a few ulps for small x, where
    u - 1 alone would lose the digits."""
    x = r * LN2
    u = tl.exp(x)
    small = tl.where(u == 1.0, x, (u - 1.0) * x / tl.log(tl.where(u == 1.0, 2.0, u)))
    return tl.where(r < 1.0, small, tl.exp2(r) - 1.0)


@triton.jit
def _sweep(
    sj, rj, kj, j, s_row, rel_row, key_row, k_lo, k_hi, ign, mask_row, stride_sn, stride_rn, stride_kn, stride_mn,
    inv_tau, rho, delta, start, offset, beta, gamma, leak,
    STEP: tl.constexpr, IGNORE: tl.constexpr, GRAD: tl.constexpr, NDCG: tl.constexpr, FAST: tl.constexpr,
    HAS_KEY: tl.constexpr, HRANK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """(rank_all, rank_pos, S1, S2, ideal place) partial sums (BLOCK_P,) of the ranked items
    (scores sj, relevance rj, keys kj, columns j) over the columns [k_lo, k_hi) (module docstring,
    kernel 2); the competitors' keys from key_row if HAS_KEY, else their relevance; (beta, gamma,
    leak) read if HRANK. S1, S2 zeros unless GRAD (S2: sigmoid or HRANK), the place zeros unless NDCG."""
    ra = tl.zeros((BLOCK_P, BLOCK_K), ACC)
    rp = tl.zeros((BLOCK_P, BLOCK_K), ACC)
    s1 = tl.zeros((BLOCK_P, BLOCK_K), ACC)
    s2 = tl.zeros((BLOCK_P, BLOCK_K), ACC)
    ip = tl.zeros((BLOCK_P, BLOCK_K), ACC)
    r2 = rj[:, None]
    y2 = kj[:, None]
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid = valid_cols(offs_k, k_hi, ign, mask_row, stride_mn, IGNORE)
        offs64 = offs_k.to(tl.int64)
        sk = tl.load(s_row + offs64 * stride_sn, mask=valid, other=0.0).to(ACC)
        rk = tl.load(rel_row + offs64 * stride_rn, mask=valid, other=0.0)
        d = sk[None, :] - sj[:, None]
        v2 = valid[None, :]
        w = tl.minimum(r2, rk[None, :])  # 0 for an irrelevant k
        g = step_neg(d, inv_tau, rho, delta, start, offset, STEP, FAST)
        if STEP == 0:
            ra += tl.where(v2, g, 0.0)
            rp += tl.where(v2, w * g, 0.0)
            if GRAD:
                gd = step_neg_grad(d, inv_tau, rho, delta, STEP, FAST)
                s1 += tl.where(v2, gd, 0.0)
                s2 += tl.where(v2, w * gd, 0.0)
        else:
            if HAS_KEY:
                yk = tl.load(key_row + offs64 * stride_kn, mask=valid, other=0.0)
            else:
                yk = rk
            h = heaviside(d)
            hi = yk[None, :] >= y2
            ra += tl.where(v2, tl.where(hi, h, g), 0.0)
            if HRANK:
                # strictly above: never j itself, whose H(0) = 1 supplies "r_j +"
                up = yk[None, :] > y2
                rp += tl.where(v2, w * tl.where(up, hrank_plus(d, beta, gamma, leak), h), 0.0)
            else:
                rp += tl.where(v2, w * h, 0.0)
            if GRAD:
                s1 += tl.where(v2 & ~hi, step_neg_grad(d, inv_tau, rho, delta, STEP, FAST), 0.0)
                if HRANK:
                    s2 += tl.where(v2 & up, w * hrank_plus_grad(d, beta, gamma, leak), 0.0)
        if NDCG:
            before = (rk[None, :] > r2) | ((rk[None, :] == r2) & (offs_k[None, :] < j[:, None]))
            ip += tl.where(v2 & (rk[None, :] > 0.0) & before, 1.0, 0.0)
    return tl.sum(ra, axis=1), tl.sum(rp, axis=1), tl.sum(s1, axis=1), tl.sum(s2, axis=1), tl.sum(ip, axis=1)


@triton.jit
def _store(base_ptr, plane, offs_p, in_p, ra, rp, s1, s2, ip,
           STEP: tl.constexpr, GRAD: tl.constexpr, NDCG: tl.constexpr, HRANK: tl.constexpr, NB: tl.constexpr):
    """The NB planes (rank_all, rank_pos[, S1[, S2]][, place]) at base_ptr + b * plane + offs_p
    (S2 for the sigmoid or HRANK)."""
    tl.store(base_ptr + offs_p, ra, mask=in_p)
    tl.store(base_ptr + plane + offs_p, rp, mask=in_p)
    if GRAD:
        tl.store(base_ptr + 2 * plane + offs_p, s1, mask=in_p)
        if (STEP == 0) or HRANK:
            tl.store(base_ptr + 3 * plane + offs_p, s2, mask=in_p)
    if NDCG:
        tl.store(base_ptr + (NB - 1) * plane + offs_p, ip, mask=in_p)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _compact_kernel(
    scores_ptr, rel_ptr, key_ptr, ign_idx_ptr, ign_mask_ptr, params_ptr, cols_ptr, meta_ptr,
    N,
    stride_sq, stride_sn, stride_rq, stride_rn, stride_kq, stride_kn, stride_iq, stride_mq, stride_mn,
    IGNORE: tl.constexpr, HAS_KEY: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Kernel 1, grid (Q,): row i's ranked columns, in column order, into cols[i, :count] ((Q, N)
    int32, contiguous), meta[i] = (count, flags) ((Q, 2) int32). rel and key (Q, N) in the
    accumulation dtype, the key read (its finiteness checked over the row) if HAS_KEY, a key was
    given; params_ptr[5:8] = (largest finite, smallest normal, relevance limit) of that dtype."""
    i = tl.program_id(0).to(tl.int64)
    big = tl.load(params_ptr + 5)
    tiny = tl.load(params_ptr + 6)
    limit = tl.load(params_ptr + 7)
    ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
    s_row = scores_ptr + i * stride_sq
    rel_row = rel_ptr + i * stride_rq
    key_row = key_ptr + i * stride_kq
    n_nan = tl.zeros((BLOCK_K,), tl.int32)
    n_bad = tl.zeros((BLOCK_K,), tl.int32)
    count = tl.program_id(0) * 0  # an int32 scalar, carried by the loop
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        inb = offs_k < N
        valid = valid_cols(offs_k, N, ign, mask_row, stride_mn, IGNORE)
        offs64 = offs_k.to(tl.int64)
        r = tl.load(rel_row + offs64 * stride_rn, mask=inb, other=0.0)
        s = tl.load(s_row + offs64 * stride_sn, mask=valid, other=0.0).to(tl.float32)
        # the checks of the C++ op's relevance_status, over the whole row
        bad = ~(tl.abs(r) <= big) | (r < 0.0) | ((r > 0.0) & (r < tiny)) | (r >= limit)
        if HAS_KEY:
            # ignored items included, as the C++ op's all_finite over the row
            y = tl.load(key_row + offs64 * stride_kn, mask=inb, other=0.0)
            bad = bad | ~(tl.abs(y) <= big)
        n_bad += (inb & bad).to(tl.int32)
        n_nan += (valid & (s != s)).to(tl.int32)
        pos = valid & (r > 0.0)
        pos32 = pos.to(tl.int32)
        slot = count + tl.cumsum(pos32, axis=0) - 1
        tl.store(cols_ptr + i * N + slot, offs_k, mask=pos)
        count += tl.sum(pos32, axis=0)
    bad_row = tl.max(n_bad, axis=0) > 0
    if IGNORE & 1:
        bad_row = bad_row | (ign < -1) | (ign >= N)
    flags = tl.where(tl.max(n_nan, axis=0) > 0, 1, 0) + tl.where(bad_row, 2, 0)
    tl.store(meta_ptr + i * 2, count)
    tl.store(meta_ptr + i * 2 + 1, flags)


@triton.jit
def _sums_kernel(
    scores_ptr, rel_ptr, key_ptr, ign_idx_ptr, ign_mask_ptr, cols_ptr, meta_ptr, params_ptr, work_ptr, part_ptr,
    Q, N, C, CH,
    stride_sq, stride_sn, stride_rq, stride_rn, stride_kq, stride_kn, stride_iq, stride_mq, stride_mn,
    STEP: tl.constexpr, IGNORE: tl.constexpr, GRAD: tl.constexpr, NDCG: tl.constexpr, FAST: tl.constexpr,
    HAS_KEY: tl.constexpr, HRANK: tl.constexpr, NB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Kernel 2, grid (Q, C): the sums of row i's ranked items (module docstring); work (NB, Q, N)
    and part (Q, C, NB, C * BLOCK_P) in the accumulation dtype; CH the columns of one chunk. The
    key (Q, N, accumulation dtype) read if HAS_KEY (suprank with a key), (beta, gamma, leak) from
    params_ptr[8:11] if HRANK."""
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    ACC = params_ptr.dtype.element_ty
    count = tl.load(meta_ptr + i * 2)
    flags = tl.load(meta_ptr + i * 2 + 1)
    if (count > 0) & (flags == 0):
        inv_tau, rho, delta, start, offset = load_step_params(params_ptr)
        beta, gamma, leak = 0.0, 0.0, 0.0
        if HRANK:
            beta, gamma, leak = load_hrank_params(params_ptr + 8)
        ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
        s_row = scores_ptr + i * stride_sq
        rel_row = rel_ptr + i * stride_rq
        key_row = key_ptr + i * stride_kq
        n_tiles = (count + BLOCK_P - 1) // BLOCK_P
        if n_tiles >= C:
            # enough ranked items: tiles dealt round-robin, each against the whole row
            for t in range(c, n_tiles, C):
                offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
                in_p = offs_p < count
                j = tl.load(cols_ptr + i * N + offs_p, mask=in_p, other=0)
                sj = tl.load(s_row + j.to(tl.int64) * stride_sn, mask=in_p, other=0.0).to(ACC)
                rj = tl.load(rel_row + j.to(tl.int64) * stride_rn, mask=in_p, other=0.0)
                if HAS_KEY:
                    kj = tl.load(key_row + j.to(tl.int64) * stride_kn, mask=in_p, other=0.0)
                else:
                    kj = rj
                ra, rp, s1, s2, ip = _sweep(
                    sj, rj, kj, j, s_row, rel_row, key_row, 0, N, ign, mask_row, stride_sn, stride_rn, stride_kn,
                    stride_mn, inv_tau, rho, delta, start, offset, beta, gamma, leak,
                    STEP, IGNORE, GRAD, NDCG, FAST, HAS_KEY, HRANK, BLOCK_P, BLOCK_K, ACC,
                )
                _store(work_ptr + i * N, Q * N, offs_p, in_p, ra, rp, s1, s2, ip, STEP, GRAD, NDCG, HRANK, NB)
        else:
            # few ranked items: this program's chunk of columns for all of them, partial sums
            k_lo = c * CH
            k_hi = tl.minimum(k_lo + CH, N)
            pw = C * BLOCK_P
            for t in range(0, n_tiles):
                offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
                in_p = offs_p < count
                j = tl.load(cols_ptr + i * N + offs_p, mask=in_p, other=0)
                sj = tl.load(s_row + j.to(tl.int64) * stride_sn, mask=in_p, other=0.0).to(ACC)
                rj = tl.load(rel_row + j.to(tl.int64) * stride_rn, mask=in_p, other=0.0)
                if HAS_KEY:
                    kj = tl.load(key_row + j.to(tl.int64) * stride_kn, mask=in_p, other=0.0)
                else:
                    kj = rj
                ra, rp, s1, s2, ip = _sweep(
                    sj, rj, kj, j, s_row, rel_row, key_row, k_lo, k_hi, ign, mask_row, stride_sn, stride_rn,
                    stride_kn, stride_mn, inv_tau, rho, delta, start, offset, beta, gamma, leak,
                    STEP, IGNORE, GRAD, NDCG, FAST, HAS_KEY, HRANK, BLOCK_P, BLOCK_K, ACC,
                )
                _store(part_ptr + (i * C + c) * NB * pw, pw, offs_p, in_p, ra, rp, s1, s2, ip,
                       STEP, GRAD, NDCG, HRANK, NB)


@triton.jit
def _epilogue_kernel(
    rel_ptr, cols_ptr, meta_ptr, params_ptr, work_ptr, part_ptr, score_ptr, npos_ptr, grad_ptr,
    Q, N, C, stride_rq, stride_rn,
    STEP: tl.constexpr, NDCG: tl.constexpr, GRAD: tl.constexpr, HRANK: tl.constexpr, NB: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Kernel 3, grid (Q,): score[i], npos[i] and, if GRAD, a_j, b_j (over rank_all, rank_pos in
    work) and -own_j at grad[i, col_j] ((Q, N) contiguous); own_j has b_j S2_j for the sigmoid or HRANK."""
    i = tl.program_id(0).to(tl.int64)
    ACC = params_ptr.dtype.element_ty
    count = tl.load(meta_ptr + i * 2)
    flags = tl.load(meta_ptr + i * 2 + 1)
    tl.store(npos_ptr + i, count.to(tl.int64))
    plane = Q * N
    row = work_ptr + i * N
    rel_row = rel_ptr + i * stride_rq
    if flags != 0:
        tl.store(score_ptr + i, float("nan"))
    elif count == 0:
        tl.store(score_ptr + i, 0.0)
    else:
        n_tiles = (count + BLOCK_P - 1) // BLOCK_P
        if n_tiles < C:
            # the partial sums of the C chunk programs, added in the fixed order c = 0..C-1
            pw = C * BLOCK_P
            for t in range(0, n_tiles):
                offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
                in_p = offs_p < count
                for b in tl.static_range(NB):
                    acc = tl.zeros((BLOCK_P,), ACC)
                    for c in range(0, C):
                        acc += tl.load(part_ptr + ((i * C + c) * NB + b) * pw + offs_p, mask=in_p, other=0.0)
                    tl.store(row + b * plane + offs_p, acc, mask=in_p)
            tl.debug_barrier()
        # the sigmoid's sweep counted sigma(0) = 1/2 for j itself, where the ranks have 1 and r_j
        SELF: tl.constexpr = 0.5 if STEP == 0 else 0.0
        # H-AP: the total relevance; NDCG: the largest gain (the row's scale)
        norm = tl.zeros((BLOCK_P,), ACC)
        for t in range(0, n_tiles):
            offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
            in_p = offs_p < count
            j = tl.load(cols_ptr + i * N + offs_p, mask=in_p, other=0)
            rj = tl.load(rel_row + j.to(tl.int64) * stride_rn, mask=in_p, other=0.0)
            if NDCG:
                norm = tl.maximum(norm, rj)
            else:
                norm += rj
        if NDCG:
            top = _gain(tl.max(norm, axis=0))
            top = tl.where(top > 0.0, top, 1.0)
        else:
            total = tl.sum(norm, axis=0)
        acc = tl.zeros((BLOCK_P,), ACC)
        ideal = tl.zeros((BLOCK_P,), ACC)
        for t in range(0, n_tiles):
            offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
            in_p = offs_p < count
            ra = tl.load(row + offs_p, mask=in_p, other=1.0) + SELF
            if NDCG:
                j = tl.load(cols_ptr + i * N + offs_p, mask=in_p, other=0)
                rj = tl.load(rel_row + j.to(tl.int64) * stride_rn, mask=in_p, other=0.0)
                gn = _gain(rj) / top
                place = tl.load(row + (NB - 1) * plane + offs_p, mask=in_p, other=0.0)
                acc += tl.where(in_p, gn / tl.log2(1.0 + ra), 0.0)
                ideal += tl.where(in_p, gn / tl.log2(place + 2.0), 0.0)
            else:
                j = tl.load(cols_ptr + i * N + offs_p, mask=in_p, other=0)
                rj = tl.load(rel_row + j.to(tl.int64) * stride_rn, mask=in_p, other=0.0)
                rp = tl.load(row + plane + offs_p, mask=in_p, other=0.0) + SELF * rj
                acc += tl.where(in_p, rp / ra, 0.0)
        if NDCG:
            idcg = tl.sum(ideal, axis=0)
            tl.store(score_ptr + i, tl.where(idcg > 0.0, tl.sum(acc, axis=0) / tl.where(idcg > 0.0, idcg, 1.0), 0.0))
        else:
            tl.store(score_ptr + i, tl.sum(acc, axis=0) / total)
        if GRAD:
            tl.debug_barrier()
            for t in range(0, n_tiles):
                offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
                in_p = offs_p < count
                j = tl.load(cols_ptr + i * N + offs_p, mask=in_p, other=0)
                rj = tl.load(rel_row + j.to(tl.int64) * stride_rn, mask=in_p, other=0.0)
                ra = tl.load(row + offs_p, mask=in_p, other=1.0) + SELF
                s1 = tl.load(row + 2 * plane + offs_p, mask=in_p, other=0.0)
                if NDCG:
                    disc = tl.log2(1.0 + ra)
                    gn = _gain(rj) / top
                    a = tl.where(idcg > 0.0, -gn / (disc * disc * (1.0 + ra) * LN2 * idcg), 0.0)
                    b = tl.zeros((BLOCK_P,), ACC)
                else:
                    rp = tl.load(row + plane + offs_p, mask=in_p, other=0.0) + SELF * rj
                    inv = 1.0 / ra
                    inv_total = 1.0 / total
                    a = -rp * inv * inv * inv_total
                    b = inv * inv_total
                a = tl.where(in_p, a, 0.0)
                b = tl.where(in_p, b, 0.0)
                own = a * s1
                if (STEP == 0) or HRANK:
                    s2 = tl.load(row + 3 * plane + offs_p, mask=in_p, other=0.0)
                    own += b * s2
                tl.store(row + offs_p, a, mask=in_p)
                tl.store(row + plane + offs_p, b, mask=in_p)
                tl.store(grad_ptr + i * N + j.to(tl.int64), -own, mask=in_p)


@triton.jit
def _grad_kernel(
    scores_ptr, rel_ptr, key_ptr, ign_idx_ptr, ign_mask_ptr, cols_ptr, meta_ptr, params_ptr, work_ptr, grad_ptr,
    Q, N,
    stride_sq, stride_sn, stride_rq, stride_rn, stride_kq, stride_kn, stride_iq, stride_mq, stride_mn,
    STEP: tl.constexpr, IGNORE: tl.constexpr, FAST: tl.constexpr, HAS_KEY: tl.constexpr, HRANK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Kernel 4, grid (Q, cdiv(N, BLOCK_K)): grad[i, k] for a block of columns (module docstring);
    key and H-rank parameters as in `_sums_kernel`."""
    i = tl.program_id(0).to(tl.int64)
    ACC = params_ptr.dtype.element_ty
    count = tl.load(meta_ptr + i * 2)
    flags = tl.load(meta_ptr + i * 2 + 1)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = offs_k < N
    out_ptr = grad_ptr + i * N + offs_k
    ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
    valid = valid_cols(offs_k, N, ign, mask_row, stride_mn, IGNORE)
    if (flags & 2) != 0:
        tl.store(out_ptr, tl.full((BLOCK_K,), float("nan"), ACC), mask=in_k)
    elif flags != 0:
        tl.store(out_ptr, tl.where(valid & (count > 0), float("nan"), 0.0).to(ACC), mask=in_k)
    elif count == 0:
        tl.store(out_ptr, tl.zeros((BLOCK_K,), ACC), mask=in_k)
    else:
        inv_tau, rho, delta, _s, _o = load_step_params(params_ptr)
        if HRANK:
            beta, gamma, leak = load_hrank_params(params_ptr + 8)
        s_row = scores_ptr + i * stride_sq
        rel_row = rel_ptr + i * stride_rq
        key_row = key_ptr + i * stride_kq
        offs64 = offs_k.to(tl.int64)
        sk = tl.load(s_row + offs64 * stride_sn, mask=valid, other=0.0).to(ACC)
        rk = tl.load(rel_row + offs64 * stride_rn, mask=valid, other=0.0)
        if HAS_KEY:
            yk = tl.load(key_row + offs64 * stride_kn, mask=valid, other=0.0)
        else:
            yk = rk
        plane = Q * N
        row = work_ptr + i * N
        acc = tl.zeros((BLOCK_P, BLOCK_K), ACC)
        for t in range(0, (count + BLOCK_P - 1) // BLOCK_P):
            offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
            in_p = offs_p < count
            j = tl.load(cols_ptr + i * N + offs_p, mask=in_p, other=0)
            sj = tl.load(s_row + j.to(tl.int64) * stride_sn, mask=in_p, other=0.0).to(ACC)
            rj = tl.load(rel_row + j.to(tl.int64) * stride_rn, mask=in_p, other=0.0)
            a = tl.load(row + offs_p, mask=in_p, other=0.0)
            d = sk[None, :] - sj[:, None]
            gd = step_neg_grad(d, inv_tau, rho, delta, STEP, FAST)
            if STEP == 0:
                b = tl.load(row + plane + offs_p, mask=in_p, other=0.0)
                coef = a[:, None] + b[:, None] * tl.minimum(rj[:, None], rk[None, :])
            else:
                if HAS_KEY:
                    yj = tl.load(key_row + j.to(tl.int64) * stride_kn, mask=in_p, other=0.0)
                else:
                    yj = rj
                coef = tl.where(yk[None, :] < yj[:, None], a[:, None], 0.0)
            # lanes past the count have a = b = 0 and g', h+' are always finite: exact zeros
            acc += coef * gd
            if HRANK:
                b = tl.load(row + plane + offs_p, mask=in_p, other=0.0)
                up = tl.where(yk[None, :] > yj[:, None], b[:, None] * tl.minimum(rj[:, None], rk[None, :]), 0.0)
                acc += up * hrank_plus_grad(d, beta, gamma, leak)
        g = tl.sum(acc, axis=0)
        own = tl.load(out_ptr, mask=valid & (rk > 0.0), other=0.0)
        tl.store(out_ptr, tl.where(valid, g + own, 0.0), mask=in_k)


# --------------------------------------------------------------------------- host side


def _relevance_limit(kind: int, acc: torch.dtype) -> float:
    """NDCG: the gain 2^r - 1 finite in the dtype (r < log2(max)); H-AP: no limit."""
    return math.log2(torch.finfo(acc).max) if kind == KIND_NDCG else math.inf


def _key_operand(fn: str, key: Optional[Tensor], scores: Tensor, acc: torch.dtype) -> Optional[Tensor]:
    """The ordering key (Q, N) in the accumulation dtype, or None; its values are the kernels' to check."""
    if key is None:
        return None
    check_tensor(fn, "key", key, 2)
    if key.dtype.is_complex:
        raise TypeError(f"{fn}: `key` must be bool, integer or floating, got {key.dtype}")
    check_operand(fn, "key", key, 2, None if key.is_floating_point() else (key.dtype,), "bool, integer or floating",
                  scores.shape, f"the shape of `scores` {tuple(scores.shape)}", scores.device)
    return key if key.dtype == acc else key.to(acc)


def graded_loss_rows(
    scores: Tensor,
    relevance: Tensor,
    key: Optional[Tensor],
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: StepParams,
    *,
    kind: str = "h_ap",
    with_grad: bool = True,
    fast: Optional[bool] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(score (Q,), n_pos (Q,) int64, gradient rows (Q, N) or (0, N)) of the fused H-AP
    (kind="h_ap") or NDCG (kind="ndcg") loss; score and rows in the accumulation dtype (float32;
    float64 for float64 scores).

    Args:
        scores: (Q, N) float16/bfloat16/float32/float64, any strides.
        relevance: (Q, N) bool/integer/floating graded relevance >= 0 (> 0 = ranked), taken in the
            accumulation dtype; a value that is not finite, negative, a positive subnormal or (NDCG)
            >= log2 of the dtype's largest value makes the query NaN.
        key: (Q, N) bool/integer/floating ordering key of the suprank step (None: the relevance),
            taken in the accumulation dtype (exact there: not checked here); a value that is not
            finite, anywhere in the row, makes the query NaN.
        ignore_idx: (Q,) int64 column to leave out per query (-1 = none; another value outside
            [-1, N) makes the query NaN), or None.
        ignore_mask: (Q, N) bool, True = left out, or None.
        params: the step (fastrank.core.params.StepParams; GradedParams with `hrank` for HAPPIER's
            smoothed H-rank, suprank H-AP only: NDCG reads no rank_pos).
        kind: "h_ap" or "ndcg".
        with_grad: also the gradient rows d score_i / d scores[i, :].
        fast: sigma through tanh.approx.f32 (GPU, float32 only); None reads FASTRANK_TRITON_FAST.

    Three kernel launches, four with the gradient, on the current stream; no host sync.
    """
    fn = "fastrank.triton_kernels.graded_loss.graded_loss_rows"
    _loss._check(fn, scores, None, None, relevance, ignore_idx, ignore_mask, params)
    if kind not in KINDS:
        raise ValueError(f"{fn}: `kind` must be 'h_ap' or 'ndcg', got {kind!r}")
    code = KINDS[kind]
    q, n = scores.shape
    dev = scores.device
    acc = acc_dtype(scores.dtype)
    score = torch.empty((q,), dtype=acc, device=dev)
    n_pos = torch.empty((q,), dtype=torch.int64, device=dev)
    grad = torch.empty((q if with_grad else 0, n), dtype=acc, device=dev)
    if q == 0 or n == 0:
        return score.zero_(), n_pos.zero_(), grad.zero_()
    # the accumulation dtype: exact for bool, integers up to 2^24 and half floats (float64 input
    # with float32 scores is cast, as fastrank.core.validate.check_relevance does)
    rel = relevance if relevance.dtype == acc else relevance.to(acc)
    key = _key_operand(fn, key, scores, acc)
    ign_idx, ign_mask, ign_strides, mode = ignore_args(scores, ignore_idx, ignore_mask)
    # without a key the relevance stands behind key_ptr, never read
    key_t = rel if key is None else key
    ptrs = (scores, rel, key_t, ign_idx, ign_mask)
    strides = (*scores.stride(), *rel.stride(), *key_t.stride(), *ign_strides)

    bp, bk, bk_compact = _loss._blocks(n)
    c = _loss.splits(q, n, bk)
    ch = triton.cdiv(triton.cdiv(n, c), bk) * bk
    step = params.step
    ndcg = code == KIND_NDCG
    # the key and the H-rank change the suprank step only, the H-rank only rank_pos (H-AP's)
    has_key = key is not None and step == SUPRANK
    hrank = bool(getattr(params, "hrank", False)) and step == SUPRANK and not ndcg
    nb = 2 + ((2 if step == SIGMOID or hrank else 1) if with_grad else 0) + (1 if ndcg else 0)
    cols = torch.empty((q, n), dtype=torch.int32, device=dev)
    meta = torch.empty((q, 2), dtype=torch.int32, device=dev)
    work = torch.empty((nb, q, n), dtype=acc, device=dev)
    part = torch.empty((q, c, nb, c * bp) if c > 1 else (1,), dtype=acc, device=dev)
    info = torch.finfo(acc)
    # [0:5] the step (load_step_params), [5:8] the dtype's limits (_compact_kernel), [8:11] the
    # H-rank's (beta, gamma, leak) (load_hrank_params; zeros without it, never read then)
    hrank_vals = tuple(float(getattr(params, name, 0.0)) for name in ("beta", "gamma", "leak"))
    prm = device_constants(
        (1.0 / params.tau, params.rho, params.delta, params.start, params.resolved_offset,
         info.max, info.tiny, _relevance_limit(code, acc)) + hrank_vals, acc, dev,
    )
    fast_flag = use_fast(fast, acc)

    _compact_kernel[(q,)](
        *ptrs, prm, cols, meta, n, *strides, IGNORE=mode, HAS_KEY=key is not None, BLOCK_K=bk_compact,
    )
    _sums_kernel[(q, c)](
        *ptrs, cols, meta, prm, work, part, q, n, c, ch, *strides,
        STEP=step, IGNORE=mode, GRAD=with_grad, NDCG=ndcg, FAST=fast_flag, HAS_KEY=has_key, HRANK=hrank,
        NB=nb, BLOCK_P=bp, BLOCK_K=bk,
    )
    _epilogue_kernel[(q,)](
        rel, cols, meta, prm, work, part, score, n_pos, grad if with_grad else score, q, n, c, *rel.stride(),
        STEP=step, NDCG=ndcg, GRAD=with_grad, HRANK=hrank, NB=nb, BLOCK_P=bp,
    )
    if with_grad:
        _grad_kernel[(q, triton.cdiv(n, bk))](
            *ptrs, cols, meta, prm, work, grad, q, n, *strides,
            STEP=step, IGNORE=mode, FAST=fast_flag, HAS_KEY=has_key, HRANK=hrank, BLOCK_P=bp, BLOCK_K=bk,
        )
    return score, n_pos, grad


def _rows(scores, _qlab, _glab, rel, ign_idx, ign_mask, params, *, kind, key, with_grad):
    """graded_loss_rows in the argument order of loss._FusedLoss (which has no key slot: the key
    rides in its options, a constant of the loss)."""
    return graded_loss_rows(scores, rel, key, ign_idx, ign_mask, params, kind=kind, with_grad=with_grad)


def run_loss(name: str, scores: Tensor, *tensors: Optional[Tensor], params: StepParams,
             options: Tuple = ()) -> Tuple[Tensor, Tensor]:
    """(score (Q,), n_pos (Q,)) of the fused graded_loss op (the arguments of
    torch.ops.fastrank.graded_loss after scores: relevance, key, ignore_idx, ignore_mask; options
    (kind,), 0 = H-AP, 1 = NDCG), differentiable w.r.t. scores; fastrank.core.registry.run_loss
    calls it for backend="triton"."""
    if name != "graded_loss":
        raise ValueError(f"fastrank.triton_kernels.graded_loss.run_loss: no Triton kernels for {name!r}")
    rel, key, ign_idx, ign_mask = tensors
    (code,) = options
    kind = {v: k for k, v in KINDS.items()}[int(code)]
    return _loss._FusedLoss.apply(scores, None, None, rel, ign_idx, ign_mask, params,
                                  dict(kind=kind, key=key, rows=_rows))
