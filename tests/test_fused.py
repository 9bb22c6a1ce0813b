"""The fused loss ops of the rank-sums family (torch.ops.fastrank.ap_loss, recall_loss): one
pass per query row, no packing in Python.

On `cpp` the public AP and Recall@k functions run as one fused op per call (the score and its
gradient rows in one pass); FASTRANK_FUSED=0 keeps the two-pass path (the rank-sums op plus
the PyTorch epilogue). Both are compared with the naive backend, the fp64 oracle.
"""
import functools
import os

import pytest
import torch

import fastrank
from fastrank.core.params import StepParams
from fastrank.core.problem import ignore_args, target_args
from fastrank.core.registry import register_cpp_ops

from .cases import all_cases, assert_all_close, outputs_and_grad
from .conftest import requires
from .nan_rows import POISONED, nan_problem

pytestmark = requires("cpp")

FNS = {
    "smooth_ap": fastrank.smooth_ap,
    "sup_ap": fastrank.sup_ap,
    # ks past the gallery (min(|P|, k)), a temp that makes the sigmoid around k steep
    "recall_suprank": functools.partial(fastrank.recall_at_k, ks=(1, 3, 40), temp=0.5),
    "recall_patel": functools.partial(fastrank.recall_at_k, ks=(1, 2, 8), variant="patel"),
    "recall_patel_suprank_step": functools.partial(fastrank.recall_at_k, ks=(2, 5), variant="patel", step="suprank"),
}


def _value_and_grad(fn, case, backend, reduction="none"):
    return outputs_and_grad(lambda s: fn(s, case.target, ignore=case.ignore, backend=backend, reduction=reduction),
                            case.scores)


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("case", all_cases(), ids=repr)
def test_fused_equals_naive(name, case):
    fn = FNS[name]
    assert_all_close(_value_and_grad(fn, case, "cpp"), _value_and_grad(fn, case, "naive"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_equals_the_two_pass_path(name, reduction, monkeypatch):
    fn = FNS[name]
    for case in all_cases()[::5]:
        fused = _value_and_grad(fn, case, "cpp", reduction)
        monkeypatch.setenv("FASTRANK_FUSED", "0")
        two_pass = _value_and_grad(fn, case, "cpp", reduction)
        monkeypatch.delenv("FASTRANK_FUSED")
        assert_all_close(fused, two_pass, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module,fn", [("ap", fastrank.sup_ap), ("recall", fastrank.recall_at_k)])
def test_the_switch_selects_the_path(module, fn, monkeypatch):
    # the fused path never packs the problem; the two-pass path does (build_problem)
    import importlib

    mod = importlib.import_module(f"fastrank.{module}")
    calls = []
    real = mod.build_problem
    monkeypatch.setattr(mod, "build_problem", lambda *a: calls.append(1) or real(*a))
    case = all_cases()[10]
    fn(case.scores, case.target, ignore=case.ignore, backend="cpp")
    assert calls == []
    monkeypatch.setenv("FASTRANK_FUSED", "0")
    fn(case.scores, case.target, ignore=case.ignore, backend="cpp")
    assert calls == [1]


@pytest.mark.parametrize("name", FNS)
def test_gradcheck(name):
    case = all_cases()[13]
    s = case.scores.clone().requires_grad_()
    fn = FNS[name]
    # the sigmoid's scale (tau) sets the finite-difference step that stays in its linear range
    kw = {"tau": 0.5}
    if name.startswith("recall"):
        kw["temp"] = 2.0  # the sigmoid around k: smooth on the finite-difference scale too
    assert torch.autograd.gradcheck(
        lambda x: fn(x, case.target, ignore=case.ignore, backend="cpp", reduction="none", **kw), (s,),
        eps=1e-6, atol=1e-7)


def test_no_gradient_rows_without_grad():
    # with scores not requiring grad (or under no_grad) the op skips the gradient rows
    register_cpp_ops()
    case = all_cases()[12]
    args = (case.scores, *target_args(case.target), *ignore_args(case.ignore)) + StepParams(step=1).as_op_args()
    ap, n_pos, rows = torch.ops.fastrank.ap_loss(*args, False)
    assert rows.shape == (0, case.scores.shape[1])
    ap2, n_pos2, rows2 = torch.ops.fastrank.ap_loss(*args, True)
    assert rows2.shape == case.scores.shape
    # with_grad=True keeps the step derivatives from the forward sweep (a different loop, so
    # the compiler may vectorise its sum in another order): the values agree to rounding only
    eps = torch.finfo(ap.dtype).eps
    torch.testing.assert_close(ap, ap2, rtol=16 * eps, atol=0)
    assert torch.equal(n_pos, n_pos2)


def test_backward_without_gradient_rows_raises():
    register_cpp_ops()
    case = all_cases()[12]
    s = case.scores.clone().requires_grad_()
    args = (s, *target_args(case.target), *ignore_args(case.ignore)) + StepParams(step=1).as_op_args()
    ap, _, _ = torch.ops.fastrank.ap_loss(*args, False)
    with pytest.raises(RuntimeError, match="with_grad=False"):
        ap.sum().backward()


def test_second_derivative_is_refused():
    case = all_cases()[12]
    s = case.scores.clone().requires_grad_()
    v = fastrank.sup_ap(s, case.target, ignore=case.ignore, backend="cpp")
    (g,) = torch.autograd.grad(v, s, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        g.sum().backward()


@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_nan_in_nan_out(ignore_kind):
    s, target, ignore = nan_problem(ignore_kind)
    for fn in FNS.values():
        x = s.clone().requires_grad_()
        v = fn(x, target, ignore=ignore, backend="cpp", reduction="none")
        assert torch.equal(torch.isnan(v), POISONED)
        ref = fn(s, target, ignore=ignore, backend="naive", reduction="none")
        torch.testing.assert_close(v[~POISONED], ref[~POISONED], rtol=1e-12, atol=1e-12)
        (g,) = torch.autograd.grad(v.sum(), x)
        assert torch.isfinite(g[~POISONED]).all()  # row i's gradient comes from query i alone
        assert torch.isnan(g[0]).any()  # query 0 has positives: its NaN reaches its gradient
        assert torch.isnan(fn(s, target, ignore=ignore, backend="cpp")).item()


def _op_args(kind, ignore_kind, dtype, with_grad):
    case = next(c for c in all_cases() if c.scores.shape == (16, 33))
    s = case.scores.to(dtype)
    qlab, glab = case.target if isinstance(case.target, tuple) else (torch.arange(16) % 5, torch.arange(33) % 5)
    target = (qlab, glab, None) if kind == "labels" else (None, None, qlab.unsqueeze(1) == glab.unsqueeze(0))
    ignore = {"none": (None, None), "index": (torch.arange(16), None),
              "mask": (None, torch.rand(16, 33, generator=torch.Generator().manual_seed(1)) < 0.3)}[ignore_kind]
    return (s.requires_grad_(), *target, *ignore) + StepParams(step=1).as_op_args() + (with_grad,)


@pytest.mark.parametrize("kind", ["labels", "relevance"])
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_ap_loss(kind, ignore_kind, dtype):
    register_cpp_ops()
    torch.library.opcheck(torch.ops.fastrank.ap_loss.default, _op_args(kind, ignore_kind, dtype, True))
    torch.library.opcheck(torch.ops.fastrank.ap_loss.default, _op_args(kind, ignore_kind, dtype, False),
                          test_utils=("test_schema", "test_faketensor"))


@requires("cpp")
@pytest.mark.parametrize("keep", [True, False])
def test_kept_gradient_rows_are_not_scaled_by_backward(keep):
    """Backward scales the rows in place (no second (Q, N) tensor) only when nobody kept the
    op's third output: a caller who did must find it as the op returned it."""
    register_cpp_ops()
    args = _op_args("labels", "none", torch.float64, True)
    value, _, rows = torch.ops.fastrank.ap_loss(*args)
    before = rows.clone()
    assert not rows.requires_grad
    if not keep:
        del rows
    weights = torch.linspace(-2.0, 3.0, value.shape[0], dtype=value.dtype)  # negative weights flip signs
    (value * weights).sum().backward()
    torch.testing.assert_close(args[0].grad, weights[:, None] * before, rtol=0, atol=0)
    if keep:
        assert torch.equal(rows, before)


def _direct(**over):
    register_cpp_ops()
    s = torch.rand(4, 6, dtype=torch.float64)
    kw = dict(scores=s, query_labels=torch.arange(4), gallery_labels=torch.arange(6) % 3, relevance=None,
              ignore_idx=None, ignore_mask=None)
    kw.update(over)
    return torch.ops.fastrank.ap_loss(*kw.values(), 1, 0.01, 100.0, 0.05, 0.5, 1.5, True)


@pytest.mark.parametrize("over,err,msg", [
    (dict(relevance=torch.ones(4, 6)), ValueError, "either query_labels and gallery_labels, or relevance"),
    (dict(query_labels=None, gallery_labels=None), ValueError, "either query_labels"),
    (dict(gallery_labels=None), ValueError, "either query_labels"),
    (dict(query_labels=torch.arange(5)), ValueError, r"query_labels must have shape \(4,\)"),
    (dict(gallery_labels=torch.rand(6)), TypeError, "gallery_labels must be an integer tensor"),
    (dict(query_labels=None, gallery_labels=None, relevance=torch.full((4, 6), float("nan"))), ValueError,
     "relevance contains NaN"),
    (dict(query_labels=None, gallery_labels=None, relevance=torch.ones(4, 5)), ValueError,
     "relevance must have the shape of scores"),
    (dict(ignore_idx=torch.tensor([0, 1, 9, 0])), ValueError, r"ignore_idx entries must lie in \[-1, N\)"),
    (dict(scores=torch.rand(4, 6).to(torch.float16)), TypeError, "scores must be float32 or float64"),
])
def test_direct_calls_are_checked(over, err, msg):
    with pytest.raises(err, match=msg):
        _direct(**over)


def test_direct_call_rejects_bad_step_parameters():
    register_cpp_ops()
    s = torch.rand(4, 6)
    with pytest.raises(ValueError, match="tau must lie in"):
        torch.ops.fastrank.ap_loss(s, torch.arange(4), torch.arange(6) % 3, None, None, None, 1, float("inf"),
                                   100.0, 0.05, 0.5, 1.5, False)


RECALL_OPTIONS = ([1, 4, 50], 0.5, False)  # ks (one past N), temp, clamp_hits (Patel et al.)


@pytest.mark.parametrize("kind", ["labels", "relevance"])
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clamp_hits", [False, True])
def test_opcheck_recall_loss(kind, ignore_kind, dtype, clamp_hits):
    register_cpp_ops()
    op = torch.ops.fastrank.recall_loss.default
    for with_grad in (True, False):
        args = _op_args(kind, ignore_kind, dtype, with_grad)
        args = args[:-1] + RECALL_OPTIONS[:2] + (clamp_hits, with_grad)
        if with_grad:
            torch.library.opcheck(op, args)
        else:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def _direct_recall(ks=(1, 2), temp=1.0, dtype=torch.float64):
    register_cpp_ops()
    s = torch.rand(4, 6, dtype=dtype)
    return torch.ops.fastrank.recall_loss(s, torch.arange(4), torch.arange(6) % 3, None, None, None,
                                          *StepParams(step=1).as_op_args(), list(ks), temp, False, True)


@pytest.mark.parametrize("kw,msg", [
    (dict(ks=()), "ks must be a non-empty list"),
    (dict(ks=(1, 0)), "every k in ks must be >= 1, got 0"),
    (dict(temp=0.0), "temp must be"),
    (dict(temp=float("nan")), "temp must be"),
    (dict(temp=-1.0), "temp must be"),
])
def test_direct_recall_calls_are_checked(kw, msg):
    with pytest.raises(ValueError, match=f"recall_loss: {msg}"):
        _direct_recall(**kw)


def test_recall_tiny_temp_is_a_step_with_finite_gradient():
    # 1/temp overflows float32 at temp=1e-40: the op caps it (as the two-pass path does)
    case = all_cases()[10]
    s = case.scores.float().requires_grad_()
    v = fastrank.recall_at_k(s, case.target, ignore=case.ignore, temp=1e-40, backend="cpp", reduction="none")
    ref = fastrank.recall_at_k(case.scores, case.target, ignore=case.ignore, temp=1e-40, backend="naive",
                               reduction="none")
    torch.testing.assert_close(v.double(), ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(v.sum(), s)
    assert torch.isfinite(g).all()


def test_retain_graph_backward_twice():
    # a backward that frees the graph turns the gradient rows into the gradient in place (one
    # (Q, N) tensor); with retain_graph=True the rows must survive for the next backward
    case = all_cases()[12]
    s = case.scores.clone().requires_grad_()
    v = fastrank.sup_ap(s, case.target, ignore=case.ignore, backend="cpp")
    (g1,) = torch.autograd.grad(v, s, retain_graph=True)
    (g2,) = torch.autograd.grad(2 * v, s)
    torch.testing.assert_close(g2, 2 * g1, rtol=1e-15, atol=0)
    with pytest.raises(RuntimeError, match="second time"):  # freed: autograd's own error
        torch.autograd.grad(v, s)


def test_gradient_rows_scaled_by_grad_output():
    # backward multiplies row i by grad_output[i]: weights per query, as a weighted sum of scores
    case = all_cases()[12]
    w = torch.rand(case.scores.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = []
    for backend in ("cpp", "naive"):
        s = case.scores.clone().requires_grad_()
        (fastrank.sup_ap(s, case.target, ignore=case.ignore, backend=backend, reduction="none") * w).sum().backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def _block_and_budget_problem(dtype):
    """Rows of N = 523 (no multiple of the 8 lanes) whose positive counts take every block shape
    of the in-place sweeps (4, 2, 1 and their sums: 1, 2, 3, 5, 7) and one row of 500 positives,
    whose 500 x 528 terms exceed the 1 MiB per-thread budget in float32 and float64, so its
    gradient sweep recomputes them; one row has a positive at +inf (the compacted path), one a
    masked-out item with a NaN score (left out, so the row stays finite)."""
    g = torch.Generator().manual_seed(7)
    n = 523
    counts = [1, 2, 3, 5, 7, 500, 4, 6]
    q = len(counts)
    scores = (torch.randn(q, n, generator=g, dtype=torch.float64) * 0.05).round(decimals=3)  # ties
    pos = torch.zeros(q, n, dtype=torch.bool)
    for i, c in enumerate(counts):
        pos[i, torch.randperm(n, generator=g)[:c]] = True
    ignore = torch.zeros(q, n, dtype=torch.bool)
    ignore[:, 517] = True
    scores[6, pos[6].nonzero()[0, 0]] = float("inf")
    pos[7, 517] = False
    scores[7, 517] = float("nan")
    return scores.to(dtype), pos, ignore


@pytest.mark.parametrize("name", FNS)
def test_every_block_shape_and_the_recomputed_rows_equal_naive(name):
    fn = FNS[name]
    scores, pos, ignore = _block_and_budget_problem(torch.float64)
    got = outputs_and_grad(lambda s: fn(s, pos, ignore=ignore, backend="cpp", reduction="none"), scores)
    ref = outputs_and_grad(lambda s: fn(s, pos, ignore=ignore, backend="naive", reduction="none"), scores)
    assert torch.isfinite(got[0]).all()
    assert_all_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(os.environ.get("FASTRANK_CPU_PORTABLE") == "1",
                    reason="the portable scalar float32 loops (a debugging switch) sum each row in one accumulator")
@pytest.mark.parametrize("name", FNS)
def test_float32_rows_as_accurate_as_pytorch_float32(name):
    # float32 against the float64 reference, judged by the error of the naive backend's own
    # float32 arithmetic on the same problem (the vector lanes, the stored and recomputed rows)
    scores, pos, ignore = _block_and_budget_problem(torch.float64)
    finite = torch.isfinite(scores).all(1)  # the inf row's gradient is compared in float64 above
    _assert_float32_as_accurate_as_naive(FNS[name], scores[finite], pos[finite], ignore[finite])


def _assert_float32_as_accurate_as_naive(fn, scores, pos, ignore=None):
    """fn on `cpp` in float32 against the float64 naive reference on `scores` (float64), judged by
    the error of the naive backend's own float32 arithmetic on the same problem."""
    ref = outputs_and_grad(lambda s: fn(s, pos, ignore=ignore, backend="naive", reduction="none"), scores)
    s32 = scores.float()
    got = outputs_and_grad(lambda s: fn(s, pos, ignore=ignore, backend="cpp", reduction="none"), s32)
    base = outputs_and_grad(lambda s: fn(s, pos, ignore=ignore, backend="naive", reduction="none"), s32)
    for a, b, r in zip(got, base, ref):
        err = (a.double() - r).abs().max().item()
        err_torch = (b.double() - r).abs().max().item()
        assert err <= 4 * err_torch + 1e-6 * r.abs().max().item(), (err, err_torch)


def _branch_edges_problem():
    # Rows whose terms sit on the edges of what the forward sweep stores for the gradient (sigma,
    # plus 2 beyond SupRank's delta, loss_sweeps.h): d = s_k - s_p exactly at delta = 0.05 and
    # one step either side, at the clamp (d / tau = -50 for tau = 0.01) and below it, far beyond
    # delta, and a tie. N = 37 leaves a partial vector.
    edges = [0.05, 0.05 + 1e-7, 0.05 - 1e-7, -0.5, -0.5 - 1e-6, -0.75, 0.9, 0.0, 0.3, -0.02]
    n = 37
    g = torch.Generator().manual_seed(7)
    scores = torch.empty(3, n, dtype=torch.float64).uniform_(-0.4, 0.4, generator=g)
    pos = torch.zeros(3, n, dtype=torch.bool)
    for i, cols in enumerate([(0,), (0, 36), (3, 17, 20, 36, 30)]):
        pos[i, list(cols)] = True
    scores[:, 0] = 0.0  # every row's first positive at 0: its terms are d = the edges themselves
    for i in range(3):
        scores[i, 1:1 + len(edges)] = torch.tensor(edges, dtype=torch.float64)
    return scores, pos


@pytest.mark.parametrize("name", ["sup_ap", "smooth_ap"])
def test_stored_sigma_edges_equal_naive(name):
    fn = functools.partial(FNS[name], tau=0.01)
    scores, pos = _branch_edges_problem()
    got = outputs_and_grad(lambda s: fn(s, pos, backend="cpp", reduction="none"), scores)
    ref = outputs_and_grad(lambda s: fn(s, pos, backend="naive", reduction="none"), scores)
    assert_all_close(got, ref, rtol=1e-12, atol=1e-12)
    _assert_float32_as_accurate_as_naive(fn, scores, pos)
