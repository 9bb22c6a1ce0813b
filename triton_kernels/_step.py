"""Step functions of docs/design.md §1.1 as Triton device helpers (the Triton twin of csrc/step.h).

Conventions, as in csrc/step.h: d = s_ik - s_ij (competitor minus ranked item),
x = d / tau clamped to [-CLAMP, CLAMP] before exp, as the references do.
Every helper works elementwise on tensors of the accumulation dtype (float32, or
float64 for float64 scores); the step parameters arrive as scalars of that dtype
(loaded from a small device tensor: Triton passes Python floats as float32, which
would cost float64 inputs their precision).

Equal scores tie, infinities included (fastrank.core.step.score_diff): a NaN difference d is
taken as 0 by `step_neg` and `heaviside` and carries no gradient in `step_neg_grad`. inf - inf
is the only NaN the kernels act on: a NaN score's row is made NaN explicitly by the kernels.

HAPPIER's smoothed H-rank (`hrank_plus`, `hrank_plus_grad`; graded family only) takes its
(beta, gamma, leak) from the same kind of tensor, at an offset of the kernel's choosing
(`load_hrank_params`).

FAST (a constexpr, float32 on a GPU only; never under TRITON_INTERPRET=1, which
cannot run inline PTX): sigma through one `tanh.approx.f32`, and the reciprocal
of the derivative through `div.approx.f32`. Max abs error of sigma ~2.5e-4.
"""
from __future__ import annotations

import triton
import triton.language as tl

#: the references clamp -d/tau to [-50, 50] before exp (fastrank.core.params.CLAMP, csrc/step.h kClamp)
CLAMP: tl.constexpr = tl.constexpr(50.0)


@triton.jit
def load_step_params(params_ptr):
    """(1/tau, rho, delta, start, offset) from the (5,) params tensor, as scalars of its dtype
    (the accumulation dtype). Once per program: a device-function call costs the interpreter
    about a millisecond, so never call it inside a loop."""
    inv_tau = tl.load(params_ptr + 0)
    rho = tl.load(params_ptr + 1)
    delta = tl.load(params_ptr + 2)
    start = tl.load(params_ptr + 3)
    offset = tl.load(params_ptr + 4)
    return inv_tau, rho, delta, start, offset


@triton.jit
def load_hrank_params(hrank_ptr):
    """(beta, gamma, leak) of the smoothed H-rank from hrank_ptr[0:3], as scalars of its dtype;
    once per program, as `load_step_params`. The kernels point it into their params tensor
    (two-pass graded.py: params_ptr + 5; fused graded_loss.py: params_ptr + 8)."""
    beta = tl.load(hrank_ptr + 0)
    gamma = tl.load(hrank_ptr + 1)
    leak = tl.load(hrank_ptr + 2)
    return beta, gamma, leak


@triton.jit
def _tanh_approx(x):
    """tanh via the special-function unit: one MUFU op (PTX tanh.approx.f32, sm_75+)."""
    return tl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def step_neg(d, inv_tau, rho, delta, start, offset, STEP: tl.constexpr, FAST: tl.constexpr):
    """The step g every valid competitor gets in the sweep.

    STEP 0: sigma_tau(d) = 1 / (1 + exp(-x)), x = d / tau clamped to [-50, 50].
    STEP 1: H^-(d) = sigma_tau(d) for d <= 0, start + sigma_tau(d) on (0, delta],
            rho * (d - delta) + offset beyond.
    (One flat helper rather than nested ones: every device-function call costs the
    interpreter a re-patch of triton.language, about a millisecond.)
    A NaN d (two equal infinite scores, the ranked item's own term at +-inf) is a tie: d = 0.
    """
    d = tl.where(d == d, d, 0.0)
    x = tl.minimum(tl.maximum(d * inv_tau, -CLAMP), CLAMP)
    if FAST:
        # sigma(x) = (1 + tanh(x / 2)) / 2: one special-function op instead of exp + reciprocal
        sig = 0.5 + 0.5 * _tanh_approx(0.5 * x)
    else:
        sig = 1.0 / (1.0 + tl.exp(-x))
    if STEP == 1:
        # rho = 0: the constant offset, also at d = +inf (0 * inf is NaN)
        lin = tl.where(rho == 0.0, 0.0, rho * (d - delta)) + offset
        sig = tl.where(d <= 0.0, sig, tl.where(d <= delta, start + sig, lin))
    return sig


@triton.jit
def step_neg_grad(d, inv_tau, rho, delta, STEP: tl.constexpr, FAST: tl.constexpr):
    """g'(d) of `step_neg`.

    sigma_tau'(d) = e * sigma^2 / tau with e = exp(-x), zero outside the clamp (e * sigma^2
    stays accurate in both tails, where sigma * (1 - sigma) would cancel); H^-' = rho on
    the linear branch d > delta, sigma_tau' elsewhere.
    """
    xr = d * inv_tau
    x = tl.minimum(tl.maximum(xr, -CLAMP), CLAMP)
    e = tl.exp(-x)
    if FAST:
        r = tl.math.fdiv(1.0, 1.0 + e, approx=True)
    else:
        r = 1.0 / (1.0 + e)
    g = tl.where((xr > CLAMP) | (xr < -CLAMP), 0.0, e * r * r * inv_tau)
    if STEP == 1:
        g = tl.where(d > delta, rho, g)
    # a tie of two infinities (d NaN) is a constant
    return tl.where(d == d, g, 0.0)


@triton.jit
def sigmoid_tau(d, inv_tau, FAST: tl.constexpr):
    """sigma_tau(d), x = d / tau clamped to [-50, 50]."""
    return step_neg(d, inv_tau, 0.0, 0.0, 0.0, 0.0, 0, FAST)


@triton.jit
def sigmoid_tau_grad(d, inv_tau, FAST: tl.constexpr):
    """d sigma_tau / d d, zero outside the clamp."""
    return step_neg_grad(d, inv_tau, 0.0, 0.0, 0, FAST)


@triton.jit
def suprank_neg(d, inv_tau, rho, delta, start, offset, FAST: tl.constexpr):
    """H^-(d), the SupRank upper bound for competitors less relevant than the ranked item."""
    return step_neg(d, inv_tau, rho, delta, start, offset, 1, FAST)


@triton.jit
def suprank_neg_grad(d, inv_tau, rho, delta, FAST: tl.constexpr):
    """d H^- / d d: rho on the linear branch (d > delta), sigma_tau' elsewhere."""
    return step_neg_grad(d, inv_tau, rho, delta, 1, FAST)


@triton.jit
def heaviside(d):
    """H(d) with H(0) = 1 (no gradient), in the dtype of d; a NaN d (equal infinities) ties: 1."""
    return tl.where((d >= 0.0) | (d != d), 1.0, 0.0).to(d.dtype)


@triton.jit
def hrank_plus(d, beta, gamma, leak):
    """HAPPIER's h+(d), counted in rank_pos instead of H(d) for a competitor whose ordering key is
    above the ranked item's (csrc/step.h hrank_plus): leak * d for d <= 0; for d > 0, 1 when
    gamma > 1, else min(beta * d + gamma, 1).
    A zero leak or beta drops its product: 0 * inf is NaN, and a constant it must stay.
    A NaN d (equal infinities) is a tie: d = 0, so h+ = 0."""
    d = tl.where(d == d, d, 0.0)
    below = tl.where(leak == 0.0, 0.0, leak * d)
    lin = tl.where(beta == 0.0, 0.0, beta * d) + gamma
    above = tl.where(gamma > 1.0, 1.0, tl.minimum(lin, 1.0))
    return tl.where(d <= 0.0, below, above)


@triton.jit
def hrank_plus_grad(d, beta, gamma, leak):
    """h+'(d) of `hrank_plus`: leak on d <= 0; for d > 0, 0 when gamma > 1, else beta while
    beta * d + gamma <= 1 (torch.clamp's backward passes the slope at equality, as HAPPIER's
    autograd and csrc/step.h do) and 0 where the min holds it at 1. A tie of two infinities
    (d NaN) is a constant: 0."""
    lin = tl.where(beta == 0.0, 0.0, beta * d) + gamma
    above = tl.where(gamma > 1.0, 0.0, tl.where(lin <= 1.0, beta, 0.0))
    g = tl.where(d <= 0.0, leak, above)
    return tl.where(d == d, g, 0.0)
