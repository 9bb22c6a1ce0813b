"""The table of op families, and the autograd glue that runs any of them on any backend.

An op family (rank sums, graded rank sums, histograms) is one row of `FAMILIES`: its C++ op
pair, the shapes its fake kernels return, and where its Python backends live. Everything
else is written once, over the table:

* `cpp` / `cuda`: the C++ ops `torch.ops.fastrank.<family>_fwd/_bwd` (schemas in
  csrc/fastrank.cpp) get a fake (meta) kernel, so that `torch.compile` and
  `torch.library.opcheck` can trace them, and an autograd formula that calls the backward op.
* `torch` / `triton`: the family's `forward` / `backward` pair (fastrank/<family>/chunked.py,
  triton_kernels/<family>.py) wrapped in an autograd.Function.
* `naive`: the family's fastrank/<family>/naive.py `forward`, autograd through the cube.

The Python entries are named, not imported: this module is in the core layer, below the
family packages, and Triton (heavy, optional) is imported only when a call runs on it.

Only `naive` has higher-order and forward-mode derivatives: the other backends' gradient
is a fused backward kernel, which autograd cannot differentiate again. They raise (see
_fused_gradient, _refuse_transforms) rather than return the zeros autograd would make of it.
"""
from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD

from .extension import load_extension

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


# --------------------------------------------------------------------------- the table


def _packed_shape(tensors: Tuple[Any, ...], pos: int, args: Tuple[Any, ...]) -> Tuple[int, ...]:
    return tuple(tensors[pos].shape)  # (Q, P): one value per ranked item


def _bins_shape(tensors: Tuple[Any, ...], pos: int, args: Tuple[Any, ...]) -> Tuple[int, ...]:
    return (tensors[0].shape[0], int(args[0]))  # (Q, bins)


@dataclass(frozen=True)
class OpFamily:
    """One op family: the same anatomy for each (docs/design.md §2.1).

    `name` is also the C++ op prefix (torch.ops.fastrank.<name>_fwd / _bwd) and the Triton
    module (fastrank.triton_kernels.<name>); `package` holds the public functions, naive.py
    and chunked.py. Every backend takes `tensors` (scores first) then the parameters, and
    returns two outputs of `out_shape`; the backward takes the two output gradients first.
    """

    name: str
    label: str  # in messages ("the rank-sums op")
    package: str
    tensors: Tuple[str, ...]
    grads: Tuple[str, str]  # names of the backward op's gradient arguments
    out_shape: Callable[[Tuple[Any, ...], int, Tuple[Any, ...]], Tuple[int, ...]]
    triton_module: str

    @property
    def cpp_fwd(self) -> str:
        return f"{self.name}_fwd"

    @property
    def cpp_bwd(self) -> str:
        return f"{self.name}_bwd"

    @property
    def pos_idx_at(self) -> int:
        return self.tensors.index("pos_idx")


_PROBLEM = ("pos_idx", "ignore_idx", "ignore_mask")

FAMILIES: Dict[str, OpFamily] = {
    f.name: f
    for f in (
        OpFamily("rank_sums", "rank-sums", "fastrank.rank_sums", ("scores",) + _PROBLEM,
                 ("grad_rank_all", "grad_rank_pos"), _packed_shape, "fastrank.triton_kernels.rank_sums"),
        OpFamily("graded_rank_sums", "graded rank-sums", "fastrank.graded", ("scores", "relevance", "key") + _PROBLEM,
                 ("grad_rank_all", "grad_rank_pos"), _packed_shape, "fastrank.triton_kernels.graded"),
        OpFamily("histogram", "histogram", "fastrank.histogram", ("scores",) + _PROBLEM,
                 ("grad_h_all", "grad_h_pos"), _bins_shape, "fastrank.triton_kernels.histogram"),
    )
}


def entry(family: OpFamily, backend: str) -> Any:
    """The module holding `family`'s `backend` implementation (naive / torch / triton)."""
    if backend == "triton":
        return importlib.import_module(family.triton_module)
    return importlib.import_module(f"{family.package}.{'chunked' if backend == 'torch' else 'naive'}")


# --------------------------------------------------------------------------- C++ ops: fakes and autograd

_REGISTERED = False
_REGISTER_LOCK = threading.Lock()


# torch.compile runs it once while tracing (it cannot trace the lock); registering is idempotent
@torch.compiler.assume_constant_result
def register_cpp_ops() -> None:
    """Fake kernels and autograd for every family's C++ ops (once, after fastrank._C loaded).

    Thread-safe: the first calls of several threads wait on the lock, and the flag that
    lets later calls skip it is set only once every registration is in place (an op run
    before its autograd formula is registered silently returns no gradient)."""
    global _REGISTERED
    if _REGISTERED:
        return
    with _REGISTER_LOCK:
        if not _REGISTERED and load_extension() is None:
            for family in FAMILIES.values():
                _register_family(family)
            for loss in LOSS_OPS.values():
                _register_loss(loss)
            torch.library.register_fake("fastrank::ranked_mean")(_ranked_mean_fake)
            _REGISTERED = True


def _one_device(op: str, names: Tuple[str, ...], tensors: Tuple[Any, ...]) -> None:
    """The fake kernels run for meta tensors, also when only some arguments are meta (the
    dispatcher picks Meta over CPU): a mix would return an uninitialised tensor."""
    devices = {name: t.device for name, t in zip(names, tensors) if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"fastrank::{op}: every tensor argument must be on one device, got {listed}")


def _register_family(f: OpFamily) -> None:
    n = len(f.tensors)
    bwd_op = getattr(torch.ops.fastrank, f.cpp_bwd)

    def fwd_fake(*args):
        tensors, scalars = args[:n], args[n:]
        _one_device(f.cpp_fwd, f.tensors, tensors)
        out = tensors[0].new_empty(f.out_shape(tensors, f.pos_idx_at, scalars))
        return out, torch.empty_like(out)

    def bwd_fake(*args):
        _one_device(f.cpp_bwd, f.grads + f.tensors, args[: n + 2])
        return torch.empty_like(args[2])

    torch.library.register_fake(f"fastrank::{f.cpp_fwd}")(fwd_fake)
    torch.library.register_fake(f"fastrank::{f.cpp_bwd}")(bwd_fake)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n])
        ctx.step_args = inputs[n:]
        ctx.out_shape = output[0].shape

    def backward(ctx, grad0, grad1):
        # an unused output's gradient is zeros of its shape
        saved = ctx.saved_tensors
        grad0 = saved[0].new_zeros(ctx.out_shape) if grad0 is None else grad0
        grad1 = saved[0].new_zeros(ctx.out_shape) if grad1 is None else grad1
        backend = "cuda" if saved[0].is_cuda else "cpp"
        grad = _fused_gradient(
            lambda: bwd_op(grad0, grad1, *saved, *ctx.step_args), f"fastrank::{f.cpp_fwd}", backend,
            saved[0], grad0, grad1,
        )
        return (grad,) + (None,) * (n - 1 + len(ctx.step_args))

    torch.library.register_autograd(f"fastrank::{f.cpp_fwd}", backward, setup_context=setup_context)


# --------------------------------------------------------------------------- fused loss ops
#
# A fused loss op returns, per query, the loss's score, the number of ranked positives and,
# when asked (with_grad), the gradient rows d score_i / d scores[i, :], all from one pass per
# row (docs/design.md §2.4). Its autograd multiplies the rows by grad_output: query i's score
# depends on row i alone, so that is the exact vector-Jacobian product.


@dataclass(frozen=True)
class LossOp:
    """A fused loss op torch.ops.fastrank.<name>(scores, *tensors, *scalars, with_grad)."""

    name: str
    tensors: Tuple[str, ...]  # its (optional) tensor arguments, scores first
    #: the module of its fused Triton kernels (named, not imported: see the module docstring),
    #: used for backend="triton"; None: none (the two-pass Triton path)
    triton: Optional[str] = None


#: the module of the fused binary Triton loss kernels (AP, Recall@k)
TRITON_LOSS_MODULE = "fastrank.triton_kernels.loss"

LOSS_OPS: Dict[str, LossOp] = {
    op.name: op
    for op in (
        LossOp("ap_loss", ("scores", "query_labels", "gallery_labels", "relevance", "ignore_idx", "ignore_mask"),
               triton=TRITON_LOSS_MODULE),
        LossOp("recall_loss", ("scores", "query_labels", "gallery_labels", "relevance", "ignore_idx", "ignore_mask"),
               triton=TRITON_LOSS_MODULE),
        LossOp("graded_loss", ("scores", "relevance", "key", "ignore_idx", "ignore_mask"),
               triton="fastrank.triton_kernels.graded_loss"),
        LossOp("histogram_ap_loss",
               ("scores", "query_labels", "gallery_labels", "relevance", "ignore_idx", "ignore_mask"),
               triton="fastrank.triton_kernels.histogram_loss"),
    )
}


def _register_loss(op: LossOp) -> None:
    n = len(op.tensors)

    def fake(*args):
        tensors, with_grad = args[:n], args[-1]
        _one_device(op.name, op.tensors, tensors)
        q, m = tensors[0].shape
        return (tensors[0].new_empty(q), tensors[0].new_empty(q, dtype=torch.int64),
                tensors[0].new_empty((q if with_grad else 0, m)))

    torch.library.register_fake(f"fastrank::{op.name}")(fake)
    # its autograd (grad_output[:, None] * the gradient rows) is a C++ kernel: csrc/loss_autograd.cpp


def _ranked_mean_fake(values: Tensor, count: Tensor) -> Tuple[Tensor, Tensor]:
    # its autograd is a C++ kernel (csrc/ranked_mean.cpp), as the loss ops'
    _one_device("ranked_mean", ("values", "count"), (values, count))
    return values.new_empty(()), values.new_empty(())


def run_loss(name: str, fn: str, backend: str, scores: Tensor, *tensors: Optional[Tensor], params,
             options: Tuple = ()) -> Tuple[Tensor, Tensor]:
    """(per-query score (Q,), ranked positives per query (Q,) int64) of a fused loss op,
    differentiable w.r.t. scores; the gradient rows are computed only when scores require grad.
    `options` are the loss's own scalars, passed after the parameters' (params.as_op_args()).
    The op checks the values of its inputs (check_call(fused=True) left them to it); its errors
    are re-raised with the public function's name `fn` in front.

    backend="triton": the op's fused Triton kernels (LOSS_OPS[name].triton), which check the
    values inside the kernels (an invalid entry makes its query NaN) and never sync the host."""
    params.check_dtype(scores.dtype)
    _refuse_transforms(f"the {name} op", backend, scores)
    if backend == "triton":
        kernels = importlib.import_module(LOSS_OPS[name].triton)
        try:
            return kernels.run_loss(name, scores, *tensors, params=params, options=options)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{fn}: {e}") from None
    op = getattr(torch.ops.fastrank, LOSS_OPS[name].name)
    register_cpp_ops()
    args = (scores, *tensors, *params.as_op_args(), *options, torch.is_grad_enabled() and scores.requires_grad)
    if torch.compiler.is_compiling():  # the fake kernel checks nothing; the kernel raises at run time
        value, count, _ = op(*args)
        return value, count
    try:
        value, count, _ = op(*args)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{fn}: {e}") from None
    return value, count


# --------------------------------------------------------------------------- Python backends


def _python_function(family: OpFamily, backend: str) -> type:
    """An autograd.Function over a Python backend's (forward, backward) pair.

    Every Python backend implements the same two functions — forward(scores, *tensors,
    params) -> 2 outputs, backward(grad0, grad1, scores, *tensors, params) -> grad of
    scores — so one wrapper serves them all."""
    name = f"_{backend.capitalize()}{''.join(w.capitalize() for w in family.name.split('_'))}"

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, scores, *rest):
            *tensors, params = rest
            ctx.save_for_backward(scores, *tensors)
            ctx.params = params
            return entry(family, backend).forward(scores, *tensors, params)

        @staticmethod
        def backward(ctx, grad0, grad1):
            # not once_differentiable: its error node hangs off detached copies, which a
            # hessian never reaches, so it returned zeros instead of raising
            saved = ctx.saved_tensors
            grad = _fused_gradient(
                lambda: entry(family, backend).backward(grad0, grad1, *saved, ctx.params), name, backend,
                saved[0], grad0, grad1,
            )
            return (grad,) + (None,) * len(saved)

    _Fn.__name__ = _Fn.__qualname__ = name
    return _Fn


_FUNCTIONS = {(f.name, b): _python_function(f, b) for f in FAMILIES.values() for b in ("torch", "triton")}


# --------------------------------------------------------------------------- dispatch


def run(family: str, backend: str, *tensors: Optional[Tensor], params) -> Tuple[Tensor, Tensor]:
    """Runs an op family on the named backend: every backend takes the same tensors (scores
    first), then the parameters (the dataclass for Python backends, its scalars for the C++ ops)."""
    f = FAMILIES[family]
    params.check_dtype(tensors[0].dtype)
    if backend == "naive":
        return entry(f, backend).forward(*tensors, params)
    _refuse_transforms(f"the {f.label} op", backend, tensors[0])
    if backend in ("torch", "triton"):
        return _FUNCTIONS[(f.name, backend)].apply(*tensors, params)
    if backend in ("cpp", "cuda"):
        register_cpp_ops()
        return getattr(torch.ops.fastrank, f.cpp_fwd)(*tensors, *params.as_op_args())
    raise NotImplementedError(f"backend {backend!r} has no {f.label} implementation yet")
