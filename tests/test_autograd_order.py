"""Higher-order and forward-mode autograd. The fused backends (torch, cpp, Triton; cuda shares
the cpp registration) compute first derivatives with a backward kernel that is not itself
differentiable and have no forward-mode formula: every higher-order or forward-mode entry point
must raise a RuntimeError that names the op and points to backend="naive" — never return zeros.
`naive` (autograd through the cube) computes them; a first derivative taken with create_graph=True
still works on the fused backends."""
import os

import pytest
import torch

import fastrank

from .conftest import AVAILABLE, FUSED_CPU

FUSED = FUSED_CPU + (["triton"] if "triton" in AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1" else [])

LABELS = torch.tensor([0, 0, 1, 1, 2, 0])
RELEVANCE = (LABELS.unsqueeze(1) == LABELS.unsqueeze(0)).double() * 2 + (LABELS.unsqueeze(1) % 2 == LABELS % 2).double()

# one loss per op family: rank sums (sigmoid and suprank), soft histograms, graded rank sums
OPS = {
    "smooth_ap": lambda s, b: fastrank.smooth_ap(s, (LABELS, LABELS), tau=0.1, backend=b),
    "sup_ap": lambda s, b: fastrank.sup_ap(s, (LABELS, LABELS), tau=0.1, backend=b),
    "fastap": lambda s, b: fastrank.histogram_ap(s, (LABELS, LABELS), backend=b),
    "h_ap": lambda s, b: fastrank.h_ap(s, RELEVANCE, step="sigmoid", tau=0.1, backend=b),
}


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(6, 6, generator=g, dtype=torch.float64)


def _weights():
    # a generic direction: plain sums of ranking gradients vanish (a rank only sees differences)
    return torch.linspace(-1, 1, 36, dtype=torch.float64).view(6, 6) ** 3


def _grad_of_grad(f, s):
    x = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    (gg,) = torch.autograd.grad((g * _weights()).sum(), x)
    return gg


ENTRIES = {
    "create_graph": _grad_of_grad,
    "hessian": lambda f, s: torch.autograd.functional.hessian(f, s),
    "hvp": lambda f, s: torch.autograd.functional.hvp(f, s, _weights())[1],
    "vhp": lambda f, s: torch.autograd.functional.vhp(f, s, _weights())[1],
    "func.jvp": lambda f, s: torch.func.jvp(f, (s,), (_weights(),))[1],
    "func.jacfwd": lambda f, s: torch.func.jacfwd(f)(s),
    "func.hessian": lambda f, s: torch.func.hessian(f)(s),
    # first order, but torch.func's autograd cannot run the fused ops' autograd.Function
    "func.grad": lambda f, s: torch.func.grad(f)(s),
    "func.jacrev": lambda f, s: torch.func.jacrev(f)(s),
}


def _forward_ad(f, s):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        return fwAD.unpack_dual(f(fwAD.make_dual(s, _weights()))).tangent


ENTRIES["forward_ad"] = _forward_ad


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_fused_backends_refuse_higher_order_forward_mode_and_func_transforms(backend, op, entry):
    def f(s):
        return OPS[op](s, backend)

    with pytest.raises(RuntimeError, match=r"(?s)fastrank.*backend='naive'"):
        ENTRIES[entry](f, _scores())


@pytest.mark.parametrize("op", sorted(OPS))
def test_naive_second_derivatives_match_finite_differences(op):
    # the hessian-vector product is the directional derivative of the gradient
    s, v, eps = _scores(1), _weights(), 1e-6

    def grad(x):
        x = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(OPS[op](x, "naive"), x)
        return g

    hv = torch.autograd.functional.hvp(lambda x: OPS[op](x, "naive"), s, v)[1]
    fd = (grad(s + eps * v) - grad(s - eps * v)) / (2 * eps)
    torch.testing.assert_close(hv, fd, rtol=1e-4, atol=1e-6)
    # grad of <grad, v> is H v as well (the hessian is symmetric)
    torch.testing.assert_close(_grad_of_grad(lambda x: OPS[op](x, "naive"), s), hv)
    jv = torch.func.jvp(lambda x: OPS[op](x, "naive"), (s,), (v,))[1]
    torch.testing.assert_close(jv, (grad(s) * v).sum())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op", sorted(OPS))
def test_first_derivative_with_create_graph_still_works(backend, op):
    # create_graph=True alone (e.g. a gradient penalty elsewhere in the model) is not refused:
    # only differentiating the fused backward's result again is
    s = _scores(2)
    x = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(OPS[op](x, backend), x, create_graph=True)
    y = s.clone().requires_grad_()
    (ref,) = torch.autograd.grad(OPS[op](y, "naive"), y)
    torch.testing.assert_close(g.detach(), ref, rtol=1e-9, atol=1e-12)
