"""Fused histogram AP kernels (docs/design.md §2.4): FastAP and SoftBin AP from the target as given,
in a fixed number of launches and without any host synchronisation. The Triton twin of the C++
`histogram_ap_loss` op (csrc/cpu/histogram.cpp, `hist_loss_rows`).

The bin arithmetic is that of the two-pass kernels (histogram.py: `_soft_bin`, `_one_hot_bins`,
the bin blocks and the split of a row's columns); the target and ignore forms those of loss.py
(`_column_state`). Per call, whatever the data (two launches without the gradient, three with it):

1. `_hist_kernel`, grid (Q, cdiv(L, BLOCK_L), S): each program sweeps every S-th tile of its
   row's columns, decides which take part (ignore index / mask) and which are positives (labels
   equal, or relevance > 0), and adds their soft-bin weights to (BLOCK_K, BLOCK_L) register
   accumulators (one-hot compares, no atomics), reduced once into the partial histograms
   part[s, 0/1, i, :] (h_all, h_pos); the bin-block 0 program also writes its tiles' positive
   count and flags (a NaN among the valid scores, a NaN relevance) to cnt[s, i, :].
2. `_epilogue_kernel`, grid (Q,): the S partials and counts added in the fixed order s = 0..S-1,
   an ignore index outside [-1, N) flagged, n_pos, and `FastApEpilogue` / `SoftBinEpilogue` of
   csrc/epilogue.h transcribed over tiles of bins with carried prefix sums (the cumsums as
   `tl.cumsum`, the reverse sweeps of the derivatives as reverse cumsums with carried suffix
   sums), the score; with the gradient, per bin g_neg = d AP / d h_all and g_pos = g_neg +
   d AP / d h_pos into gb (Q, 2, L) (the same buffer keeps the prefix sums between the passes).
3. `_grad_kernel`, grid (Q, cdiv(N, BLOCK_K)): the gradient row, per valid column k with bins
   (lo, lo + 1) and slope, scale * (g[lo + 1] - g[lo]) where the slope is nonzero (g = g_pos at a
   positive, g_neg elsewhere), 0 at ignored columns.

Outputs: AP (Q,) in the accumulation dtype (float32, float64 for float64 scores), n_pos (Q,)
int64 (valid positives), the gradient rows (Q, N) in the accumulation dtype. A query without
positives scores 0 with a zero gradient row. A row with a NaN among its valid scores scores NaN,
its gradient row NaN at the valid columns when it has positives (0 without), as the C++ op. A
row with a NaN relevance or an out-of-range ignore index scores NaN with a NaN gradient row
(the C++ op raises; this path would need a host sync for that), so `mean` and `sum` are NaN too.
No float atomics: every value has one writer and a fixed summation order (bitwise reproducible).
Memory beyond the scores and gradient rows: 2 S Q L + 2 Q L accumulation-dtype values and 3 S Q int32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastrank.core.params import HistParams

from . import histogram as _hist
from . import loss as _loss
from ._common import INTERPRETED, acc_dtype, capped_pow2, ignore_args, row_ignore

Tensor = torch.Tensor

# KIND constexpr: which epilogue of csrc/epilogue.h (the C++ op's `kind`)
KIND_FASTAP = 0
KIND_SOFTBIN = 1
KINDS = {"fastap": KIND_FASTAP, "softbin": KIND_SOFTBIN}

#: bins per tile of the epilogue (a power of two; more bins: more tiles, with carried sums);
#: interpreter: tests lower it to drive the carries with few bins
MAX_BLOCK_BINS = 1024
#: columns per program of the gradient kernel (GPU; interpreter: histogram.INTERPRETER_MAX_BLOCK_K)
GPU_BLOCK_K_GRAD = 1024
#: the histogram kernel's (BLOCK_K, BLOCK_L) accumulators hold about this many values each (GPU)
GPU_TILE = 2048


# --------------------------------------------------------------------------- kernels


@triton.jit
def _hist_kernel(
    scores_ptr, qlab_ptr, glab_ptr, rel_ptr, ign_idx_ptr, ign_mask_ptr, params_ptr, part_ptr, cnt_ptr,
    Q, N, L,
    stride_sq, stride_sn, stride_q, stride_g, stride_rq, stride_rn, stride_iq, stride_mq, stride_mn,
    OPEN: tl.constexpr, TARGET: tl.constexpr, IGNORE: tl.constexpr, REL_FLOAT: tl.constexpr,
    S: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Kernel 1, grid (Q, cdiv(L, BLOCK_L), S): part (S, 2, Q, L) partial h_all, h_pos in the
    accumulation dtype (that of params_ptr: scale, shift, L - 1); cnt (S, Q, 3) int32 (positives,
    NaN scores, NaN relevances) of the split's tiles, written by the bin-block 0 programs."""
    i = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(1)
    pid_s = tl.program_id(2)
    scale, shift, top = _hist._load_hist_params(params_ptr)
    ACC = params_ptr.dtype.element_ty
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
    ql, rel_row = _loss._target_row(qlab_ptr, rel_ptr, i, stride_q, stride_rq, TARGET)
    s_row = scores_ptr + i * stride_sq
    acc_all = tl.zeros((BLOCK_K, BLOCK_L), ACC)
    acc_pos = tl.zeros((BLOCK_K, BLOCK_L), ACC)
    n_pos = tl.zeros((BLOCK_K,), tl.int32)
    n_nan = tl.zeros((BLOCK_K,), tl.int32)
    n_bad = tl.zeros((BLOCK_K,), tl.int32)
    for k0 in range(pid_s * BLOCK_K, N, S * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid, pos, rel_nan = _loss._column_state(
            offs_k, N, ign, mask_row, stride_mn, ql, glab_ptr, stride_g, rel_row, stride_rn, IGNORE, TARGET, REL_FLOAT
        )
        s = tl.load(s_row + offs_k.to(tl.int64) * stride_sn, mask=valid, other=0.0).to(ACC)
        v = s * scale + shift
        n_nan += (valid & (v != v)).to(tl.int32)
        n_bad += rel_nan.to(tl.int32)
        n_pos += pos.to(tl.int32)
        lo, w_lo, w_hi, _ = _hist._soft_bin(v, top, OPEN)
        acc_all += _hist._one_hot_bins(tl.where(valid, lo, -2), w_lo, w_hi, offs_l)
        acc_pos += _hist._one_hot_bins(tl.where(pos, lo, -2), w_lo, w_hi, offs_l)
    in_l = offs_l < L
    out = part_ptr + (pid_s * 2 * Q + i) * L + offs_l
    tl.store(out, tl.sum(acc_all, axis=0), mask=in_l)
    tl.store(out + Q * L, tl.sum(acc_pos, axis=0), mask=in_l)
    if pid_l == 0:
        c_out = cnt_ptr + (pid_s * Q + i) * 3
        tl.store(c_out, tl.sum(n_pos, axis=0))
        tl.store(c_out + 1, tl.sum(n_nan, axis=0))
        tl.store(c_out + 2, tl.sum(n_bad, axis=0))


@triton.jit
def _bins(part_ptr, i, Q, L, offs_l, in_l, S: tl.constexpr, ACC: tl.constexpr):
    """(h_all, h_pos) of row i at bins offs_l: the S partials added in the order s = 0..S-1."""
    ha = tl.zeros(offs_l.shape, ACC)
    hp = tl.zeros(offs_l.shape, ACC)
    for s in tl.static_range(S):
        base = part_ptr + (s * 2 * Q + i) * L + offs_l
        ha += tl.load(base, mask=in_l, other=0.0)
        hp += tl.load(base + Q * L, mask=in_l, other=0.0)
    return ha, hp


@triton.jit
def _last(x, offs, B: tl.constexpr):
    """x[B - 1] of a (B,) tile: the carry of a cumsum (padding lanes add zeros)."""
    return tl.sum(tl.where(offs == B - 1, x, 0.0), axis=0)


@triton.jit
def _first(x, offs):
    """x[0] of a tile: the carry of a reverse cumsum."""
    return tl.sum(tl.where(offs == 0, x, 0.0), axis=0)


@triton.jit
def _epilogue_kernel(
    ign_idx_ptr, part_ptr, cnt_ptr, meta_ptr, score_ptr, npos_ptr, gb_ptr, params_ptr,
    Q, N, L, stride_iq,
    KIND: tl.constexpr, IGNORE: tl.constexpr, GRAD: tl.constexpr, S: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Kernel 2, grid (Q,): score[i], npos[i], meta[i] = (count, flags) ((Q, 2) int32: bit 1 a
    NaN score, bit 2 invalid input) and, if GRAD, gb[i] = (g_neg, g_pos) ((Q, 2, L))."""
    i = tl.program_id(0).to(tl.int64)
    ACC = params_ptr.dtype.element_ty
    count = tl.program_id(0) * 0
    n_nan = tl.program_id(0) * 0
    n_bad = tl.program_id(0) * 0
    for s in tl.static_range(S):
        c_in = cnt_ptr + (s * Q + i) * 3
        count += tl.load(c_in)
        n_nan += tl.load(c_in + 1)
        n_bad += tl.load(c_in + 2)
    bad = n_bad > 0
    if IGNORE & 1:
        ign = tl.load(ign_idx_ptr + i * stride_iq)
        bad = bad | (ign < -1) | (ign >= N)
    flags = tl.where(n_nan > 0, 1, 0) + tl.where(bad, 2, 0)
    tl.store(meta_ptr + i * 2, count)
    tl.store(meta_ptr + i * 2 + 1, flags)
    tl.store(npos_ptr + i, count.to(tl.int64))
    if flags != 0:
        tl.store(score_ptr + i, float("nan"))
    elif count == 0:
        tl.store(score_ptr + i, 0.0)
    else:
        ga = gb_ptr + i * 2 * L  # g_neg, then g_pos; the prefix sums H, H+ until the reverse pass
        gp = ga + L
        npf = count.to(ACC)
        total = tl.zeros((), ACC)
        if KIND == 1:
            for l0 in range(0, L, BLOCK_B):
                offs_l = l0 + tl.arange(0, BLOCK_B)
                ha, hp = _bins(part_ptr, i, Q, L, offs_l, offs_l < L, S, ACC)
                total += tl.sum(hp, axis=0)
        cp = tl.zeros((), ACC)
        ca = tl.zeros((), ACC)
        acc = tl.zeros((), ACC)
        acc_ph = tl.zeros((), ACC)  # SoftBin: sum_b prec_b h+_b, for d AP / d total
        ok_total = ~(total <= 0.0)
        for l0 in range(0, L, BLOCK_B):
            offs = tl.arange(0, BLOCK_B)
            offs_l = l0 + offs
            in_l = offs_l < L
            ha, hp = _bins(part_ptr, i, Q, L, offs_l, in_l, S, ACC)
            c_pos = cp + tl.cumsum(hp, axis=0)
            c_all = ca + tl.cumsum(ha, axis=0)
            if KIND == 0:
                num = hp * c_pos
                keep = (num != 0.0) & (c_all != 0.0)
                acc += tl.sum(tl.where(keep, num / tl.where(keep, c_all, 1.0), 0.0), axis=0)
            else:
                ok = ~(c_all <= 0.0)
                prec = tl.where(ok, c_pos / tl.where(ok, c_all, 1.0), 0.0)
                acc += tl.sum(prec * (hp / tl.where(ok_total, total, 1.0)), axis=0)
                acc_ph += tl.sum(prec * hp, axis=0)
            if GRAD:
                tl.store(ga + offs_l, c_all, mask=in_l)
                tl.store(gp + offs_l, c_pos, mask=in_l)
            cp = _last(c_pos, offs, BLOCK_B)
            ca = _last(c_all, offs, BLOCK_B)
        if KIND == 0:
            tl.store(score_ptr + i, acc / npf)
        else:
            tl.store(score_ptr + i, tl.where(ok_total, acc, 0.0))
        if GRAD:
            tl.debug_barrier()
            inv_np = 1.0 / npf
            safe_total = tl.where(ok_total, total, 1.0)
            d_total = -acc_ph / (safe_total * safe_total)
            suf_pos = tl.zeros((), ACC)
            suf_all = tl.zeros((), ACC)
            n_b = (L + BLOCK_B - 1) // BLOCK_B
            for tt in range(0, n_b):
                l0 = (n_b - 1 - tt) * BLOCK_B
                offs = tl.arange(0, BLOCK_B)
                offs_l = l0 + offs
                in_l = offs_l < L
                ha, hp = _bins(part_ptr, i, Q, L, offs_l, in_l, S, ACC)
                c_all = tl.load(ga + offs_l, mask=in_l, other=0.0)
                c_pos = tl.load(gp + offs_l, mask=in_l, other=0.0)
                if KIND == 0:
                    num = hp * c_pos
                    keep = in_l & (num != 0.0) & (c_all != 0.0)
                    inv = 1.0 / tl.where(keep, c_all, 1.0)
                    d_num = tl.where(keep, inv * inv_np, 0.0)
                    s_pos = suf_pos + tl.cumsum(hp * d_num, axis=0, reverse=True)
                    s_all = suf_all + tl.cumsum(tl.where(keep, -num * inv * inv * inv_np, 0.0), axis=0, reverse=True)
                    d_pos = c_pos * d_num + s_pos
                else:
                    ok = in_l & ~(c_all <= 0.0)
                    prec = tl.where(ok, c_pos / tl.where(ok, c_all, 1.0), 0.0)
                    d_cp = tl.where(ok, (hp / safe_total) / tl.where(ok, c_all, 1.0), 0.0)
                    s_pos = suf_pos + tl.cumsum(d_cp, axis=0, reverse=True)
                    s_all = suf_all + tl.cumsum(-d_cp * prec, axis=0, reverse=True)
                    d_pos = prec / safe_total + d_total + s_pos
                    d_pos = tl.where(ok_total, d_pos, 0.0)
                    s_all = tl.where(ok_total, s_all, 0.0)
                tl.debug_barrier()
                tl.store(ga + offs_l, s_all, mask=in_l)
                tl.store(gp + offs_l, s_all + d_pos, mask=in_l)
                suf_pos = _first(s_pos, offs)
                suf_all = _first(s_all, offs)


@triton.jit
def _grad_kernel(
    scores_ptr, qlab_ptr, glab_ptr, rel_ptr, ign_idx_ptr, ign_mask_ptr, params_ptr, meta_ptr, gb_ptr, grad_ptr,
    N, L,
    stride_sq, stride_sn, stride_q, stride_g, stride_rq, stride_rn, stride_iq, stride_mq, stride_mn,
    OPEN: tl.constexpr, TARGET: tl.constexpr, IGNORE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Kernel 3, grid (Q, cdiv(N, BLOCK_K)): grad[i, k] ((Q, N) contiguous) for a block of columns."""
    i = tl.program_id(0).to(tl.int64)
    ACC = params_ptr.dtype.element_ty
    count = tl.load(meta_ptr + i * 2)
    flags = tl.load(meta_ptr + i * 2 + 1)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = offs_k < N
    out_ptr = grad_ptr + i * N + offs_k
    ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
    ql, rel_row = _loss._target_row(qlab_ptr, rel_ptr, i, stride_q, stride_rq, TARGET)
    valid, pos, _rn = _loss._column_state(
        offs_k, N, ign, mask_row, stride_mn, ql, glab_ptr, stride_g, rel_row, stride_rn, IGNORE, TARGET, False
    )
    if (flags & 2) != 0:
        tl.store(out_ptr, tl.full((BLOCK_K,), float("nan"), ACC), mask=in_k)
    elif flags != 0:
        tl.store(out_ptr, tl.where(valid & (count > 0), float("nan"), 0.0).to(ACC), mask=in_k)
    elif count == 0:
        tl.store(out_ptr, tl.zeros((BLOCK_K,), ACC), mask=in_k)
    else:
        scale, shift, top = _hist._load_hist_params(params_ptr)
        s = tl.load(scores_ptr + i * stride_sq + offs_k.to(tl.int64) * stride_sn, mask=valid, other=0.0).to(ACC)
        lo, _, _, slope = _hist._soft_bin(s * scale + shift, top, OPEN)
        hi = lo + 1
        g_row = gb_ptr + i * 2 * L + tl.where(pos, L, 0).to(tl.int64)
        take = valid & (slope > 0.0)
        a_lo = tl.load(g_row + lo.to(tl.int64), mask=take & (lo >= 0), other=0.0)
        a_hi = tl.load(g_row + hi.to(tl.int64), mask=take & (hi < L), other=0.0)
        g = tl.where(take, a_hi - a_lo, 0.0) * scale
        tl.store(out_ptr, tl.where(valid, g, 0.0), mask=in_k)


# --------------------------------------------------------------------------- host side


def _blocks(n: int, bins: int) -> Tuple[int, int, int, int]:
    """(BLOCK_L, BLOCK_K of the histograms, BLOCK_B of the epilogue, BLOCK_K of the gradient)."""
    bl = _hist._block_l(bins)
    bb = capped_pow2(bins, MAX_BLOCK_BINS)
    if INTERPRETED:
        bk = capped_pow2(n, _hist.INTERPRETER_MAX_BLOCK_K)
        return bl, bk, bb, bk
    return bl, max(16, GPU_TILE // bl), bb, GPU_BLOCK_K_GRAD


def hist_loss_rows(
    scores: Tensor,
    query_labels: Optional[Tensor],
    gallery_labels: Optional[Tensor],
    relevance: Optional[Tensor],
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: HistParams,
    *,
    kind: str = "fastap",
    with_grad: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(AP (Q,), n_pos (Q,) int64, gradient rows (Q, N) or (0, N)) of the fused FastAP
    (kind="fastap") or SoftBin (kind="softbin") histogram AP; AP and rows in the accumulation
    dtype (float32; float64 for float64 scores).

    Args:
        scores: (Q, N) float16/bfloat16/float32/float64, any strides.
        query_labels, gallery_labels: (Q,), (N,) integer labels (positive = equal), or None.
        relevance: (Q, N) bool/integer/floating, > 0 = positive (a NaN makes the query NaN), or None.
        ignore_idx: (Q,) int64 column to leave out per query (-1 = none; another value outside
            [-1, N) makes the query NaN), or None.
        ignore_mask: (Q, N) bool, True = left out, or None.
        params: the bins (fastrank.core.params.HistParams; fastrank.histogram.histogram_params).
        kind: "fastap" or "softbin" (the epilogue).
        with_grad: also the gradient rows d AP_i / d scores[i, :].

    Two kernel launches, three with the gradient, on the current stream; no host sync.
    """
    fn = "fastrank.triton_kernels.histogram_loss.hist_loss_rows"
    _loss._check_operands(fn, scores, query_labels, gallery_labels, relevance, ignore_idx, ignore_mask)
    _hist.check_params(fn, params, scores.dtype)
    if kind not in KINDS:
        raise ValueError(f"{fn}: `kind` must be 'fastap' or 'softbin', got {kind!r}")
    q, n = scores.shape
    bins = int(params.bins)
    dev = scores.device
    acc = acc_dtype(scores.dtype)
    score = torch.empty((q,), dtype=acc, device=dev)
    n_pos = torch.empty((q,), dtype=torch.int64, device=dev)
    grad = torch.empty((q if with_grad else 0, n), dtype=acc, device=dev)
    if q == 0 or n == 0:
        return score.zero_(), n_pos.zero_(), grad.zero_()
    target_mode, qlab, glab, rel, lab_strides, rel_strides, rel_float = _loss._target_operands(
        scores, query_labels, gallery_labels, relevance)
    ign_idx, ign_mask, ign_strides, mode = ignore_args(scores, ignore_idx, ignore_mask)
    ptrs = (scores, qlab, glab, rel, ign_idx, ign_mask)
    strides = (*scores.stride(), *lab_strides, *rel_strides, *ign_strides)

    bl, bk, bb, bk_grad = _blocks(n, bins)
    n_lb = triton.cdiv(bins, bl)
    split = _hist._num_splits(q, n_lb, n, dev)
    prm = _hist._params_tensor(params, acc, dev)
    part = torch.empty((split, 2, q, bins), dtype=acc, device=dev)
    cnt = torch.empty((split, q, 3), dtype=torch.int32, device=dev)
    meta = torch.empty((q, 2), dtype=torch.int32, device=dev)
    gb = torch.empty((q, 2, bins), dtype=acc, device=dev)
    open_ends = bool(params.open_ends)

    _hist_kernel[(q, n_lb, split)](
        *ptrs, prm, part, cnt, q, n, bins, *strides,
        OPEN=open_ends, TARGET=target_mode, IGNORE=mode, REL_FLOAT=rel_float, S=split, BLOCK_L=bl, BLOCK_K=bk,
    )
    _epilogue_kernel[(q,)](
        ign_idx, part, cnt, meta, score, n_pos, gb, prm, q, n, bins, ign_strides[0],
        KIND=KINDS[kind], IGNORE=mode, GRAD=with_grad, S=split, BLOCK_B=bb,
    )
    if with_grad:
        _grad_kernel[(q, triton.cdiv(n, bk_grad))](
            *ptrs, prm, meta, gb, grad, n, bins, *strides,
            OPEN=open_ends, TARGET=target_mode, IGNORE=mode, BLOCK_K=bk_grad,
        )
    return score, n_pos, grad


def run_loss(name: str, scores: Tensor, *tensors: Optional[Tensor], params: HistParams,
             options: Tuple = ()) -> Tuple[Tensor, Tensor]:
    """(AP (Q,), n_pos (Q,)) of the fused histogram_ap_loss op (the arguments of
    torch.ops.fastrank.histogram_ap_loss after scores: labels, relevance, ignore; options (kind,),
    0 = FastAP, 1 = SoftBin), differentiable w.r.t. scores; fastrank.core.registry.run_loss calls
    it for backend="triton"."""
    if name != "histogram_ap_loss":
        raise ValueError(f"fastrank.triton_kernels.histogram_loss.run_loss: no Triton kernels for {name!r}")
    qlab, glab, rel, ign_idx, ign_mask = tensors
    (code,) = options
    kind = {v: k for k, v in KINDS.items()}[int(code)]
    return _loss._FusedLoss.apply(scores, qlab, glab, rel, ign_idx, ign_mask, params,
                                  dict(kind=kind, rows=hist_loss_rows))
