"""Fused binary loss kernels (docs/design.md §2.4): AP (Smooth-AP, SupAP) and Recall@k (SupRank;
Patel et al. with clamp_hits) from the target as given, in a fixed number of launches and
without any host synchronisation. The Triton twin of the C++ `ap_loss` / `recall_loss` ops.

Per call, whatever the data (three launches without the gradient, four with it):

1. `_compact_kernel`, grid (Q,): each row walks its columns in tiles, decides which take part
   (ignore index / mask) and which are positives (labels equal, or relevance > 0), and writes the
   positives' columns in column order into `cols` (Q, N) int32 (a `tl.cumsum` per tile, the
   running count carried by the loop), then its positive count and a flag word into `meta` (Q, 2)
   int32. The data checks are done here, as flags, instead of on the host: bit 1 = a NaN among
   the row's valid scores, bit 2 = invalid input (an ignore index outside [-1, N), a NaN in the
   row's float relevance).
2. `_sums_kernel`, grid (Q, C): the rank sums of §1.1 and, with the gradient, the sums of their
   step derivatives, per positive j (d = s_k - s_j, one sweep over every valid k, j included):
       rank_all_j = sum_k [k neg] g(d) + [k pos] h(d),   rank_pos_j = sum_k [k pos] h(d)
       S1_j = sum_k [k valid] g'(d) (suprank: [k neg] H^-'(d)),   S2_j = sum_k [k pos] sigma'(d)
   with g = h = sigma_tau (sigmoid, then + 1/2 for the self term sigma(0)) or g = H^-, h = H
   (suprank: the self term H(0) = 1 is the leading constant). The loops read the positive
   count from `meta` (a dynamic trip count, no sync). C (host-side, from Q and N only) splits a
   row across programs when Q is small: a row with at least C tiles of BLOCK_P positives deals
   its tiles round-robin to the C programs, each against all N columns, and writes final sums
   and finishes them (Memory, below); a row with fewer tiles has each program sweep one chunk of
   the columns for all of its positives and write partial sums into `part` (Q, C, NB, C * BLOCK_P),
   which kernel 3 adds in the fixed order c = 0..C-1. No float atomics: every value has one writer and a fixed
   summation order, so the results are bitwise reproducible.
3. `_epilogue_kernel`, grid (Q,): the reduction of the partials, the epilogue (ApEpilogue /
   RecallEpilogue of csrc/epilogue.h transcribed: same formulas, same derivatives), the score and
   n_pos; with the gradient, the coefficients a_j = d score / d rank_all_j, b_j = d score /
   d rank_pos_j and each positive's own share own_j = a_j S1_j + b_j S2_j (suprank: a_j S1_j),
   stored as -own_j at its column of the gradient rows (for AP rows that kernel 2 finished,
   only the score: the sum of their (Q, C) tile sums in the order c = 0..C-1).
4. `_grad_kernel`, grid (Q, cdiv(N, BLOCK_K)): the gradient row, per column k,
       sigmoid: sum_j (a_j + b_j [k pos]) sigma'(s_k - s_j),   suprank: [k neg] sum_j a_j H^-'(s_k - s_j)
   plus the -own_k kernel 3 left at a positive column; 0 at ignored columns. The self pair of
   the sigmoid adds c_jj at column j and own_j takes it back (net zero, to rounding).

Outputs: the score (Q,) in the accumulation dtype (float32, float64 for float64 scores), n_pos
(Q,) int64 and the gradient rows d score_i / d scores[i, :] (Q, N) in the accumulation dtype.

Rows: a query without positives scores 0 with a zero gradient row. A row flagged NaN (bit 1)
scores NaN, and its gradient row is NaN at the valid columns when it has positives (0 without,
as the C++ op). A row flagged invalid (bit 2) scores NaN with a NaN gradient row: on this path
an out-of-range ignore index or a NaN relevance is not an error (that would need a host sync)
but makes its own query NaN, so `mean` and `sum` are NaN too.

Memory beyond the scores and the gradient rows, per (row, column) entry, since a row's positive
count is known only on the device: the int32 columns, and the per-positive values the later
kernels need, in (Q, N) planes of the accumulation dtype (`work_planes`). A row whose tiles are
complete in one program of kernel 2 is finished there: AP's coefficients a_j (and b_j for the
sigmoid) go to the planes, -own_j to the gradient row at j's column and the tile's sum of
rank_pos / rank_all to a (Q, C) buffer, so rank_pos, S1 and S2 are never stored. A row split
across chunk programs is finished the same way by kernel 3, from the partial sums. Recall@k
keeps rank_all (overwritten by a_j in kernel 3, which needs the row's hits first) and S1 at the
positive's column of the gradient row. Float32 with the gradient: SupAP and Recall@k 8 bytes
(2x float32 scores), Smooth-AP 12 (3x); without it AP 4 bytes, Recall@k 8. The split scratch is
Q * C^2 * NB * BLOCK_P values.

Launch: fixed block sizes (no autotuning, so no benchmarking launch at a new shape, and CUDA
graph capture sees the same kernels as eager); every launch goes to the current stream
(Triton's launcher takes torch's current stream). Under TRITON_INTERPRET=1 the module-level
block caps and `SPLIT` can be lowered by tests to drive the multi-tile loops and both split modes.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from fastrank.core.params import SIGMOID, SUPRANK, StepParams
from fastrank.core.registry import _fused_gradient
from fastrank.core.validate import WIDE_UNSIGNED

from ._common import (
    INTERPRETED, IGNORE_INDEX, IGNORE_MASK, IGNORE_NONE, acc_dtype, capped_pow2, check_operand, check_tensor,
    device_constants, next_pow2, row_ignore, use_fast, valid_cols,
)
from ._step import heaviside, load_step_params, step_neg, step_neg_grad

Tensor = torch.Tensor

# EPI constexpr: which epilogue of csrc/epilogue.h
EPI_AP = 0
EPI_RECALL = 1
# TARGET constexpr
TARGET_LABELS = 0
TARGET_DENSE = 1
# bits of meta[i, 1]
FLAG_NAN = 1
FLAG_INVALID = 2

#: block sizes. GPU: BLOCK_P x BLOCK_K tiles with up to 4 live accumulators in the sums kernel;
#: interpreter: large blocks (numpy is cheap per element, launches and loop trips are not).
#: Tests lower the INTERPRETER_* caps to drive the multi-tile loops with small shapes.
GPU_BLOCK_P = 16
GPU_BLOCK_K = 64
GPU_BLOCK_K_COMPACT = 1024
INTERPRETER_MAX_BLOCK_P = 64
INTERPRETER_MAX_BLOCK_K = 512
#: programs per row of the sums kernel: None = from the shape (`splits`); tests set it
SPLIT: Optional[int] = None
#: the split aims at this many programs in all, with chunks of at least MIN_CHUNK columns
TARGET_PROGRAMS = 2048
MIN_CHUNK = 2048


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _target_row(qlab_ptr, rel_ptr, i, stride_q, stride_rq, TARGET: tl.constexpr):
    """(query label, relevance row pointer) of query i; the unused one is a dummy."""
    ql = 0
    if TARGET == 0:
        ql = tl.load(qlab_ptr + i * stride_q).to(tl.int64)
    return ql, rel_ptr + i * stride_rq


@triton.jit
def _column_state(
    offs_k, K_END, ign, mask_row, stride_mn, ql, glab_ptr, stride_g, rel_row, stride_rn,
    IGNORE: tl.constexpr, TARGET: tl.constexpr, REL_FLOAT: tl.constexpr,
):
    """(valid, pos, rel_nan) of columns offs_k (< K_END <= N): taking part, positive (valid and
    same label / relevance > 0), NaN relevance (float relevance only, in-bounds columns)."""
    valid = valid_cols(offs_k, K_END, ign, mask_row, stride_mn, IGNORE)
    inb = offs_k < K_END
    offs64 = offs_k.to(tl.int64)
    if TARGET == 0:
        gl = tl.load(glab_ptr + offs64 * stride_g, mask=inb, other=0).to(tl.int64)
        pos = valid & (gl == ql)
        rel_nan = offs_k < 0
    else:
        r = tl.load(rel_row + offs64 * stride_rn, mask=inb, other=0)
        pos = valid & (r > 0)
        if REL_FLOAT:
            rel_nan = inb & (r != r)
        else:
            rel_nan = offs_k < 0
    return valid, pos, rel_nan


@triton.jit
def _sweep_sums(
    sj, s_row, k_lo, k_hi, ign, mask_row, stride_sn, stride_mn, ql, glab_ptr, stride_g, rel_row, stride_rn,
    inv_tau, rho, delta, start, offset,
    STEP: tl.constexpr, TARGET: tl.constexpr, IGNORE: tl.constexpr, GRAD: tl.constexpr, FAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """(rank_all, rank_pos, S1, S2) partial sums (BLOCK_P,) of the positives sj over the columns
    [k_lo, k_hi) (module docstring, kernel 2); S1, S2 are zeros unless GRAD (S2: sigmoid only).
    The loop is inside: a device-function call costs the interpreter about a millisecond."""
    ra = tl.zeros((BLOCK_P, BLOCK_K), ACC)
    rp = tl.zeros((BLOCK_P, BLOCK_K), ACC)
    s1 = tl.zeros((BLOCK_P, BLOCK_K), ACC)
    s2 = tl.zeros((BLOCK_P, BLOCK_K), ACC)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid, pos, _rn = _column_state(
            offs_k, k_hi, ign, mask_row, stride_mn, ql, glab_ptr, stride_g, rel_row, stride_rn, IGNORE, TARGET, False
        )
        sk = tl.load(s_row + offs_k.to(tl.int64) * stride_sn, mask=valid, other=0.0).to(ACC)
        d = sk[None, :] - sj[:, None]
        v2 = valid[None, :]
        p2 = pos[None, :]
        g = step_neg(d, inv_tau, rho, delta, start, offset, STEP, FAST)
        if STEP == 0:
            ra += tl.where(v2, g, 0.0)
            rp += tl.where(p2, g, 0.0)
            if GRAD:
                gd = step_neg_grad(d, inv_tau, rho, delta, STEP, FAST)
                s1 += tl.where(v2, gd, 0.0)
                s2 += tl.where(p2, gd, 0.0)
        else:
            h = heaviside(d)
            ra += tl.where(p2, h, tl.where(v2, g, 0.0))
            rp += tl.where(p2, h, 0.0)
            if GRAD:
                s1 += tl.where(v2 & ~p2, step_neg_grad(d, inv_tau, rho, delta, STEP, FAST), 0.0)
    return tl.sum(ra, axis=1), tl.sum(rp, axis=1), tl.sum(s1, axis=1), tl.sum(s2, axis=1)


@triton.jit
def _store_sums(base_ptr, plane, offs_p, in_p, ra, rp, s1, s2, STEP: tl.constexpr, GRAD: tl.constexpr):
    """The NB planes (rank_all, rank_pos[, S1[, S2]]) at base_ptr + b * plane + offs_p."""
    tl.store(base_ptr + offs_p, ra, mask=in_p)
    tl.store(base_ptr + plane + offs_p, rp, mask=in_p)
    if GRAD:
        tl.store(base_ptr + 2 * plane + offs_p, s1, mask=in_p)
        if STEP == 0:
            tl.store(base_ptr + 3 * plane + offs_p, s2, mask=in_p)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _compact_kernel(
    scores_ptr, qlab_ptr, glab_ptr, rel_ptr, ign_idx_ptr, ign_mask_ptr, cols_ptr, meta_ptr,
    N,
    stride_sq, stride_sn, stride_q, stride_g, stride_rq, stride_rn, stride_iq, stride_mq, stride_mn,
    TARGET: tl.constexpr, IGNORE: tl.constexpr, REL_FLOAT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Kernel 1, grid (Q,): row i's positive columns, in column order, into cols[i, :count]
    ((Q, N) int32, contiguous), and meta[i] = (count, flags) ((Q, 2) int32).

    Pointers: scores (Q, N) any float dtype; qlab (Q,) / glab (N,) integer labels (TARGET 0) or
    rel (Q, N) relevance, > 0 = positive (TARGET 1; REL_FLOAT: a floating dtype, NaN checked);
    ign_idx (Q,) int64 (IGNORE & 1), ign_mask (Q, N) uint8 (IGNORE & 2); dummies are never read.
    """
    i = tl.program_id(0).to(tl.int64)
    ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
    ql, rel_row = _target_row(qlab_ptr, rel_ptr, i, stride_q, stride_rq, TARGET)
    s_row = scores_ptr + i * stride_sq
    n_nan = tl.zeros((BLOCK_K,), tl.int32)
    n_bad = tl.zeros((BLOCK_K,), tl.int32)
    count = tl.program_id(0) * 0  # an int32 scalar, carried by the loop
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid, pos, rel_nan = _column_state(
            offs_k, N, ign, mask_row, stride_mn, ql, glab_ptr, stride_g, rel_row, stride_rn, IGNORE, TARGET, REL_FLOAT
        )
        s = tl.load(s_row + offs_k.to(tl.int64) * stride_sn, mask=valid, other=0.0).to(tl.float32)
        n_nan += (valid & (s != s)).to(tl.int32)
        n_bad += rel_nan.to(tl.int32)
        pos32 = pos.to(tl.int32)
        slot = count + tl.cumsum(pos32, axis=0) - 1
        tl.store(cols_ptr + i * N + slot, offs_k, mask=pos)
        count += tl.sum(pos32, axis=0)
    bad = tl.max(n_bad, axis=0) > 0
    if IGNORE & 1:
        bad = bad | (ign < -1) | (ign >= N)
    flags = tl.where(tl.max(n_nan, axis=0) > 0, 1, 0) + tl.where(bad, 2, 0)
    tl.store(meta_ptr + i * 2, count)
    tl.store(meta_ptr + i * 2 + 1, flags)


@triton.jit
def _ap_terms(ra, rp, s1, s2, in_p, npf, STEP: tl.constexpr):
    """AP's per-positive terms (ApEpilogue of csrc/epilogue.h) from the raw sweep sums:
    (rank_pos / rank_all masked to the lanes in_p, a = d AP / d rank_all, b = d AP / d rank_pos,
    own = a S1 + b S2), npf = |P_i|. The sigmoid's sweep counted sigma(0) = 1/2 for j itself,
    where the rank has 1."""
    SELF: tl.constexpr = 0.5 if STEP == 0 else 0.0
    ra = tl.where(in_p, ra + SELF, 1.0)
    rp = tl.where(in_p, rp + SELF, 0.0)
    inv = 1.0 / ra
    a = -rp * inv * inv / npf
    b = inv / npf
    own = a * s1
    if STEP == 0:
        own += b * s2
    return rp * inv, a, b, own


@triton.jit
def _finish_tile(
    work_ptr, plane, grad_row, cols_row, offs_p, in_p, ra, rp, s1, s2, npf,
    STEP: tl.constexpr, EPI: tl.constexpr, GRAD: tl.constexpr,
):
    """Stores one tile of positives whose sums are complete (module docstring, Memory): AP's
    coefficients (a; b for the sigmoid) and -own at the positives' columns, returning the tile's
    sum of rank_pos / rank_all; Recall@k's rank_all and S1 at the positives' columns (its
    coefficients need the whole row's hits first), returning 0."""
    if EPI == 0:
        r, a, b, own = _ap_terms(ra, rp, s1, s2, in_p, npf, STEP)
        if GRAD:
            tl.store(work_ptr + offs_p, a, mask=in_p)
            if STEP == 0:
                tl.store(work_ptr + plane + offs_p, b, mask=in_p)
            j = tl.load(cols_row + offs_p, mask=in_p, other=0)
            tl.store(grad_row + j.to(tl.int64), -own, mask=in_p)
        return tl.sum(tl.where(in_p, r, 0.0), axis=0)
    else:
        tl.store(work_ptr + offs_p, ra, mask=in_p)
        if GRAD:
            j = tl.load(cols_row + offs_p, mask=in_p, other=0)
            tl.store(grad_row + j.to(tl.int64), s1, mask=in_p)
        return tl.sum(tl.zeros_like(ra), axis=0)


@triton.jit
def _sums_kernel(
    scores_ptr, qlab_ptr, glab_ptr, rel_ptr, ign_idx_ptr, ign_mask_ptr, cols_ptr, meta_ptr, params_ptr,
    work_ptr, part_ptr, rsum_ptr, grad_ptr,
    Q, N, C, CH,
    stride_sq, stride_sn, stride_q, stride_g, stride_rq, stride_rn, stride_iq, stride_mq, stride_mn,
    STEP: tl.constexpr, TARGET: tl.constexpr, IGNORE: tl.constexpr, GRAD: tl.constexpr, FAST: tl.constexpr,
    EPI: tl.constexpr, NB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Kernel 2, grid (Q, C): the rank sums and derivative sums of row i's positives (module
    docstring). A row with at least C tiles of positives has each tile's sums complete in one
    program, which finishes it (`_finish_tile`: work planes (NW, Q, N), rsum (Q, C) its sum of
    rank_pos / rank_all, grad (Q, N) at the positives' columns); a row with fewer leaves partial
    sums in part (Q, C, NB, C * BLOCK_P) to the epilogue. All in the accumulation dtype (that of
    params_ptr); CH: the columns of one chunk (a multiple of BLOCK_K)."""
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    ACC = params_ptr.dtype.element_ty
    count = tl.load(meta_ptr + i * 2)
    flags = tl.load(meta_ptr + i * 2 + 1)
    if (count > 0) & (flags == 0):
        inv_tau, rho, delta, start, offset = load_step_params(params_ptr)
        ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
        ql, rel_row = _target_row(qlab_ptr, rel_ptr, i, stride_q, stride_rq, TARGET)
        s_row = scores_ptr + i * stride_sq
        n_tiles = (count + BLOCK_P - 1) // BLOCK_P
        npf = count.to(ACC)
        if n_tiles >= C:
            # enough positives: tiles dealt round-robin, each against the whole row, finished here
            rsum = tl.sum(tl.zeros((BLOCK_P,), ACC), axis=0)
            for t in range(c, n_tiles, C):
                offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
                in_p = offs_p < count
                j = tl.load(cols_ptr + i * N + offs_p, mask=in_p, other=0)
                sj = tl.load(s_row + j.to(tl.int64) * stride_sn, mask=in_p, other=0.0).to(ACC)
                ra, rp, s1, s2 = _sweep_sums(
                    sj, s_row, 0, N, ign, mask_row, stride_sn, stride_mn, ql, glab_ptr, stride_g, rel_row, stride_rn,
                    inv_tau, rho, delta, start, offset, STEP, TARGET, IGNORE, GRAD, FAST, BLOCK_P, BLOCK_K, ACC,
                )
                rsum += _finish_tile(work_ptr + i * N, Q * N, grad_ptr + i * N, cols_ptr + i * N, offs_p, in_p,
                                     ra, rp, s1, s2, npf, STEP, EPI, GRAD)
            tl.store(rsum_ptr + i * C + c, rsum)
        else:
            # few positives: this program's chunk of columns for all of them, partial sums
            k_lo = c * CH
            k_hi = tl.minimum(k_lo + CH, N)
            pw = C * BLOCK_P
            for t in range(0, n_tiles):
                offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
                in_p = offs_p < count
                j = tl.load(cols_ptr + i * N + offs_p, mask=in_p, other=0)
                sj = tl.load(s_row + j.to(tl.int64) * stride_sn, mask=in_p, other=0.0).to(ACC)
                ra, rp, s1, s2 = _sweep_sums(
                    sj, s_row, k_lo, k_hi, ign, mask_row, stride_sn, stride_mn, ql, glab_ptr, stride_g, rel_row,
                    stride_rn, inv_tau, rho, delta, start, offset, STEP, TARGET, IGNORE, GRAD, FAST, BLOCK_P, BLOCK_K,
                    ACC,
                )
                _store_sums(part_ptr + (i * C + c) * NB * pw, pw, offs_p, in_p, ra, rp, s1, s2, STEP, GRAD)


@triton.jit
def _epilogue_kernel(
    cols_ptr, meta_ptr, params_ptr, ks_ptr, work_ptr, part_ptr, rsum_ptr, score_ptr, npos_ptr, grad_ptr,
    Q, N, C, NK,
    STEP: tl.constexpr, EPI: tl.constexpr, CLAMP_HITS: tl.constexpr, GRAD: tl.constexpr, NB: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_NK: tl.constexpr,
):
    """Kernel 3, grid (Q,): score[i], npos[i] and, if GRAD, the rows' coefficients in work and
    -own_j at grad[i, col_j] ((Q, N) contiguous) where kernel 2 left them to it: a row split
    across chunk programs (its partial sums in part, added in the fixed order c = 0..C-1), and
    Recall@k's coefficients, which need the row's hits. params_ptr holds (1/tau, rho, delta,
    start, offset, 1/temp); ks_ptr the NK values of k (Recall@k)."""
    i = tl.program_id(0).to(tl.int64)
    ACC = params_ptr.dtype.element_ty
    count = tl.load(meta_ptr + i * 2)
    flags = tl.load(meta_ptr + i * 2 + 1)
    tl.store(npos_ptr + i, count.to(tl.int64))
    plane = Q * N
    row = work_ptr + i * N
    grad_row = grad_ptr + i * N
    cols_row = cols_ptr + i * N
    if flags != 0:
        tl.store(score_ptr + i, float("nan"))
    elif count == 0:
        tl.store(score_ptr + i, 0.0)
    else:
        n_tiles = (count + BLOCK_P - 1) // BLOCK_P
        npf = count.to(ACC)
        rsum = tl.sum(tl.zeros((BLOCK_P,), ACC), axis=0)
        if n_tiles < C:
            # the partial sums of the C chunk programs, added in the fixed order c = 0..C-1
            pw = C * BLOCK_P
            for t in range(0, n_tiles):
                offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
                in_p = offs_p < count
                base = part_ptr + i * C * NB * pw + offs_p
                ra = tl.zeros((BLOCK_P,), ACC)
                rp = tl.zeros((BLOCK_P,), ACC)
                s1 = tl.zeros((BLOCK_P,), ACC)
                s2 = tl.zeros((BLOCK_P,), ACC)
                for c in range(0, C):
                    at = base + c * NB * pw
                    ra += tl.load(at, mask=in_p, other=0.0)
                    rp += tl.load(at + pw, mask=in_p, other=0.0)
                    if GRAD:
                        s1 += tl.load(at + 2 * pw, mask=in_p, other=0.0)
                        if STEP == 0:
                            s2 += tl.load(at + 3 * pw, mask=in_p, other=0.0)
                rsum += _finish_tile(row, plane, grad_row, cols_row, offs_p, in_p, ra, rp, s1, s2, npf,
                                     STEP, EPI, GRAD)
        elif EPI == 0:
            for c in range(0, C):
                rsum += tl.load(rsum_ptr + i * C + c)
        if EPI == 0:
            tl.store(score_ptr + i, rsum / npf)
        else:
            tl.debug_barrier()
            inv_temp = tl.load(params_ptr + 5)
            SELF: tl.constexpr = 0.5 if STEP == 0 else 0.0
            k_in = tl.arange(0, BLOCK_NK) < NK
            kv = tl.load(ks_ptr + tl.arange(0, BLOCK_NK), mask=k_in, other=1.0)
            den = tl.minimum(npf, kv)
            hits = tl.zeros((BLOCK_NK,), ACC)
            for t in range(0, n_tiles):
                offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
                in_p = offs_p < count
                ra = tl.load(row + offs_p, mask=in_p, other=1.0) + SELF
                y = 1.0 / (1.0 + tl.exp(-((kv[None, :] - ra[:, None]) * inv_temp)))
                hits += tl.sum(tl.where(in_p[:, None], y, 0.0), axis=0)
            h = hits
            if CLAMP_HITS:
                h = tl.minimum(hits, kv)
            tl.store(score_ptr + i, tl.sum(tl.where(k_in, h / den, 0.0), axis=0) / NK)
            if GRAD:
                tl.debug_barrier()
                # torch.clamp(max=k) passes no gradient where hits > k
                keep = k_in
                if CLAMP_HITS:
                    keep = keep & ~(hits > kv)
                w = tl.where(keep, -inv_temp / (den * NK), 0.0)
                for t in range(0, n_tiles):
                    offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
                    in_p = offs_p < count
                    ra = tl.load(row + offs_p, mask=in_p, other=1.0) + SELF
                    j = tl.load(cols_row + offs_p, mask=in_p, other=0).to(tl.int64)
                    # S1 sits at the positive's column (kernel 2 or the split reduction above)
                    s1 = tl.load(grad_row + j, mask=in_p, other=0.0)
                    y = 1.0 / (1.0 + tl.exp(-((kv[None, :] - ra[:, None]) * inv_temp)))
                    a = tl.sum(w[None, :] * y * (1.0 - y), axis=1)
                    tl.store(row + offs_p, a, mask=in_p)
                    tl.store(grad_row + j, -(a * s1), mask=in_p)


@triton.jit
def _grad_kernel(
    scores_ptr, qlab_ptr, glab_ptr, rel_ptr, ign_idx_ptr, ign_mask_ptr, cols_ptr, meta_ptr, params_ptr,
    work_ptr, grad_ptr,
    Q, N,
    stride_sq, stride_sn, stride_q, stride_g, stride_rq, stride_rn, stride_iq, stride_mq, stride_mn,
    STEP: tl.constexpr, TARGET: tl.constexpr, IGNORE: tl.constexpr, FAST: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Kernel 4, grid (Q, cdiv(N, BLOCK_K)): grad[i, k] for a block of columns (module docstring);
    work holds a_j (plane 0) and, HAS_B (the sigmoid AP), b_j (plane 1); Recall@k has b = 0."""
    i = tl.program_id(0).to(tl.int64)
    ACC = params_ptr.dtype.element_ty
    count = tl.load(meta_ptr + i * 2)
    flags = tl.load(meta_ptr + i * 2 + 1)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = offs_k < N
    out_ptr = grad_ptr + i * N + offs_k
    ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
    ql, rel_row = _target_row(qlab_ptr, rel_ptr, i, stride_q, stride_rq, TARGET)
    valid, pos, _rn = _column_state(
        offs_k, N, ign, mask_row, stride_mn, ql, glab_ptr, stride_g, rel_row, stride_rn, IGNORE, TARGET, False
    )
    if (flags & 2) != 0:
        tl.store(out_ptr, tl.full((BLOCK_K,), float("nan"), ACC), mask=in_k)
    elif flags != 0:
        tl.store(out_ptr, tl.where(valid & (count > 0), float("nan"), 0.0).to(ACC), mask=in_k)
    elif count == 0:
        tl.store(out_ptr, tl.zeros((BLOCK_K,), ACC), mask=in_k)
    else:
        inv_tau, rho, delta, _s, _o = load_step_params(params_ptr)
        s_row = scores_ptr + i * stride_sq
        sk = tl.load(s_row + offs_k.to(tl.int64) * stride_sn, mask=valid, other=0.0).to(ACC)
        plane = Q * N
        row = work_ptr + i * N
        acc = tl.zeros((BLOCK_P, BLOCK_K), ACC)
        for t in range(0, (count + BLOCK_P - 1) // BLOCK_P):
            offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
            in_p = offs_p < count
            j = tl.load(cols_ptr + i * N + offs_p, mask=in_p, other=0)
            sj = tl.load(s_row + j.to(tl.int64) * stride_sn, mask=in_p, other=0.0).to(ACC)
            a = tl.load(row + offs_p, mask=in_p, other=0.0)
            d = sk[None, :] - sj[:, None]
            gd = step_neg_grad(d, inv_tau, rho, delta, STEP, FAST)
            if STEP == 0:
                if HAS_B:
                    b = tl.load(row + plane + offs_p, mask=in_p, other=0.0)
                    coef = a[:, None] + tl.where(pos[None, :], b[:, None], 0.0)
                else:
                    coef = a[:, None] + tl.zeros((1, BLOCK_K), ACC)
            else:
                coef = tl.where(pos[None, :], 0.0, a[:, None])
            # lanes past the count have a = b = 0 and g' is always finite: exact zeros
            acc += coef * gd
        g = tl.sum(acc, axis=0)
        own = tl.load(out_ptr, mask=pos, other=0.0)
        tl.store(out_ptr, tl.where(valid, g + own, 0.0), mask=in_k)


# --------------------------------------------------------------------------- host side


def splits(q: int, n: int, block_k: int) -> int:
    """Programs per row of the sums kernel (from the shape only): enough for about
    TARGET_PROGRAMS programs in all, each chunk at least MIN_CHUNK columns (and one BLOCK_K)."""
    if SPLIT is not None:
        return max(1, int(SPLIT))
    per_row = triton.cdiv(TARGET_PROGRAMS, max(q, 1))
    return max(1, min(per_row, n // max(MIN_CHUNK, block_k)))


def work_planes(step: int, epi: int, with_grad: bool) -> int:
    """(Q, N) planes of per-positive values the kernels keep (module docstring, Memory): the AP
    coefficients a (and b for the sigmoid) with the gradient, none without; Recall@k's rank_all,
    overwritten by a."""
    if epi == EPI_AP:
        return (2 if step == SIGMOID else 1) if with_grad else 0
    return 1


def _blocks(n: int) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_K of the sweeps, BLOCK_K of the compaction)."""
    if INTERPRETED:
        bk = capped_pow2(n, INTERPRETER_MAX_BLOCK_K)
        return max(2, INTERPRETER_MAX_BLOCK_P), bk, bk
    return GPU_BLOCK_P, GPU_BLOCK_K, GPU_BLOCK_K_COMPACT


def _check(fn: str, scores, qlab, glab, relevance, ignore_idx, ignore_mask, params) -> None:
    _check_operands(fn, scores, qlab, glab, relevance, ignore_idx, ignore_mask)
    if not isinstance(params, StepParams):
        raise TypeError(f"{fn}: `params` must be a fastrank.core.params.StepParams, got {type(params).__name__}")
    if params.step not in (SIGMOID, SUPRANK):
        raise ValueError(f"{fn}: `params.step` must be {SIGMOID} (sigmoid) or {SUPRANK} (suprank), got {params.step}")
    params.check_dtype(scores.dtype)


def _check_operands(fn: str, scores, qlab, glab, relevance, ignore_idx, ignore_mask) -> None:
    """Types, shapes and devices of the scores, the target (labels or relevance) and the ignore forms."""
    check_tensor(fn, "scores", scores, 2)
    if not scores.dtype.is_floating_point:
        raise TypeError(f"{fn}: `scores` must be float16, bfloat16, float32 or float64, got {scores.dtype}")
    dev = scores.device
    if INTERPRETED:
        if dev.type != "cpu":
            raise ValueError(f"{fn}: under TRITON_INTERPRET=1 `scores` must be a CPU tensor, got {dev}")
    elif dev.type != "cuda":
        raise ValueError(f"{fn}: `scores` must be a CUDA tensor (or set TRITON_INTERPRET=1 for CPU), got {dev}")
    q, n = scores.shape
    labels = qlab is not None or glab is not None
    if labels == (relevance is not None) or (qlab is None) != (glab is None):
        raise ValueError(f"{fn}: give either query_labels and gallery_labels, or relevance")
    ints = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8) + WIDE_UNSIGNED
    if labels:
        check_operand(fn, "query_labels", qlab, 1, ints, "an integer tensor", (q,), f"shape ({q},)", dev)
        check_operand(fn, "gallery_labels", glab, 1, ints, "an integer tensor", (n,), f"shape ({n},)", dev)
    else:
        check_tensor(fn, "relevance", relevance, 2)
        if relevance.dtype.is_complex or relevance.dtype in WIDE_UNSIGNED:
            raise TypeError(f"{fn}: `relevance` must be bool, integer or floating, got {relevance.dtype}")
        check_operand(fn, "relevance", relevance, 2, None if relevance.dtype.is_floating_point else
                      (relevance.dtype,), "bool, integer or floating", scores.shape,
                      f"the shape of `scores` {tuple(scores.shape)}", dev)
    if ignore_idx is not None:
        check_operand(fn, "ignore_idx", ignore_idx, 1, (torch.int64,), "int64", (q,), f"shape ({q},)", dev)
    if ignore_mask is not None:
        check_operand(fn, "ignore_mask", ignore_mask, 2, (torch.bool,), "bool", scores.shape,
                      f"the shape of `scores` {tuple(scores.shape)}", dev)


def _target_operands(scores, query_labels, gallery_labels, relevance):
    """(TARGET, qlab, glab, rel, (stride_q, stride_g), (stride_rq, stride_rn), REL_FLOAT) of the
    kernels: labels (wide unsigned ones compared as int64, as fastrank.core.problem does) or
    relevance (bool viewed as bytes, half floats as float32); the unused ones are dummies."""
    if query_labels is not None:
        qlab = query_labels.to(torch.int64) if query_labels.dtype in WIDE_UNSIGNED else query_labels
        glab = gallery_labels.to(torch.int64) if gallery_labels.dtype in WIDE_UNSIGNED else gallery_labels
        return TARGET_LABELS, qlab, glab, scores, (qlab.stride(0), glab.stride(0)), (0, 0), False
    rel = relevance
    if rel.dtype == torch.bool:
        rel = rel.view(torch.uint8)
    elif rel.dtype in (torch.float16, torch.bfloat16):
        rel = rel.float()  # exact; the interpreter holds bfloat16 as raw integers
    return TARGET_DENSE, scores, scores, rel, (0, 0), rel.stride(), rel.dtype.is_floating_point


def loss_rows(
    scores: Tensor,
    query_labels: Optional[Tensor],
    gallery_labels: Optional[Tensor],
    relevance: Optional[Tensor],
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: StepParams,
    *,
    kind: str = "ap",
    ks: Sequence[int] = (),
    inv_temp: float = 1.0,
    clamp_hits: bool = False,
    with_grad: bool = True,
    fast: Optional[bool] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(score (Q,), n_pos (Q,) int64, gradient rows (Q, N) or (0, N)) of the fused AP
    (kind="ap") or Recall@k (kind="recall": `ks`, `inv_temp` = 1/temp, `clamp_hits` for Patel
    et al.) loss; score and rows in the accumulation dtype (float32; float64 for float64 scores).

    Args:
        scores: (Q, N) float16/bfloat16/float32/float64, any strides.
        query_labels, gallery_labels: (Q,), (N,) integer labels (positive = equal), or None.
        relevance: (Q, N) bool/integer/floating, > 0 = positive (a NaN makes the query NaN), or None.
        ignore_idx: (Q,) int64 column to leave out per query (-1 = none; another value outside
            [-1, N) makes the query NaN), or None.
        ignore_mask: (Q, N) bool, True = left out, or None.
        params: the step (fastrank.core.params.StepParams).
        with_grad: also the gradient rows d score_i / d scores[i, :].
        fast: sigma through tanh.approx.f32 (GPU, float32 only); None reads FASTRANK_TRITON_FAST.

    Three kernel launches, four with the gradient, on the current stream; no host sync.
    """
    fn = "fastrank.triton_kernels.loss.loss_rows"
    _check(fn, scores, query_labels, gallery_labels, relevance, ignore_idx, ignore_mask, params)
    if kind not in ("ap", "recall"):
        raise ValueError(f"{fn}: `kind` must be 'ap' or 'recall', got {kind!r}")
    if kind == "recall" and len(ks) == 0:
        raise ValueError(f"{fn}: `ks` must be non-empty for kind='recall'")
    q, n = scores.shape
    dev = scores.device
    acc = acc_dtype(scores.dtype)
    score = torch.empty((q,), dtype=acc, device=dev)
    n_pos = torch.empty((q,), dtype=torch.int64, device=dev)
    grad = torch.empty((q if with_grad else 0, n), dtype=acc, device=dev)
    if q == 0 or n == 0:
        return score.zero_(), n_pos.zero_(), grad.zero_()

    target_mode, qlab, glab, rel, lab_strides, rel_strides, rel_float = _target_operands(
        scores, query_labels, gallery_labels, relevance)
    mode = IGNORE_NONE
    ign_idx, stride_iq = scores, 0
    ign_mask, stride_mq, stride_mn = scores, 0, 0
    if ignore_idx is not None:
        mode |= IGNORE_INDEX
        ign_idx, stride_iq = ignore_idx, ignore_idx.stride(0)
    if ignore_mask is not None:
        mode |= IGNORE_MASK
        ign_mask = ignore_mask.view(torch.uint8)
        stride_mq, stride_mn = ign_mask.stride()
    ptrs = (scores, qlab, glab, rel, ign_idx, ign_mask)
    strides = (*scores.stride(), *lab_strides, *rel_strides, stride_iq, stride_mq, stride_mn)

    bp, bk, bk_compact = _blocks(n)
    c = splits(q, n, bk)
    ch = triton.cdiv(triton.cdiv(n, c), bk) * bk
    step = params.step
    epi = EPI_AP if kind == "ap" else EPI_RECALL
    nb = 2 + ((2 if step == SIGMOID else 1) if with_grad else 0)
    nw = work_planes(step, epi, with_grad)
    cols = torch.empty((q, n), dtype=torch.int32, device=dev)
    meta = torch.empty((q, 2), dtype=torch.int32, device=dev)
    work = torch.empty((nw, q, n) if nw else (1,), dtype=acc, device=dev)
    part = torch.empty((q, c, nb, c * bp) if c > 1 else (1,), dtype=acc, device=dev)
    rsum = torch.empty((q, c), dtype=acc, device=dev)
    prm = device_constants(
        (1.0 / params.tau, params.rho, params.delta, params.start, params.resolved_offset, float(inv_temp)), acc, dev
    )
    kv = device_constants(tuple(float(k) for k in ks) or (1.0,), acc, dev)
    fast_flag = use_fast(fast, acc)

    _compact_kernel[(q,)](
        *ptrs, cols, meta, n, *strides,
        TARGET=target_mode, IGNORE=mode, REL_FLOAT=rel_float, BLOCK_K=bk_compact,
    )
    grad_arg = grad if with_grad else score  # a dummy without the gradient: never written
    _sums_kernel[(q, c)](
        *ptrs, cols, meta, prm, work, part, rsum, grad_arg, q, n, c, ch, *strides,
        STEP=step, TARGET=target_mode, IGNORE=mode, GRAD=with_grad, FAST=fast_flag, EPI=epi, NB=nb, BLOCK_P=bp,
        BLOCK_K=bk,
    )
    _epilogue_kernel[(q,)](
        cols, meta, prm, kv, work, part, rsum, score, n_pos, grad_arg, q, n, c, max(len(ks), 1),
        STEP=step, EPI=epi, CLAMP_HITS=bool(clamp_hits), GRAD=with_grad,
        NB=nb, BLOCK_P=bp, BLOCK_NK=max(2, next_pow2(len(ks))),
    )
    if with_grad:
        _grad_kernel[(q, triton.cdiv(n, bk))](
            *ptrs, cols, meta, prm, work, grad, q, n, *strides,
            STEP=step, TARGET=target_mode, IGNORE=mode, FAST=fast_flag, HAS_B=nw == 2, BLOCK_P=bp, BLOCK_K=bk,
        )
    return score, n_pos, grad


# --------------------------------------------------------------------------- autograd


class _FusedLoss(torch.autograd.Function):
    """The fused loss, differentiable w.r.t. scores: the backward multiplies the gradient rows
    by grad_output (query i's score depends on row i alone: the exact vector-Jacobian product)."""

    @staticmethod
    def forward(ctx, scores, qlab, glab, rel, ign_idx, ign_mask, params, options):
        with_grad = bool(ctx.needs_input_grad[0])
        # options["rows"]: another module's rows function with this signature (graded_loss.py, histogram_loss.py)
        options = dict(options)
        rows_fn = options.pop("rows", loss_rows)
        score, n_pos, rows = rows_fn(scores, qlab, glab, rel, ign_idx, ign_mask, params, with_grad=with_grad,
                                     **options)
        ctx.mark_non_differentiable(n_pos)
        ctx.save_for_backward(rows, scores)  # scores: what a second derivative would depend on
        ctx.scores_dtype = scores.dtype
        ctx.what = f"the triton {options.get('kind', 'ap')} loss"
        return score, n_pos

    @staticmethod
    def backward(ctx, grad_score, _grad_n_pos):
        rows, scores = ctx.saved_tensors
        grad = _fused_gradient(lambda: (rows * grad_score.to(rows.dtype).unsqueeze(1)).to(ctx.scores_dtype),
                               ctx.what, "triton", scores, grad_score)
        return (grad,) + (None,) * 7


def run_loss(name: str, scores: Tensor, *tensors: Optional[Tensor], params: StepParams,
             options: Tuple = ()) -> Tuple[Tensor, Tensor]:
    """(score (Q,), n_pos (Q,)) of the fused loss op `name` ("ap_loss" or "recall_loss", the
    arguments of torch.ops.fastrank.<name> after scores: labels, relevance, ignore; recall's
    options (ks, temp, clamp_hits)), differentiable w.r.t. scores; fastrank.core.registry.run_loss
    calls it for backend="triton"."""
    if name == "ap_loss":
        opts = dict(kind="ap")
    elif name == "recall_loss":
        ks, temp, clamp_hits = options
        # times 1/temp, capped at sqrt(max) as in fastrank/recall.py
        big = torch.finfo(acc_dtype(scores.dtype)).max
        opts = dict(kind="recall", ks=tuple(int(k) for k in ks), inv_temp=min(1.0 / float(temp), big ** 0.5),
                    clamp_hits=bool(clamp_hits))
    else:
        raise ValueError(f"fastrank.triton_kernels.loss.run_loss: no Triton kernels for {name!r}")
    qlab, glab, rel, ign_idx, ign_mask = tensors
    return _FusedLoss.apply(scores, qlab, glab, rel, ign_idx, ign_mask, params, opts)
