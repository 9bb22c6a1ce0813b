"""torch.ops.fastrank.ranked_mean: reduction="mean" of the fused loss ops on `cpp` in one op.

The rule it replaces is fastrank.core.epilogue.reduce_values(values, count > 0, "mean"); that
function is the reference here, in fp64, and the public losses are compared with the naive
backend with it in place.
"""
import functools

import pytest
import torch

import fastrank
from fastrank.core.epilogue import reduce_values
from fastrank.core.registry import register_cpp_ops

from .cases import all_cases, assert_all_close, outputs_and_grad
from .conftest import requires

pytestmark = requires("cpp")

COUNTS = {
    "all_ranked": [3, 1, 2, 5, 1],
    "some_without": [0, 2, 0, 4, 1],
    "none_ranked": [0, 0, 0, 0, 0],
    "one_query": [2],
    "one_unranked": [0],
}


def _args(counts, dtype, grad=False):
    values = torch.rand(len(counts), generator=torch.Generator().manual_seed(len(counts)), dtype=dtype)
    return values.requires_grad_(grad), torch.tensor(counts, dtype=torch.int64)


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradient_equal_the_python_rule(counts, dtype):
    register_cpp_ops()
    values, count = _args(COUNTS[counts], dtype, grad=True)
    mean, n_ranked = torch.ops.fastrank.ranked_mean(values, count)
    assert mean.shape == () and mean.dtype == dtype and n_ranked.dtype == dtype
    assert n_ranked.item() == max(1, int((count > 0).sum()))
    (grad,) = torch.autograd.grad(mean * 3.0, values)
    ref_values = values.detach().double().requires_grad_()
    ref = reduce_values(ref_values, count > 0, "mean")
    (ref_grad,) = torch.autograd.grad(ref * 3.0, ref_values)
    # fp32: the op sums in double, the rule in float32; Q <= 5 terms in [0, 1)
    tol = 1e-15 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(mean.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=0)


def test_no_ranked_query_gives_zero_still_connected():
    values, count = _args([0, 0, 0], torch.float64, grad=True)
    values = values.detach().zero_().requires_grad_()
    mean = torch.ops.fastrank.ranked_mean(values, count)[0]
    assert mean.item() == 0.0 and mean.requires_grad
    (grad,) = torch.autograd.grad(mean, values)
    assert torch.equal(grad, torch.ones(3, dtype=torch.float64))


def test_nan_value_gives_nan():
    values, count = _args([1, 0, 2], torch.float32)
    values[1] = float("nan")
    assert torch.isnan(torch.ops.fastrank.ranked_mean(values, count)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("counts", ["some_without", "none_ranked"])
def test_opcheck(dtype, counts):
    register_cpp_ops()
    torch.library.opcheck(torch.ops.fastrank.ranked_mean.default, _args(COUNTS[counts], dtype, grad=True))


def test_gradcheck_and_second_derivative():
    values, count = _args(COUNTS["some_without"], torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda v: torch.ops.fastrank.ranked_mean(v, count)[0], (values,))
    # the mean is linear: its backward under create_graph is differentiable (w.r.t. the incoming
    # gradient) rather than a constant or an error
    assert torch.autograd.gradgradcheck(lambda v: torch.ops.fastrank.ranked_mean(v, count)[0], (values,))


@pytest.mark.parametrize(
    "values,count,err,match",
    [
        (torch.rand(2, 3), torch.ones(2, dtype=torch.int64), ValueError, "values must be 1-D"),
        (torch.rand(3).half(), torch.ones(3, dtype=torch.int64), TypeError, "values must be float32 or float64"),
        (torch.rand(3), torch.ones(4, dtype=torch.int64), ValueError, "count must be 1-D of length Q = 3"),
        (torch.rand(3), torch.ones(3, dtype=torch.int32), TypeError, "count must be int64"),
        (torch.rand(3), torch.ones(3, 1, dtype=torch.int64), ValueError, "count must be 1-D"),
    ],
)
def test_bad_arguments_are_named(values, count, err, match):
    with pytest.raises(err, match=match):
        torch.ops.fastrank.ranked_mean(values, count)


def test_fake_kernel_refuses_mixed_devices():
    register_cpp_ops()
    with pytest.raises(ValueError, match="one device"):
        torch.ops.fastrank.ranked_mean(torch.rand(3, device="meta"), torch.ones(3, dtype=torch.int64))


FNS = {
    "sup_ap": fastrank.sup_ap,
    "smooth_ap": fastrank.smooth_ap,
    "recall_at_k": functools.partial(fastrank.recall_at_k, ks=(1, 3)),
    "fastap": functools.partial(fastrank.histogram_ap, bins=10),
}


@pytest.mark.parametrize("name", FNS)
def test_public_mean_uses_the_op_and_equals_naive(name):
    fn = FNS[name]
    for case in all_cases():
        if case.scores.dtype != torch.float64:
            continue
        s = case.scores.detach().requires_grad_()
        loss = fn(s, case.target, ignore=case.ignore, backend="cpp")
        assert "RankedMean" in loss.grad_fn.name(), loss.grad_fn.name()
        got = outputs_and_grad(lambda x: fn(x, case.target, ignore=case.ignore, backend="cpp"), case.scores)
        ref = outputs_and_grad(lambda x: fn(x, case.target, ignore=case.ignore, backend="naive"), case.scores)
        assert_all_close(got, ref, 1e-12, 1e-12)
