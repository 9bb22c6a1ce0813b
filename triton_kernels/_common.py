"""Pieces shared by the Triton kernel modules: interpreter detection, dtypes, the kernel
preambles (ignored column, block of ranked items, block of columns) as device helpers, the
argument checks and pointer/stride packing of the packed problem (fastrank/_problem.py), and
the launch configuration and host-side launches of the rank-sums kernels (rank_sums.py,
graded.py).

The device helpers run once per program (a device-function call costs the interpreter about a
millisecond): never call them inside a kernel's loops.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastrank.core.backend import triton_interpreted
from fastrank.core.params import SIGMOID, SUPRANK, StepParams
from fastrank.core.validate import FLOAT_DTYPES

Tensor = torch.Tensor

#: kernels run in Triton's CPU interpreter (CI); read once, at import, as Triton does
INTERPRETED = triton_interpreted()
#: FASTRANK_TRITON_AUTOTUNE=0: one config per kernel (the one whose tile is nearest the per-thread
#: budget) instead of benchmarking every candidate for each new shape key; test runs on a GPU use it
#: (gpu-check), since tuning each test's shape would take most of their time
AUTOTUNE = os.environ.get("FASTRANK_TRITON_AUTOTUNE", "1") != "0"

# IGNORE constexpr of every kernel: a bit set
IGNORE_NONE = 0
IGNORE_INDEX = 1
IGNORE_MASK = 2

#: what a NaN row's outputs are set to (a constexpr, so that the kernels can use it)
NAN: tl.constexpr = tl.constexpr(float("nan"))


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def capped_pow2(x: int, cap: int) -> int:
    """A block size: x rounded up to a power of two, in [2, cap]."""
    return max(2, min(next_pow2(x), int(cap)))


# --------------------------------------------------------------------------- device helpers


@triton.jit
def row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE: tl.constexpr):
    """(ign, mask_row) of query i: its ignored column (-1 unless IGNORE & 1, the only case
    that reads ign_idx_ptr) and its row of the ignore mask (read by `valid_cols` if IGNORE & 2)."""
    ign = -1
    if IGNORE & 1:
        ign = tl.load(ign_idx_ptr + i * stride_iq)
    return ign, ign_mask_ptr + i * stride_mq


@triton.jit
def ranked_block(
    scores_ptr, pos_idx_ptr, i, pid_p, P, stride_sq, stride_sn, stride_pq, stride_pp,
    BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    """(offs_p, in_p, j, has, s_row, sj): the program's block pid_p of BLOCK_P ranked items of
    query i (64-bit offsets): their slots offs_p (in_p: inside P), columns j (-1 = hole or
    beyond P; has = j >= 0), the query's score row s_row and the items' scores sj in ACC (0 at holes)."""
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    in_p = offs_p < P
    j = tl.load(pos_idx_ptr + i * stride_pq + offs_p.to(tl.int64) * stride_pp, mask=in_p, other=-1)
    has = j >= 0
    s_row = scores_ptr + i * stride_sq
    sj = tl.load(s_row + j * stride_sn, mask=has, other=0.0).to(ACC)
    return offs_p, in_p, j, has, s_row, sj


@triton.jit
def column_block(
    scores_ptr, ign_idx_ptr, ign_mask_ptr, i, pid_k, N, stride_sq, stride_sn, stride_iq, stride_mq, stride_mn,
    IGNORE: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """(offs_k, valid, s_row, sk): the program's block pid_k of BLOCK_K columns of query i, which
    of them take part (`valid_cols`), the query's score row and the columns' scores in ACC
    (0 where not valid); 64-bit offsets."""
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ign, mask_row = row_ignore(ign_idx_ptr, ign_mask_ptr, i, stride_iq, stride_mq, IGNORE)
    valid = valid_cols(offs_k, N, ign, mask_row, stride_mn, IGNORE)
    s_row = scores_ptr + i * stride_sq
    sk = tl.load(s_row + offs_k.to(tl.int64) * stride_sn, mask=valid, other=0.0).to(ACC)
    return offs_k, valid, s_row, sk


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


@triton.jit
def store_ranks(rank_all_ptr, rank_pos_ptr, rank_all, rank_pos, i, P, offs_p, in_p, has):
    """A rank-sums forward's outputs: rank_all, rank_pos (BLOCK_P,) of query i at slots offs_p of
    the contiguous (Q, P) outputs, in their dtype, 0 at holes (~has)."""
    out_ty = rank_all_ptr.dtype.element_ty
    out_off = i * P + offs_p
    tl.store(rank_all_ptr + out_off, tl.where(has, rank_all, 0.0).to(out_ty), mask=in_p)
    tl.store(rank_pos_ptr + out_off, tl.where(has, rank_pos, 0.0).to(out_ty), mask=in_p)


@triton.jit
def store_column_grad(acc, nan_flag_ptr, grad_ptr, i, N, offs_k, valid):
    """A rank-sums columns kernel's output: acc (BLOCK_P, BLOCK_K) summed over the ranked items
    into grad[i, offs_k] (contiguous (Q, N)); NaN at the valid columns of a row the rows kernel
    flagged in nan_flag_ptr, 0 at ignored ones."""
    g = tl.sum(acc, axis=0)
    row_nan = tl.load(nan_flag_ptr + i) != 0
    g = tl.where(row_nan, NAN, g)
    tl.store(grad_ptr + i * N + offs_k, tl.where(valid, g, 0.0), mask=offs_k < N)


# --------------------------------------------------------------------------- host side: checks, arguments


def check_tensor(fn: str, name: str, t, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{fn}: `{name}` must be {dims}-D, got shape {tuple(t.shape)}")


def check_operand(fn: str, name: str, t, dims: int, dtypes, dtype_text: str, shape, shape_text: str, device) -> None:
    """A `dims`-D tensor `name` with a dtype in `dtypes` (None: any floating dtype), the sizes of
    `shape` (None: any) and on `device` (that of `scores`); the messages say `dtype_text` and
    `shape_text` for what was expected."""
    check_tensor(fn, name, t, dims)
    if not (t.dtype.is_floating_point if dtypes is None else t.dtype in dtypes):
        raise TypeError(f"{fn}: `{name}` must be {dtype_text}, got {t.dtype}")
    if any(want is not None and got != want for got, want in zip(t.shape, shape)):
        raise ValueError(f"{fn}: `{name}` must have {shape_text}, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{fn}: `{name}` is on {t.device} but `scores` is on {device}")


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
    int64 = (torch.int64,)
    check_operand(fn, "pos_idx", pos_idx, 2, int64, "int64", (q, None), f"shape (Q, P) with Q = {q}", dev)
    if ignore_idx is not None:
        check_operand(fn, "ignore_idx", ignore_idx, 1, int64, "int64", (q,), f"shape ({q},)", dev)
    if ignore_mask is not None:
        check_operand(
            fn, "ignore_mask", ignore_mask, 2, (torch.bool,), "bool",
            scores.shape, f"the shape of `scores` {tuple(scores.shape)}", dev,
        )


def check_dense_operand(fn: str, name: str, t, scores) -> None:
    """A (Q, N) floating tensor beside `scores` (the graded relevance)."""
    check_operand(
        fn, name, t, 2, FLOAT_DTYPES, "float16, bfloat16, float32 or float64",
        scores.shape, f"the shape of `scores` {tuple(scores.shape)}", scores.device,
    )


def grads_or_zeros(fn: str, names, grads, shape, shape_text: str, scores):
    """Incoming gradients of a backward, None replaced by zeros of `shape` in the accumulation
    dtype, each checked: floating, of that shape (`shape_text` says which), on the device of `scores`."""
    acc = acc_dtype(scores.dtype)
    out = []
    for name, g in zip(names, grads):
        if g is None:
            g = torch.zeros(shape, dtype=acc, device=scores.device)
        check_operand(fn, name, g, 2, None, "floating point", shape, shape_text, scores.device)
        out.append(g)
    return out


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: elements of a (rows, BLOCK_K) tile per thread kept on a GPU (float32; half for float64):
#: enough independent work per thread to hide latency, few enough that the accumulator and the
#: handful of live temporaries stay in registers (ptxas for sm_90 spills beyond ~64)
PER_THREAD_MIN, PER_THREAD_MAX = 8, 32


def fit_row(configs, named_args, n_floor: int):
    """The configs whose BLOCK_K is not much wider than the row (at least `n_floor`): wider
    blocks only add masked lanes. The first config if none fits."""
    n_cap = max(n_floor, next_pow2(int(named_args.get("N", 1 << 30))))
    return [c for c in configs if c.kwargs["BLOCK_K"] <= n_cap] or configs[:1]


def prune_tile_configs(configs, named_args, rows: int, n_floor: int):
    """Autotune pruning shared by the kernels: keep configs whose (rows, BLOCK_K) tile fits the
    per-thread budget and whose BLOCK_K is not much wider than the row (at least `n_floor`)."""
    prm = named_args.get("params_ptr")
    wide = 2 if prm is not None and prm.dtype == torch.float64 else 1

    def per_thread(c):
        return rows * c.kwargs["BLOCK_K"] * wide / (32 * c.num_warps)

    fit = fit_row(configs, named_args, n_floor)
    good = [c for c in fit if PER_THREAD_MIN <= per_thread(c) <= PER_THREAD_MAX]
    if good and AUTOTUNE:
        return good
    # autotuning off, tiny rows or wide tiles: the config whose tile is closest to the budget
    return [min(fit, key=lambda c: abs(per_thread(c) - PER_THREAD_MAX))]


# --------------------------------------------------------------------------- host side: the rank-sums kernels
# (rank_sums.py and graded.py share their step, checks, launch configuration and launches)


@functools.lru_cache(maxsize=128)
def device_constants(vals: Tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A kernel's parameters as a small tensor on the device in the accumulation dtype (cached,
    read-only): Triton passes Python floats as float32, which would cost float64 inputs their precision."""
    return torch.tensor(list(vals), dtype=dtype, device=device)


def step_params_tensor(params: StepParams, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(1/tau, rho, delta, start, offset), as `load_step_params` (_step.py) reads them, then
    (beta, gamma, leak) at [5:8] for GradedParams with the smoothed H-rank (`load_hrank_params`)."""
    vals = (1.0 / params.tau, params.rho, params.delta, params.start, params.resolved_offset)
    if getattr(params, "hrank", False):
        vals += (params.beta, params.gamma, params.leak)
    return device_constants(vals, dtype, device)


def use_fast(fast: Optional[bool], acc: torch.dtype) -> bool:
    """The FAST constexpr: asked for (None reads FASTRANK_TRITON_FAST), float32, on a GPU."""
    if fast is None:
        fast = os.environ.get("FASTRANK_TRITON_FAST", "0") == "1"
    return bool(fast) and not INTERPRETED and acc == torch.float32


def check_step_inputs(fn: str, scores, pos_idx, ignore_idx, ignore_mask, params) -> None:
    """`check_packed_inputs` and the step parameters (a sigmoid or suprank StepParams, tau > 0)."""
    check_packed_inputs(fn, scores, pos_idx, ignore_idx, ignore_mask)
    if not isinstance(params, StepParams):
        raise TypeError(f"{fn}: `params` must be a fastrank.core.params.StepParams, got {type(params).__name__}")
    if params.step not in (SIGMOID, SUPRANK):
        raise ValueError(f"{fn}: `params.step` must be {SIGMOID} (sigmoid) or {SUPRANK} (suprank), got {params.step}")
    if not params.tau > 0:
        raise ValueError(f"{fn}: `params.tau` must be > 0, got {params.tau}")
    params.check_dtype(scores.dtype)  # 1/tau and the parameters finite in the accumulation dtype


def rank_grads(fn: str, names, grad_all, grad_pos, scores: Tensor, pos_idx: Tensor):
    """(grad_all, grad_pos) of rank_all and rank_pos: `grads_or_zeros` with the shape of `pos_idx`."""
    shape = tuple(pos_idx.shape)
    return grads_or_zeros(fn, names, (grad_all, grad_pos), shape, f"the shape of `pos_idx` {shape}", scores)


def rank_block_p(p: int, interpreter_cap: int) -> int:
    """Ranked items per program: P rounded up to a power of two, in [2, 64] (interpreter: its cap)."""
    return capped_pow2(p, interpreter_cap if INTERPRETED else 64)


def ignore_args(pos_idx, ignore_idx, ignore_mask):
    """(ign_idx, ign_mask) pointers, their strides (stride_iq, stride_mq, stride_mn) and the
    IGNORE bits; absent tensors are replaced by a dummy pointer that is never read."""
    mode = IGNORE_NONE
    if ignore_idx is not None:
        mode |= IGNORE_INDEX
        ign_idx, stride_iq = ignore_idx, ignore_idx.stride(0)
    else:
        ign_idx, stride_iq = pos_idx, 0
    if ignore_mask is not None:
        mode |= IGNORE_MASK
        ign_mask = ignore_mask.view(torch.uint8)
        stride_mq, stride_mn = ign_mask.stride()
    else:
        ign_mask, stride_mq, stride_mn = pos_idx, 0, 0
    return ign_idx, ign_mask, (stride_iq, stride_mq, stride_mn), mode


def packed_args(scores, pos_idx, ignore_idx, ignore_mask, extra=()):
    """Pointers (scores, pos_idx, ign_idx, ign_mask, *extra) and strides (scores', pos_idx',
    ignore strides, then each extra tensor's) of the rank-sums kernels, and the IGNORE bits."""
    ign_idx, ign_mask, ign_strides, mode = ignore_args(pos_idx, ignore_idx, ignore_mask)
    ptrs = (scores, pos_idx, ign_idx, ign_mask, *extra)
    strides = (*scores.stride(), *pos_idx.stride(), *ign_strides, *(s for t in extra for s in t.stride()))
    return ptrs, strides, mode


def configure_kernel(kernel, interpreter_block_k, block_ks, warps, key, prune):
    """GPU: autotune over (BLOCK_K in `block_ks`) x (num_warps in `warps`), keyed on the
    arguments named in `key`, the candidates pruned by `prune`; interpreter: one config with
    large blocks, BLOCK_K = interpreter_block_k(args)."""
    if INTERPRETED:
        return triton.heuristics({"BLOCK_K": interpreter_block_k})(kernel)
    configs = [triton.Config({"BLOCK_K": bk}, num_warps=w) for bk in block_ks for w in warps]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


def configure_rank_kernel(kernel, interpreter_block_k, tiles: int = 1, key_extra: Tuple[str, ...] = ()):
    """`configure_kernel` for the rank-sums kernels, keyed on (N_KEY, BLOCK_P, STEP, IGNORE) and
    the constexprs named in `key_extra` (those that change the kernel's register use).

    `tiles` is the number of live (BLOCK_P, BLOCK_K) accumulators of the kernel, which the
    pruning rule counts against the per-thread register budget.
    """

    def prune(configs, named_args, **kwargs):
        bp = kwargs.get("BLOCK_P", named_args.get("BLOCK_P", 16))
        return prune_tile_configs(configs, named_args, rows=tiles * bp, n_floor=32)

    return configure_kernel(
        kernel, interpreter_block_k, (32, 64, 128, 256, 512, 1024, 2048, 4096), (4, 8),
        ["N_KEY", "BLOCK_P", "STEP", "IGNORE", *key_extra], prune,
    )


def launch_rank_forward(
    kernel, bp: int, scores, pos_idx, ignore_idx, ignore_mask, params, fast, extra=(), consts=None
) -> Tuple[Tensor, Tensor]:
    """rank_all, rank_pos (Q, P) in the dtype of `scores` (zeros without work) from a forward
    kernel taking (*packed_args, params, rank_all, rank_pos, N, P, N_KEY, *strides, STEP,
    IGNORE, FAST, BLOCK_P = bp, and the kernel's own constexprs `consts`), grid (Q, cdiv(P, bp)).
    Inputs already checked."""
    q, n = scores.shape
    p = pos_idx.shape[1]
    rank_all = torch.zeros((q, p), dtype=scores.dtype, device=scores.device)
    rank_pos = torch.zeros_like(rank_all)
    if q == 0 or p == 0 or n == 0:
        return rank_all, rank_pos
    acc = acc_dtype(scores.dtype)
    ptrs, strides, mode = packed_args(scores, pos_idx, ignore_idx, ignore_mask, extra)
    kernel[(q, triton.cdiv(p, bp))](
        *ptrs, step_params_tensor(params, acc, scores.device), rank_all, rank_pos,
        n, p, next_pow2(n), *strides,
        STEP=params.step, IGNORE=mode, FAST=use_fast(fast, acc), BLOCK_P=bp, **(consts or {}),
    )
    return rank_all, rank_pos


def launch_rank_backward(
    rows_kernel, cols_kernel, bp: int, grad_all, grad_pos, scores, pos_idx, ignore_idx, ignore_mask, params, fast,
    extra=(), cols_grad_pos: bool = False, consts=None,
) -> Tensor:
    """dL/dscores (Q, N), dtype of `scores`: the rows kernel (grid (Q, cdiv(P, bp))), the columns
    kernel (grid (Q, cdiv(N, BLOCK_K))), then the rows kernel's output scattered onto the ranked
    columns (unique per row; holes add +0.0 to column 0, so the result is deterministic).

    rows: (*ptrs, params, grad_all, grad_pos, out, nan_flag, N, P, N_KEY, *strides, grad_all's
    and grad_pos' strides); cols: (*ptrs, params, grad_all, [grad_pos,] nan_flag, grad, N, P,
    N_KEY, *strides, grad_all's [and grad_pos'] strides), grad_pos if `cols_grad_pos`. Both get
    STEP, IGNORE, FAST, BLOCK_P = bp and the kernels' own constexprs `consts`. Inputs checked;
    zeros (contiguous) without work.
    """
    q, n = scores.shape
    p = pos_idx.shape[1]
    if q == 0 or p == 0 or n == 0:
        return torch.zeros_like(scores, memory_format=torch.contiguous_format)
    acc = acc_dtype(scores.dtype)
    ptrs, strides, mode = packed_args(scores, pos_idx, ignore_idx, ignore_mask, extra)
    prm = step_params_tensor(params, acc, scores.device)
    meta = dict(STEP=params.step, IGNORE=mode, FAST=use_fast(fast, acc), BLOCK_P=bp, **(consts or {}))
    n_key = next_pow2(n)

    out = torch.empty((q, p), dtype=acc, device=scores.device)
    nan_flag = torch.zeros((q,), dtype=torch.int32, device=scores.device)
    rows_kernel[(q, triton.cdiv(p, bp))](
        *ptrs, prm, grad_all, grad_pos, out, nan_flag,
        n, p, n_key, *strides, *grad_all.stride(), *grad_pos.stride(), **meta,
    )
    grad = torch.empty((q, n), dtype=acc, device=scores.device)
    cols_grads = (grad_all, grad_pos) if cols_grad_pos else (grad_all,)
    cols_kernel[lambda m: (q, triton.cdiv(n, m["BLOCK_K"]))](
        *ptrs, prm, *cols_grads, nan_flag, grad,
        n, p, n_key, *strides, *(s for g in cols_grads for s in g.stride()), **meta,
    )
    # each ranked column of a row appears once in pos_idx; holes add +0.0 (out is 0 there) to column 0
    grad.scatter_add_(1, pos_idx.clamp(min=0), out)
    return grad if grad.dtype == scores.dtype else grad.to(scores.dtype)
