"""The fused histogram AP op (torch.ops.fastrank.histogram_ap_loss): FastAP and SoftBin in one pass
per query row, no packing in Python.

On `cpp`, histogram_ap runs as one fused op per call (the AP and its gradient rows in one pass);
FASTRANK_FUSED=0 keeps the two-pass path (histogram_fwd, the PyTorch epilogue, histogram_bwd).
Both are compared with the naive backend, the fp64 oracle.
"""
import pytest
import torch

import fastrank
from fastrank.histogram import KIND_IDS, histogram_params
from fastrank.core.problem import ignore_args, target_args
from fastrank.core.registry import register_cpp_ops

from .cases import Case, all_cases, assert_all_close, make_case, outputs_and_grad
from .conftest import requires
from .nan_rows import POISONED, nan_problem

pytestmark = requires("cpp")

KINDS = ("fastap", "softbin")

#: scores beyond the range (SoftBin: into the open end bins; FastAP: mass lost), +-inf, bin centres
_OUTSIDE = Case("outside", torch.tensor(
    [[3.0, -2.0, 0.5, 0.5, 0.2, 1.04, -1.04, 1.2],
     [0.1, 0.1, float("inf"), 0.1, float("-inf"), 0.97, 1.0, 0.0],
     [0.9, 0.8, 0.7, 0.6, 0.5, -0.9, -1.0, 1.01],
     [0.75, 0.5, 0.25, 0.0, -0.25, -0.5, 1.0, -1.0]], dtype=torch.float64),
    torch.tensor([[1, 0, 1, 0, 0, 1, 0, 1], [1, 1, 0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1, 1, 1],
                  [1, 0, 0, 1, 0, 1, 1, 0]]), None)

#: (kind, bins, range) away from the defaults: coarse and fine bins, ranges the scores overshoot
VARIANTS = [("fastap", 3, (0.0, 1.0)), ("fastap", 17, (0.0, 1.0)), ("softbin", 2, (0.0, 1.0)),
            ("softbin", 20, (-1.0, 1.0)), ("softbin", 7, (-0.3, 0.5)), ("softbin", 40, (0.2, 0.4))]


def _value_and_grad(case, backend, kind, bins=None, rng=(0.0, 1.0), reduction="none"):
    return outputs_and_grad(
        lambda s: fastrank.histogram_ap(s, case.target, kind=kind, bins=bins, range=rng, ignore=case.ignore,
                                        backend=backend, reduction=reduction), case.scores)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", all_cases(), ids=repr)
def test_fused_equals_naive(kind, case):
    assert_all_close(_value_and_grad(case, "cpp", kind), _value_and_grad(case, "naive", kind), rtol=1e-12,
                     atol=1e-12)


_VARIANT_CASES = [_OUTSIDE, make_case(17, 43, 4, "labels", "mask", ties=True, seed=5),
                  make_case(11, 29, 3, "float", "index", seed=6)]


@pytest.mark.parametrize("kind,bins,rng", VARIANTS, ids=lambda v: repr(v))
@pytest.mark.parametrize("case", _VARIANT_CASES, ids=repr)
def test_fused_equals_naive_bins_and_ranges(kind, bins, rng, case):
    got = _value_and_grad(case, "cpp", kind, bins, rng)
    assert_all_close(got, _value_and_grad(case, "naive", kind, bins, rng), rtol=1e-12, atol=1e-12)
    assert (got[-1][torch.isinf(case.scores)] == 0).all()  # +-inf: beyond the ends, no gradient


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_equals_the_two_pass_path(kind, reduction, monkeypatch):
    for case in all_cases()[::5] + [_OUTSIDE]:
        fused = _value_and_grad(case, "cpp", kind, reduction=reduction)
        monkeypatch.setenv("FASTRANK_FUSED", "0")
        two_pass = _value_and_grad(case, "cpp", kind, reduction=reduction)
        monkeypatch.delenv("FASTRANK_FUSED")
        assert_all_close(fused, two_pass, rtol=1e-12, atol=1e-12)


def test_the_switch_selects_the_path(monkeypatch):
    # the fused path never packs the problem; the two-pass path does (build_problem)
    import fastrank.histogram as hist_mod

    calls = []
    real = hist_mod.build_problem
    monkeypatch.setattr(hist_mod, "build_problem", lambda *a: calls.append(1) or real(*a))
    case = all_cases()[10]
    for kind in KINDS:
        fastrank.histogram_ap(case.scores, case.target, kind=kind, ignore=case.ignore, backend="cpp")
    assert calls == []
    monkeypatch.setenv("FASTRANK_FUSED", "0")
    for kind in KINDS:
        fastrank.histogram_ap(case.scores, case.target, kind=kind, ignore=case.ignore, backend="cpp")
    assert calls == [1, 1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ignore", [None, torch.tensor([0, -1, 3, 8, 4])], ids=["none", "index"])
def test_gradcheck(kind, ignore):
    # scores on a grid that keeps every bin coordinate away from integers (the kinks)
    g = torch.Generator().manual_seed(1)
    s = (torch.randperm(5 * 9, generator=g).to(torch.float64) * 0.0173 + 0.013).view(5, 9) % 1.0
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1, 2])

    def f(x):
        return fastrank.histogram_ap(x, (labels[:5], labels), kind=kind, bins=6, ignore=ignore, backend="cpp",
                                     reduction="none")

    assert torch.autograd.gradcheck(f, (s.requires_grad_(),), eps=1e-7, atol=1e-6, rtol=1e-5)


def _args(case, kind, bins=None, rng=(0.0, 1.0)):
    p = histogram_params(kind, bins or {"fastap": 10, "softbin": 25}[kind], rng)
    return (case.scores, *target_args(case.target), *ignore_args(case.ignore)) + p.as_op_args() + (KIND_IDS[kind],)


@pytest.mark.parametrize("kind", KINDS)
def test_no_gradient_rows_without_grad(kind):
    register_cpp_ops()
    case = all_cases()[12]
    ap, n_pos, rows = torch.ops.fastrank.histogram_ap_loss(*_args(case, kind), False)
    assert rows.shape == (0, case.scores.shape[1])
    ap2, n_pos2, rows2 = torch.ops.fastrank.histogram_ap_loss(*_args(case, kind), True)
    assert rows2.shape == case.scores.shape
    assert torch.equal(ap, ap2) and torch.equal(n_pos, n_pos2)


def test_backward_without_gradient_rows_raises():
    register_cpp_ops()
    case = all_cases()[12]
    args = list(_args(case, "fastap"))
    args[0] = case.scores.clone().requires_grad_()
    ap, _, _ = torch.ops.fastrank.histogram_ap_loss(*args, False)
    with pytest.raises(RuntimeError, match="with_grad=False"):
        ap.sum().backward()


def test_second_derivative_is_refused():
    case = all_cases()[12]
    s = case.scores.clone().requires_grad_()
    v = fastrank.histogram_ap(s, case.target, ignore=case.ignore, backend="cpp")
    (g,) = torch.autograd.grad(v, s, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        g.sum().backward()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_nan_in_nan_out(kind, ignore_kind):
    s, target, ignore = nan_problem(ignore_kind)
    x = s.clone().requires_grad_()
    v = fastrank.histogram_ap(x, target, kind=kind, range=(-1.0, 1.0), ignore=ignore, backend="cpp",
                              reduction="none")
    assert torch.equal(torch.isnan(v), POISONED)
    ref = fastrank.histogram_ap(s, target, kind=kind, range=(-1.0, 1.0), ignore=ignore, backend="naive",
                                reduction="none")
    torch.testing.assert_close(v[~POISONED], ref[~POISONED], rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(v.sum(), x)
    assert torch.isfinite(g[~POISONED]).all()  # row i's gradient comes from query i alone
    assert torch.isnan(g[0]).any()  # query 0 has positives: its NaN reaches its gradient
    assert torch.isnan(fastrank.histogram_ap(s, target, kind=kind, ignore=ignore, backend="cpp")).item()


def _op_args(target_kind, ignore_kind, dtype, kind, with_grad):
    case = next(c for c in all_cases() if c.scores.shape == (16, 33))
    s = case.scores.to(dtype)
    qlab, glab = case.target if isinstance(case.target, tuple) else (torch.arange(16) % 5, torch.arange(33) % 5)
    target = (qlab, glab, None) if target_kind == "labels" else (None, None, qlab.unsqueeze(1) == glab.unsqueeze(0))
    ignore = {"none": (None, None), "index": (torch.arange(16), None),
              "mask": (None, torch.rand(16, 33, generator=torch.Generator().manual_seed(1)) < 0.3)}[ignore_kind]
    p = histogram_params(kind, 10, (-1.0, 1.0))
    return (s.requires_grad_(), *target, *ignore) + p.as_op_args() + (KIND_IDS[kind], with_grad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target_kind", ["labels", "relevance"])
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_histogram_ap_loss(kind, target_kind, ignore_kind, dtype):
    register_cpp_ops()
    op = torch.ops.fastrank.histogram_ap_loss.default
    torch.library.opcheck(op, _op_args(target_kind, ignore_kind, dtype, kind, True))
    torch.library.opcheck(op, _op_args(target_kind, ignore_kind, dtype, kind, False),
                          test_utils=("test_schema", "test_faketensor"))


def _direct(bins=11, scale=-5.0, shift=5.0, kind=0, **over):
    register_cpp_ops()
    s = torch.rand(4, 6, dtype=torch.float64)
    kw = dict(scores=s, query_labels=torch.arange(4), gallery_labels=torch.arange(6) % 3, relevance=None,
              ignore_idx=None, ignore_mask=None)
    kw.update(over)
    return torch.ops.fastrank.histogram_ap_loss(*kw.values(), bins, scale, shift, False, kind, True)


@pytest.mark.parametrize("over,err,msg", [
    (dict(bins=1), ValueError, r"bins must lie in \[2, "),
    (dict(bins=0), ValueError, r"bins must lie in \[2, "),
    (dict(scale=0.0), ValueError, "scale must be non-zero and finite"),
    (dict(scale=float("inf")), ValueError, "scale must be non-zero and finite"),
    (dict(shift=float("nan")), ValueError, "shift must be finite"),
    (dict(kind=2), ValueError, r"kind must be 0 \(fastap\) or 1 \(softbin\), got 2"),
    (dict(relevance=torch.ones(4, 6)), ValueError, "either query_labels and gallery_labels, or relevance"),
    (dict(gallery_labels=None), ValueError, "either query_labels"),
    (dict(query_labels=torch.arange(5)), ValueError, r"query_labels must have shape \(4,\)"),
    (dict(gallery_labels=torch.rand(6)), TypeError, "gallery_labels must be an integer tensor"),
    (dict(query_labels=None, gallery_labels=None, relevance=torch.ones(4, 5)), ValueError,
     "relevance must have the shape of scores"),
    (dict(ignore_idx=torch.tensor([0, 1, 9, 0])), ValueError, r"ignore_idx entries must lie in \[-1, N\)"),
    (dict(ignore_mask=torch.ones(4, 5, dtype=torch.bool)), ValueError, "ignore_mask must be a bool tensor"),
    (dict(scores=torch.rand(4, 6).to(torch.float16)), TypeError, "scores must be float32 or float64"),
    (dict(scores=torch.rand(24)), ValueError, "scores must be 2-D"),
])
def test_direct_calls_are_checked(over, err, msg):
    with pytest.raises(err, match=msg) as info:
        _direct(**over)
    assert "histogram_ap_loss" in str(info.value)
