"""Autograd glue of the rank-sums primitive for every backend.

* `cpp` / `cuda`: the C++ ops `torch.ops.fastrank.rank_sums_fwd/_bwd` (schemas in
  csrc/fastrank.cpp); here they get a fake (meta) implementation, so that
  `torch.compile` and `torch.library.opcheck` can trace them, and an autograd
  formula that calls the backward op.
* `torch`: the same two functions in pure PyTorch (fastrank.reference) wrapped in
  an autograd.Function.
* `naive`: autograd through the materialised cube.

Only `naive` has higher-order and forward-mode derivatives: the other backends' gradient
is a fused backward kernel, which autograd cannot differentiate again. They raise (see
_fused_gradient, _refuse_transforms) rather than return the zeros autograd would make of it.
"""
from __future__ import annotations

import importlib
import threading
from typing import Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD

from . import _hist, reference
from ._backend import _load_extension
from ._step import StepParams

Tensor = torch.Tensor


def _naive_hint(what: str, backend: str, missing: str, entry_points: str) -> str:
    return (
        f"fastrank: {what} on backend {backend!r} has no {missing} ({entry_points}): its gradient is a "
        "fused backward kernel, not a PyTorch graph. Use backend='naive' (autograd through the "
        "Q x N x N cube) for higher-order or forward-mode derivatives."
    )


class _FusedGradient(torch.autograd.Function):
    """The first derivative a fused backward computed, unchanged, tied to the tensors it depends
    on. Without this, under create_graph=True autograd sees the kernel's result as a constant
    and a second derivative (grad of grad, hessian, hvp) comes out as 0; differentiating it
    now raises the message instead."""

    @staticmethod
    def forward(grad, message, *depends_on):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def _fused_gradient(compute, what: str, backend: str, *depends_on: Optional[Tensor]) -> Tensor:
    """compute() the gradient of a fused backward; when grad mode is on in the backward
    (create_graph=True), the result is tied to `depends_on` so that it cannot be differentiated
    again silently."""
    if not torch.is_grad_enabled():
        return compute()
    with torch.no_grad():
        grad = compute()
    message = _naive_hint(
        what, backend, "second derivative", "create_graph=True, torch.autograd.functional.hessian/hvp/vhp"
    )
    return _FusedGradient.apply(grad, message, *(t for t in depends_on if t is not None))


# torch.func's grad-type transforms (grad, vjp, jacrev, jvp, jacfwd, hessian) wrap tensors in a
# grad-tracking wrapper; the fused ops' autograd cannot run under them (torch.func.vmap can)
_is_grad_tracking = getattr(getattr(torch._C, "_functorch", None), "is_gradtrackingtensor", lambda t: False)


def _refuse_transforms(what: str, backend: str, scores: Tensor) -> None:
    """Forward-mode AD would run the op below autograd and give a zero tangent, and torch.func's
    differentiating transforms would fail on the autograd.Function with an unrelated message:
    refuse both, naming the way out. Outside a dual level unpack_dual returns at once (no op).
    Skipped while torch.compile traces (dynamo cannot trace the functorch query: a graph break)."""
    if torch.compiler.is_compiling():
        return
    if fwAD.unpack_dual(scores).tangent is not None or _is_grad_tracking(scores):
        raise RuntimeError(
            _naive_hint(
                what,
                backend,
                "forward-mode or torch.func derivative",
                "torch.func.grad/vjp/jacrev/jvp/jacfwd/hessian, torch.autograd.forward_ad",
            )
        )


_REGISTERED = False
_REGISTER_LOCK = threading.Lock()


def _register_cpp_ops() -> None:
    """Fake kernels and autograd for the C++ ops (once, after fastrank._C loaded).

    Thread-safe: the first calls of several threads wait on the lock, and the flag that
    lets later calls skip it is set only once every registration is in place (an op run
    before its autograd formula is registered silently returns no gradient)."""
    global _REGISTERED
    if _REGISTERED:
        return
    with _REGISTER_LOCK:
        if not _REGISTERED and _load_extension() is None:
            _register_cpp_ops_once()
            _REGISTERED = True


def _register_cpp_ops_once() -> None:
    def _one_device(op, **tensors):
        """The fake kernels run for meta tensors, also when only some arguments are meta (the
        dispatcher picks Meta over CPU): a mix would return an uninitialised tensor."""
        devices = {name: t.device for name, t in tensors.items() if t is not None}
        if len(set(devices.values())) > 1:
            listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
            raise ValueError(f"fastrank::{op}: every tensor argument must be on one device, got {listed}")

    @torch.library.register_fake("fastrank::rank_sums_fwd")
    def _fwd_fake(scores, pos_idx, ignore_idx, ignore_mask, step, tau, rho, delta, start, offset):
        _one_device("rank_sums_fwd", scores=scores, pos_idx=pos_idx, ignore_idx=ignore_idx, ignore_mask=ignore_mask)
        out = scores.new_empty(pos_idx.shape)
        return out, torch.empty_like(out)

    @torch.library.register_fake("fastrank::rank_sums_bwd")
    def _bwd_fake(grad_all, grad_pos, scores, pos_idx, ignore_idx, ignore_mask, step, tau, rho, delta, start, offset):
        _one_device("rank_sums_bwd", grad_rank_all=grad_all, grad_rank_pos=grad_pos, scores=scores, pos_idx=pos_idx,
                    ignore_idx=ignore_idx, ignore_mask=ignore_mask)
        return torch.empty_like(scores)

    def _setup_context_with(n_tensors: int):
        """setup_context of an op whose first `n_tensors` inputs are the (optional) tensors of the
        problem, scores first, and whose remaining inputs are scalars for the backward op."""

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs[:n_tensors])
            ctx.step_args = inputs[n_tensors:]
            ctx.out_shape = output[0].shape

        return setup_context

    def _backward_with(bwd_op, fwd_name: str):
        """Autograd formula of a (fwd, bwd) op pair: the backward op takes the two output
        gradients, then the forward's inputs; an unused output's gradient is zeros of its shape."""

        def backward(ctx, grad0, grad1):
            saved = ctx.saved_tensors
            grad0 = saved[0].new_zeros(ctx.out_shape) if grad0 is None else grad0
            grad1 = saved[0].new_zeros(ctx.out_shape) if grad1 is None else grad1
            backend = "cuda" if saved[0].is_cuda else "cpp"
            grad = _fused_gradient(
                lambda: bwd_op(grad0, grad1, *saved, *ctx.step_args), fwd_name, backend, saved[0], grad0, grad1
            )
            return (grad,) + (None,) * (len(saved) - 1 + len(ctx.step_args))

        return backward

    # (scores, pos_idx, ignore_idx, ignore_mask) + scalars
    _setup_context = _setup_context_with(4)

    torch.library.register_autograd(
        "fastrank::rank_sums_fwd",
        _backward_with(torch.ops.fastrank.rank_sums_bwd, "fastrank::rank_sums_fwd"),
        setup_context=_setup_context,
    )

    @torch.library.register_fake("fastrank::histogram_fwd")
    def _hist_fwd_fake(scores, pos_idx, ignore_idx, ignore_mask, bins, scale, shift, open_ends):
        _one_device("histogram_fwd", scores=scores, pos_idx=pos_idx, ignore_idx=ignore_idx, ignore_mask=ignore_mask)
        out = scores.new_empty((scores.shape[0], bins))
        return out, torch.empty_like(out)

    @torch.library.register_fake("fastrank::histogram_bwd")
    def _hist_bwd_fake(grad_all, grad_pos, scores, pos_idx, ignore_idx, ignore_mask, bins, scale, shift, open_ends):
        _one_device("histogram_bwd", grad_h_all=grad_all, grad_h_pos=grad_pos, scores=scores, pos_idx=pos_idx,
                    ignore_idx=ignore_idx, ignore_mask=ignore_mask)
        return torch.empty_like(scores)

    torch.library.register_autograd(
        "fastrank::histogram_fwd",
        _backward_with(torch.ops.fastrank.histogram_bwd, "fastrank::histogram_fwd"),
        setup_context=_setup_context,
    )

    @torch.library.register_fake("fastrank::graded_rank_sums_fwd")
    def _graded_fwd_fake(scores, relevance, pos_idx, ignore_idx, ignore_mask, step, tau, rho, delta, start, offset):
        _one_device("graded_rank_sums_fwd", scores=scores, relevance=relevance, pos_idx=pos_idx,
                    ignore_idx=ignore_idx, ignore_mask=ignore_mask)
        out = scores.new_empty(pos_idx.shape)
        return out, torch.empty_like(out)

    @torch.library.register_fake("fastrank::graded_rank_sums_bwd")
    def _graded_bwd_fake(grad_all, grad_pos, scores, relevance, pos_idx, ignore_idx, ignore_mask, *step_args):
        _one_device("graded_rank_sums_bwd", grad_rank_all=grad_all, grad_rank_pos=grad_pos, scores=scores,
                    relevance=relevance, pos_idx=pos_idx, ignore_idx=ignore_idx, ignore_mask=ignore_mask)
        return torch.empty_like(scores)

    # (scores, relevance, pos_idx, ignore_idx, ignore_mask) + scalars; relevance gets no gradient
    torch.library.register_autograd(
        "fastrank::graded_rank_sums_fwd",
        _backward_with(torch.ops.fastrank.graded_rank_sums_bwd, "fastrank::graded_rank_sums_fwd"),
        setup_context=_setup_context_with(5),
    )


def _python_backend(name: str, backend: str, module: str, forward: str, backward: str):
    """An autograd.Function over a Python backend's (forward, backward) pair.

    Every Python backend implements the same two functions — forward(scores, *tensors,
    params) -> 2 outputs, backward(grad0, grad1, scores, *tensors, params) -> grad of
    scores — where `tensors` are the rest of the problem ((pos_idx, ignore_idx,
    ignore_mask), with relevance in front for graded relevance), so one wrapper serves
    them all. `module` is imported on first use (Triton is heavy and optional).
    """

    def impl(attr):
        mod = importlib.import_module(module, __package__)
        return getattr(mod, attr)

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, scores, *rest):
            *tensors, params = rest
            ctx.save_for_backward(scores, *tensors)
            ctx.params = params
            return impl(forward)(scores, *tensors, params)

        @staticmethod
        def backward(ctx, grad0, grad1):
            # not once_differentiable: its error node hangs off detached copies, which a
            # hessian never reaches, so it returned zeros instead of raising
            saved = ctx.saved_tensors
            grad = _fused_gradient(
                lambda: impl(backward)(grad0, grad1, *saved, ctx.params), name, backend, saved[0], grad0, grad1
            )
            return (grad,) + (None,) * len(saved)

    _Fn.__name__ = _Fn.__qualname__ = name
    return _Fn


_TorchRankSums = _python_backend(
    "_TorchRankSums", "torch", ".reference", "torch_rank_sums_forward", "torch_rank_sums_backward"
)
_TritonRankSums = _python_backend(
    "_TritonRankSums", "triton", ".triton_kernels.rank_sums", "forward", "backward"
)
_TorchGraded = _python_backend(
    "_TorchGraded", "torch", ".graded", "torch_graded_packed_forward", "torch_graded_packed_backward"
)
_TritonGraded = _python_backend(
    "_TritonGraded", "triton", ".triton_kernels.graded", "forward", "backward"
)
_TorchHistograms = _python_backend(
    "_TorchHistograms", "torch", "._hist", "torch_histograms_forward", "torch_histograms_backward"
)
_TritonHistograms = _python_backend(
    "_TritonHistograms", "triton", ".triton_kernels.histogram", "forward", "backward"
)


def _naive_graded(*args):
    from .graded import naive_graded_packed  # imported on use: fastrank.graded imports this module

    return naive_graded_packed(*args)


# per op: (naive function, torch Function, Triton Function, C++ forward op of torch.ops.fastrank)
_IMPLS = {
    "rank-sums": (reference.naive_rank_sums, _TorchRankSums, _TritonRankSums, "rank_sums_fwd"),
    "graded rank-sums": (_naive_graded, _TorchGraded, _TritonGraded, "graded_rank_sums_fwd"),
    "histogram": (_hist.naive_histograms, _TorchHistograms, _TritonHistograms, "histogram_fwd"),
}


def _dispatch(op: str, backend: str, *tensors, params) -> Tuple[Tensor, Tensor]:
    """Runs op on the named backend: every backend takes the same tensors (scores first), then
    the parameters (a dataclass for Python backends, its scalars for the C++ ops)."""
    naive, torch_fn, triton_fn, cpp_op = _IMPLS[op]
    if backend == "naive":
        return naive(*tensors, params)
    _refuse_transforms(f"the {op} op", backend, tensors[0])
    if backend == "torch":
        return torch_fn.apply(*tensors, params)
    if backend == "triton":
        return triton_fn.apply(*tensors, params)
    if backend in ("cpp", "cuda"):
        _register_cpp_ops()
        return getattr(torch.ops.fastrank, cpp_op)(*tensors, *params.as_op_args())
    raise NotImplementedError(f"backend {backend!r} has no {op} implementation yet")


def rank_sums_packed(
    backend: str,
    scores: Tensor,
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: StepParams,
) -> Tuple[Tensor, Tensor]:
    """(rank_all, rank_pos), each (Q, P), differentiable w.r.t. scores, on the named backend."""
    params.check_dtype(scores.dtype)
    return _dispatch("rank-sums", backend, scores, pos_idx, ignore_idx, ignore_mask, params=params)


def graded_rank_sums_packed(
    backend: str,
    scores: Tensor,
    relevance: Tensor,
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: StepParams,
) -> Tuple[Tensor, Tensor]:
    """Graded (rank_all, rank_pos), each (Q, P) at the ranked items pos_idx, differentiable w.r.t.
    scores (not relevance, a constant of the dtype of scores), on the named backend."""
    params.check_dtype(scores.dtype)
    return _dispatch("graded rank-sums", backend, scores, relevance, pos_idx, ignore_idx, ignore_mask, params=params)


def histograms_packed(
    backend: str,
    scores: Tensor,
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: "_hist.HistParams",
) -> Tuple[Tensor, Tensor]:
    """(h_all, h_pos), each (Q, bins), differentiable w.r.t. scores, on the named backend."""
    params.check_dtype(scores.dtype)
    return _dispatch("histogram", backend, scores, pos_idx, ignore_idx, ignore_mask, params=params)
