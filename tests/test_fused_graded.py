"""The fused graded loss op (torch.ops.fastrank.graded_loss): H-AP and NDCG, one pass per query row.

On `cpp` fastrank.h_ap / fastrank.ndcg run as one fused op per call (the ranked items found from
the dense relevance in C++, the rank sums, the epilogue and the gradient rows in one pass);
FASTRANK_FUSED=0 keeps the two-pass path (the graded rank-sums op plus the PyTorch epilogue).
Both are compared with the naive backend, the fp64 oracle, on the graded problems of
tests/test_graded.py and on every case of all_cases() with a graded relevance made from its target.
"""
import pytest
import torch

from fastrank.core.params import GradedParams
from fastrank.core.problem import ignore_args
from fastrank.core.registry import register_cpp_ops
from fastrank.graded import h_ap, ndcg

from .cases import (
    NON_DEFAULT_STEP_IDS,
    NON_DEFAULT_STEPS,
    Case,
    all_cases,
    assert_all_close,
    graded_ignore,
    outputs_and_grad,
    spread_scores,
    tied_relevance_problem,
)
from .conftest import requires
from .nan_rows import POISONED, check_nan_rows, nan_problem, nan_relevance

pytestmark = requires("cpp")

FNS = {"h_ap": h_ap, "ndcg": ndcg}
KIND = {"h_ap": 0, "ndcg": 1}
STEPS = ["sigmoid", "suprank"]
IGNORE_KINDS = ["none", "index", "mask"]


# --------------------------------------------------------------------------- the graded cases


def _graded_from(case: Case) -> Case:
    """all_cases()' case with a graded relevance: its positives at levels 1..3 (ties in relevance),
    a query label absent from the gallery still a row without relevant items."""
    t = case.target
    n = case.scores.shape[1]
    if isinstance(t, tuple) or t.dtype == torch.bool:
        dense = (t[0].unsqueeze(1) == t[1].unsqueeze(0)) if isinstance(t, tuple) else t
        dense = dense.double() * (1 + torch.arange(n, dtype=torch.float64) % 3)  # levels 1..3
    else:  # "int": levels 1..3 already; "float": real-valued, its negatives made 0
        dense = t.double().clamp(min=0)
    return Case(f"graded-{case.name}", case.scores, dense, case.ignore)


def _tied_cases():
    """tests/test_graded.py's problem: scores on a grid (ties at d = 0 and d = delta), relevance
    0..3 with ties, a row without relevant items; every ignore form."""
    out = []
    for seed in (0, 3):
        for ik in IGNORE_KINDS:
            s, rel = tied_relevance_problem(seed=seed)
            if seed == 3:
                rel[1] = 0
            out.append(Case(f"tied-s{seed}-{ik}", s, rel, graded_ignore(ik, *s.shape)))
    return out


def _odd_size_cases():
    """tests/test_graded.py's odd sizes: N = 1, N not a multiple of a vector width, score ties,
    real-valued relevance with ties and zeros, the last row without relevant items."""
    out = []
    for i, (q, n) in enumerate([(1, 1), (3, 1), (2, 2), (4, 37), (3, 100)]):
        g = torch.Generator().manual_seed(q * 1000 + n)
        s = torch.randn(q, n, generator=g, dtype=torch.float64) * 0.1
        s[:, n // 2:] = s[:, : n - n // 2].flip(1)
        rel = (torch.rand(q, n, generator=g, dtype=torch.float64) * 3).round(decimals=1)
        rel[rel < 0.8] = 0
        if q > 1:
            rel[-1] = 0
        ik = IGNORE_KINDS[i % 3]
        out.append(Case(f"odd-q{q}-n{n}-{ik}", s, rel, graded_ignore(ik, q, n)))
    return out


def graded_cases():
    return _tied_cases() + _odd_size_cases() + [_graded_from(c) for c in all_cases()]


CASES = graded_cases()


def _value_and_grad(fn, case, backend, reduction="none", **kw):
    kw = {"tau": 0.05, **kw}
    return outputs_and_grad(
        lambda s: fn(s, case.target, ignore=case.ignore, backend=backend, reduction=reduction, **kw), case.scores)


# --------------------------------------------------------------------------- fused == naive, == two-pass


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fused_equals_naive(name, step, case):
    fn = FNS[name]
    assert_all_close(_value_and_grad(fn, case, "cpp", step=step), _value_and_grad(fn, case, "naive", step=step),
                     rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("kw", NON_DEFAULT_STEPS, ids=NON_DEFAULT_STEP_IDS)
def test_fused_equals_naive_away_from_the_default_step(name, kw):
    fn = FNS[name]
    for case in CASES[::4]:
        assert_all_close(_value_and_grad(fn, case, "cpp", **kw), _value_and_grad(fn, case, "naive", **kw),
                         rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("step", STEPS)
def test_fused_equals_naive_with_infinite_scores(name, step):
    # ranked items at +-inf take the scalar tied loops; equal infinities tie (a constant)
    s, rel = tied_relevance_problem(seed=5)
    s[0, 0] = s[0, 4] = float("inf")  # relevance 3 and 2
    s[0, 2] = float("-inf")  # relevance 1
    s[2, 1] = float("-inf")
    case = Case("inf", s, rel, None)
    fn = FNS[name]
    kw = dict(step=step, rho=0.0) if step == "suprank" else dict(step=step)  # H^-(inf) = offset, finite
    assert_all_close(_value_and_grad(fn, case, "cpp", **kw), _value_and_grad(fn, case, "naive", **kw),
                     rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_equals_the_two_pass_path(name, step, reduction, monkeypatch):
    fn = FNS[name]
    for case in CASES[::3]:
        fused = _value_and_grad(fn, case, "cpp", reduction, step=step)
        monkeypatch.setenv("FASTRANK_FUSED", "0")
        two_pass = _value_and_grad(fn, case, "cpp", reduction, step=step)
        monkeypatch.delenv("FASTRANK_FUSED")
        assert_all_close(fused, two_pass, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FNS)
def test_the_switch_selects_the_path(name, monkeypatch):
    # the fused path never packs the problem nor runs the graded rank-sums op; the two-pass path does
    import fastrank.graded as graded_mod

    calls = []
    real = graded_mod.build_problem
    monkeypatch.setattr(graded_mod, "build_problem", lambda *a: calls.append(1) or real(*a))
    case = CASES[1]
    FNS[name](case.scores, case.target, ignore=case.ignore, backend="cpp")
    assert calls == []
    monkeypatch.setenv("FASTRANK_FUSED", "0")
    FNS[name](case.scores, case.target, ignore=case.ignore, backend="cpp")
    assert calls == [1]


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("step", STEPS)
def test_float32_within_float32_error_of_the_two_pass_path(name, step, monkeypatch):
    g = torch.Generator().manual_seed(21)
    s = torch.randn(6, 67, generator=g, dtype=torch.float64) * 0.2
    rel = torch.randint(0, 4, (6, 67), generator=g).to(torch.float64)
    case64, case32 = Case("f64", s, rel, None), Case("f32", s.float(), rel.float(), None)
    ref = _value_and_grad(FNS[name], case64, "naive", step=step)
    fused = _value_and_grad(FNS[name], case32, "cpp", step=step)
    monkeypatch.setenv("FASTRANK_FUSED", "0")
    two_pass = _value_and_grad(FNS[name], case32, "cpp", step=step)
    for r, t, o in zip(ref, two_pass, fused):
        assert o.dtype == torch.float32
        err_t, err_o = (t.double() - r).abs().max().item(), (o.double() - r).abs().max().item()
        assert err_o <= 4 * err_t + 1e-6 * r.abs().max().item(), (err_o, err_t)


# --------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("ignore_kind", IGNORE_KINDS)
def test_gradcheck(name, step, ignore_kind):
    scores = spread_scores(5, 9, seed=2)
    rel = torch.randint(0, 4, (5, 9), generator=torch.Generator().manual_seed(4)).to(torch.float64)
    rel[3] = 0
    ignore = graded_ignore(ignore_kind, 5, 9)

    def f(s):
        return FNS[name](s, rel, step=step, tau=0.05, ignore=ignore, reduction="none", backend="cpp")

    assert torch.autograd.gradcheck(f, (scores.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


def _op_args(kind, ignore_kind, dtype, with_grad, step=1):
    s, rel = tied_relevance_problem(q=6, n=11, seed=2)
    rel[1] = 0
    ignore = {"none": (None, None), "index": (torch.tensor([0, -1, 3, 10, 5, 5]), None),
              "mask": (None, torch.rand(6, 11, generator=torch.Generator().manual_seed(1)) < 0.3)}[ignore_kind]
    return ((s.to(dtype).requires_grad_(), rel.to(dtype), None, *ignore)
            + GradedParams(step=step, tau=0.05).as_op_args() + (kind, with_grad))


def test_no_gradient_rows_without_grad():
    register_cpp_ops()
    for kind in (0, 1):
        for step in (0, 1):
            v, n_pos, rows = torch.ops.fastrank.graded_loss(*_op_args(kind, "mask", torch.float64, False, step))
            assert rows.shape == (0, 11)
            v2, n_pos2, rows2 = torch.ops.fastrank.graded_loss(*_op_args(kind, "mask", torch.float64, True, step))
            assert rows2.shape == (6, 11)
            # with_grad=True keeps the step derivatives from the forward sweep (another loop, whose
            # sum the compiler may vectorise in another order): the values agree to rounding only
            torch.testing.assert_close(v, v2, rtol=16 * torch.finfo(v.dtype).eps, atol=0)
            assert torch.equal(n_pos, n_pos2)


def test_n_pos_counts_the_valid_relevant_items():
    register_cpp_ops()
    args = _op_args(0, "mask", torch.float64, False)
    s, rel, _, _, mask = args[:5]
    _, n_pos, _ = torch.ops.fastrank.graded_loss(*args)
    assert n_pos.dtype == torch.int64
    assert torch.equal(n_pos, ((rel > 0) & ~mask).sum(1))


def test_backward_without_gradient_rows_raises():
    register_cpp_ops()
    v, _, _ = torch.ops.fastrank.graded_loss(*_op_args(1, "none", torch.float64, False))
    with pytest.raises(RuntimeError, match="with_grad=False"):
        v.sum().backward()


def test_second_derivative_is_refused():
    s, rel = tied_relevance_problem(seed=3)
    x = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(ndcg(x, rel, backend="cpp"), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        g.sum().backward()


@pytest.mark.parametrize("kind", [0, 1])
@pytest.mark.parametrize("ignore_kind", IGNORE_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_graded_loss(kind, ignore_kind, dtype):
    register_cpp_ops()
    op = torch.ops.fastrank.graded_loss.default
    torch.library.opcheck(op, _op_args(kind, ignore_kind, dtype, True))
    torch.library.opcheck(op, _op_args(kind, ignore_kind, dtype, True, step=0))
    torch.library.opcheck(op, _op_args(kind, ignore_kind, dtype, False), test_utils=("test_schema", "test_faketensor"))
    # an ordering key apart from the relevance, and HAPPIER's smoothed H-rank
    args = list(_op_args(kind, ignore_kind, dtype, True))
    args[2] = (args[1] * 7 % 3).contiguous()
    hr = GradedParams(step=1, tau=0.05, hrank=True, beta=25.0, gamma=0.5, leak=10.0).as_op_args()
    torch.library.opcheck(op, tuple(args[:5]) + hr + tuple(args[-2:]))


# --------------------------------------------------------------------------- NaN, determinism


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("ignore_kind", IGNORE_KINDS)
def test_nan_in_nan_out(name, step, ignore_kind):
    fn = FNS[name]
    s, _, ignore = nan_problem(ignore_kind)
    rel = nan_relevance()
    x = s.clone().requires_grad_()
    v = fn(x, rel, step=step, ignore=ignore, backend="cpp", reduction="none")
    assert torch.equal(torch.isnan(v), POISONED)
    ref = fn(s, rel, step=step, ignore=ignore, backend="naive", reduction="none")
    torch.testing.assert_close(v[~POISONED], ref[~POISONED], rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(v.sum(), x)
    assert torch.isfinite(g[~POISONED]).all()  # row i's gradient comes from query i alone
    assert torch.isnan(g[0]).any()  # query 0 has relevant items: its NaN reaches its gradient
    assert torch.equal(g[1], torch.zeros_like(g[1]))  # query 1 has none: a constant NaN
    assert torch.isnan(fn(s, rel, step=step, ignore=ignore, backend="cpp")).item()
    check_nan_rows(lambda *a, **kw: fn(*a, step=step, **kw), "cpp", ignore_kind, target=rel)


@pytest.mark.parametrize("name", FNS)
def test_deterministic_across_runs_and_thread_counts(name):
    g = torch.Generator().manual_seed(15)
    case = Case("det", torch.randn(33, 129, generator=g), torch.randint(0, 5, (33, 129), generator=g).float(), None)
    threads = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 2):
            torch.set_num_threads(nt)
            outs.append(_value_and_grad(FNS[name], case, "cpp"))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- checks


def test_public_ndcg_gain_overflow_is_refused_on_the_fused_path():
    # the fused op checks NDCG's gain range in its pass over the rows (the two-pass path in Python)
    scores = torch.randn(2, 4)
    rel = torch.tensor([[1.0, 200.0, 0.0, 2.0], [0.0, 1.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match=r"relevance up to 200 in row 0 overflows the gain"):
        ndcg(scores, rel, backend="cpp")
    assert torch.isfinite(ndcg(scores.double(), rel.double(), backend="cpp"))
    assert torch.isfinite(h_ap(scores, rel, backend="cpp"))


def _direct(**over):
    register_cpp_ops()
    kw = dict(scores=torch.rand(4, 6, dtype=torch.float64), relevance=torch.ones(4, 6, dtype=torch.float64),
              key=None, ignore_idx=None, ignore_mask=None, step=1, tau=0.01, rho=100.0, delta=0.05, start=0.5,
              offset=1.5, hrank=False, beta=0.0, gamma=0.0, leak=0.0, kind=1, with_grad=True)
    kw.update(over)
    return torch.ops.fastrank.graded_loss(*kw.values())


def _rel(row=2, col=3, value=-1.0, dtype=torch.float64):
    r = torch.ones(4, 6, dtype=dtype)
    r[row, col] = value
    return r


@pytest.mark.parametrize("over,err,msg", [
    (dict(relevance=_rel()), ValueError, r"relevance must be >= 0 .*minimum of -1 in row 2"),
    (dict(relevance=_rel(value=float("nan"))), ValueError, "relevance must be finite .*row 2"),
    (dict(relevance=_rel(row=0, value=float("inf"))), ValueError, "relevance must be finite .*row 0"),
    (dict(relevance=_rel(value=1e-310)), ValueError, "relevance has positive values below the smallest normal "
     "float64 in row 2"),
    (dict(relevance=_rel(value=1e-40, dtype=torch.float32), scores=torch.rand(4, 6)), ValueError,
     "relevance has positive values below the smallest normal float32 in row 2"),
    (dict(relevance=_rel(value=1024.0)), ValueError, r"relevance up to 1024 in row 2 overflows the gain"),
    (dict(relevance=_rel(value=128.0, dtype=torch.float32), scores=torch.rand(4, 6)), ValueError,
     r"relevance up to 128 in row 2 overflows the gain 2\^rel - 1 of NDCG in float32"),
    (dict(relevance=torch.ones(4, 5, dtype=torch.float64)), ValueError, "relevance must have the shape of scores"),
    (dict(relevance=torch.ones(4, 6)), TypeError, "relevance must have the dtype of scores"),
    (dict(relevance=torch.ones(4, 6, dtype=torch.int64)), TypeError, "relevance must have the dtype of scores"),
    (dict(scores=torch.rand(4, 6).half(), relevance=torch.ones(4, 6).half()), TypeError,
     "scores must be float32 or float64"),
    (dict(scores=torch.rand(24, dtype=torch.float64)), ValueError, "scores must be 2-D"),
    (dict(ignore_idx=torch.tensor([0, 1, 9, 0])), ValueError, r"ignore_idx entries must lie in \[-1, N\)"),
    (dict(ignore_idx=torch.tensor([0, 1])), ValueError, "ignore_idx must be an int64 tensor of shape"),
    (dict(ignore_mask=torch.zeros(4, 5, dtype=torch.bool)), ValueError, "ignore_mask must be a bool tensor"),
    (dict(tau=float("inf")), ValueError, "tau must lie in"),
    (dict(tau=0.0), ValueError, "tau must lie in"),
    (dict(step=2), ValueError, "step must be 0"),
    (dict(kind=2), ValueError, r"kind must be 0 \(H-AP\) or 1 \(NDCG\)"),
])
def test_direct_calls_are_checked(over, err, msg):
    with pytest.raises(err, match=f"fastrank cpu graded_loss: {msg}"):
        _direct(**over)


def test_direct_call_h_ap_takes_relevance_beyond_the_gain_range():
    # H-AP has no exponential gain: only NDCG refuses rel >= log2(max)
    v, _, _ = _direct(relevance=_rel(value=1024.0), kind=0)
    assert torch.isfinite(v).all()


def test_ignored_items_relevance_is_checked_too():
    # as the Python layer does: the whole (Q, N) relevance, ignored items included
    with pytest.raises(ValueError, match="relevance must be >= 0"):
        _direct(relevance=_rel(row=1, col=0), ignore_idx=torch.tensor([-1, 0, -1, -1]))


def test_op_equals_the_public_function():
    # the op directly, with every argument as the public function passes it
    register_cpp_ops()
    case = CASES[2]
    v, n_pos, _ = torch.ops.fastrank.graded_loss(case.scores, case.target, None, *ignore_args(case.ignore),
                                                 *GradedParams(step=1, tau=0.05).as_op_args(), 0, False)
    torch.testing.assert_close(v, h_ap(case.scores, case.target, tau=0.05, ignore=case.ignore, reduction="none",
                                       backend="naive"), rtol=1e-12, atol=1e-12)
