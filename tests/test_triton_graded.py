"""Triton kernels of the GRADED rank-sums primitive (triton_kernels/graded.py) against the fp64
PyTorch reference (fastrank.graded.chunked.dense_forward/dense_backward).

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports the kernels,
and they run in Triton's interpreter on CPU tensors (small shapes: it is slow). With a GPU the
same tests run on CUDA tensors (autotuned launches).
"""
from typing import NamedTuple

import pytest

pytest.importorskip("triton", reason="Triton is not importable: the Triton backend cannot be tested here")

import torch  # noqa: E402

from fastrank.core.params import StepParams, make_params  # noqa: E402
from fastrank.core.problem import RankProblem, build_problem, dense_valid_mask  # noqa: E402
from fastrank.core.problem import gather_packed, scatter_packed  # noqa: E402
from fastrank.graded.chunked import dense_backward as torch_graded_backward  # noqa: E402
from fastrank.graded.chunked import dense_forward as torch_graded_forward  # noqa: E402

from .cases import NON_DEFAULT_STEP_IDS, NON_DEFAULT_STEPS  # noqa: E402
from .conftest import TRITON_DEVICE as DEVICE  # noqa: E402
from .conftest import TRITON_ON_GPU as ON_GPU  # noqa: E402
from .conftest import requires  # noqa: E402

pytestmark = requires("triton")

gk = pytest.importorskip("fastrank.triton_kernels.graded")
tk = pytest.importorskip("fastrank.triton_kernels.rank_sums")


STEPS = ["sigmoid", "suprank"]
IGNORES = ["none", "index", "mask"]


def _params(step: str, tau=0.01, rho=100.0, delta=0.05, start=0.5, offset=None) -> StepParams:
    return make_params("test", step, tau, rho, delta, start, offset)


class Problem(NamedTuple):
    scores: torch.Tensor  # (Q, N)
    rel: torch.Tensor  # (Q, N) float64
    pb: RankProblem
    valid: torch.Tensor  # (Q, N) bool


def _relevance(q, n, kind, g):
    if kind == "int":  # 0..3, many ties and zeros
        rel = torch.randint(0, 4, (q, n), generator=g).double()
    elif kind == "binary":
        rel = torch.randint(0, 2, (q, n), generator=g).double()
    elif kind == "dense":  # nearly every item ranked: many ranked items per row
        rel = torch.randint(1, 4, (q, n), generator=g).double()
        rel[:, ::7] = 0
    elif kind == "float":  # non-integer grades, some shared (ties), ~40% zeros
        rel = torch.rand(q, n, generator=g, dtype=torch.float64) * 2.5 + 0.05
        rel[:, 1::4] = 1.37
        rel = torch.where(torch.rand(q, n, generator=g) < 0.4, torch.zeros_like(rel), rel)
    else:
        raise ValueError(kind)
    if q > 2:
        rel[1] = 0  # a query without a relevant item
    return rel


def _problem(q, n, rel_kind="int", ignore_kind="none", seed=0, dtype=torch.float64, ties=False) -> Problem:
    g = torch.Generator().manual_seed(seed)
    # scale 0.05: d / tau spans the sigmoid, both suprank branches (delta = 0.05) and, rarely, the clamp
    scores = torch.randn(q, n, generator=g, dtype=torch.float64) * 0.05
    if ties:
        scores = (scores * 100).round() / 100  # exact ties: d = 0 between distinct items
    rel = _relevance(q, n, rel_kind, g)
    if ignore_kind == "none":
        ignore = None
    elif ignore_kind == "index":
        ignore = torch.randint(-1, n, (q,), generator=g)
    elif ignore_kind == "mask":
        ignore = torch.rand(q, n, generator=g) < 0.25
    else:
        raise ValueError(ignore_kind)
    rel = rel.to(DEVICE)
    ignore = None if ignore is None else ignore.to(DEVICE)
    pb = build_problem(rel, ignore, q, n, DEVICE)
    valid = dense_valid_mask(q, n, pb.ignore_idx, pb.ignore_mask, DEVICE)
    return Problem(scores.to(DEVICE, dtype), rel, pb, valid)


def _packed_grads(pb: RankProblem, seed=1, dtype=torch.float64):
    """Random dL/drank_all, dL/drank_pos, nonzero at holes too (the kernels must ignore them)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(pb.pos_idx.shape)
    ga = torch.randn(shape, generator=g, dtype=torch.float64)
    gp = torch.randn(shape, generator=g, dtype=torch.float64)
    return ga.to(DEVICE, dtype), gp.to(DEVICE, dtype)


def _reference(pr: Problem, params, ga, gp):
    """fp64 packed forward and the gradient of sum(ga * rank_all + gp * rank_pos)."""
    s, rel = pr.scores.double(), pr.rel.double()
    n = s.shape[1]
    ra, rp = torch_graded_forward(s, rel, pr.valid, params)
    pos_idx = pr.pb.pos_idx
    grad = torch_graded_backward(
        scatter_packed(ga.double(), pos_idx, n), scatter_packed(gp.double(), pos_idx, n), s, rel, pr.valid, params
    )
    return gather_packed(ra, pos_idx), gather_packed(rp, pos_idx), grad


def _triton(pr: Problem, params, ga, gp, rel=None):
    pb = pr.pb
    if rel is None:  # relevance in the scores' dtype (float32 for half scores)
        rel = pr.rel.to(pr.scores.dtype if pr.scores.dtype in (torch.float32, torch.float64) else torch.float32)
    ra, rp = gk.forward(pr.scores, rel, None, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, params)
    grad = gk.backward(ga, gp, pr.scores, rel, None, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, params)
    return ra, rp, grad


def _assert_close(got, ref, rtol, atol):
    """Values with rtol/atol; the gradient with atol scaled by its largest entry (sums of signed terms)."""
    ra, rp, g = (t.double() for t in got)
    ra0, rp0, g0 = ref
    torch.testing.assert_close(ra, ra0, rtol=rtol, atol=atol)
    torch.testing.assert_close(rp, rp0, rtol=rtol, atol=atol)
    scale = max(1.0, float(g0.abs().max())) if g0.numel() else 1.0
    torch.testing.assert_close(g, g0, rtol=rtol, atol=atol * scale)


@pytest.fixture
def small_blocks(monkeypatch):
    """Interpreter: tiny blocks, so small shapes run the multi-tile loops and all-hole tiles."""
    monkeypatch.setattr(gk, "INTERPRETER_MAX_BLOCK_P", 4)
    monkeypatch.setattr(gk, "INTERPRETER_MAX_BLOCK_K", 8)


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("shape", [(3, 37), (1, 1), (1, 5), (5, 16)], ids=lambda s: f"q{s[0]}-n{s[1]}")
@pytest.mark.parametrize("rel_kind", ["int", "float"])
@pytest.mark.parametrize("ignore_kind", IGNORES)
@pytest.mark.parametrize("step", STEPS)
def test_matches_reference_fp64(step, ignore_kind, rel_kind, shape):
    q, n = shape
    pr = _problem(q, n, rel_kind, ignore_kind, seed=q * 100 + n, ties=rel_kind == "int")
    params = _params(step)
    ga, gp = _packed_grads(pr.pb)
    _assert_close(_triton(pr, params, ga, gp), _reference(pr, params, ga, gp), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ignore_kind", IGNORES)
@pytest.mark.parametrize("step", STEPS)
def test_multi_tile_loops(small_blocks, step, ignore_kind):
    # interpreter: BLOCK_P = 4 and BLOCK_K = 8, so ~25 ranked items per row make 7 tiles of ranked
    # items (the last partly holes, all holes in sparser rows) and N = 37 five column tiles
    pr = _problem(4, 37, "dense", ignore_kind, seed=7, ties=True)
    assert pr.pb.pos_idx.shape[1] > 4 * gk.INTERPRETER_MAX_BLOCK_P or ON_GPU
    params = _params(step)
    ga, gp = _packed_grads(pr.pb)
    _assert_close(_triton(pr, params, ga, gp), _reference(pr, params, ga, gp), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", NON_DEFAULT_STEPS, ids=NON_DEFAULT_STEP_IDS)
def test_non_default_step_parameters(kw):
    pr = _problem(3, 21, "float", "index", seed=5)
    params = _params(**kw)
    ga, gp = _packed_grads(pr.pb)
    _assert_close(_triton(pr, params, ga, gp), _reference(pr, params, ga, gp), rtol=1e-10, atol=1e-10)


def test_hand_computed_example():
    # one query, items a, b, c with s = 0.3, 0.2, 0.1 and rel = 2, 0, 1, suprank, default step:
    #   a: k = b, c are less relevant: H^-(-0.1) + H^-(-0.2); rank_pos = 2 + 0 + min(2, 1) H(-0.2) = 2
    #   c: k = a more relevant: H(0.2) = 1; k = b less: H^-(0.1) = 100 (0.1 - 0.05) + sigma(5) + 0.5
    #      rank_pos = 1 + min(1, 2) H(0.2) + 0 = 2
    s = torch.tensor([[0.3, 0.2, 0.1]], dtype=torch.float64, device=DEVICE)
    rel = torch.tensor([[2.0, 0.0, 1.0]], dtype=torch.float64, device=DEVICE)
    pos_idx = torch.tensor([[0, 2]], device=DEVICE)
    ra, rp = gk.forward(s, rel, None, pos_idx, None, None, _params("suprank"))
    sig = lambda x: float(torch.sigmoid(torch.tensor(x, dtype=torch.float64)))  # noqa: E731
    expect_all = torch.tensor([[1 + sig(-10.0) + sig(-20.0), 2 + 5.0 + sig(5.0) + 0.5]], dtype=torch.float64)
    torch.testing.assert_close(ra.cpu(), expect_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rp.cpu(), torch.tensor([[2.0, 2.0]], dtype=torch.float64))


# --------------------------------------------------------------------------- dtypes and layouts


@pytest.mark.parametrize("rel_kind", ["int", "float"])
@pytest.mark.parametrize("step", STEPS)
def test_float32(step, rel_kind):
    # float32 accumulation against fp64 math on the same (fp32-rounded) scores. Each output sums
    # N = 37 terms of size <= ~rho * |d| ~ 30 (suprank linear branch), each step evaluated with a
    # relative error of a few ulp (exp, division), so the error is ~ N * few * 2^-24 ~ 1e-5 relative
    # in the worst case, ~1e-6 typically; the gradient sums N signed terms of size up to
    # (|a| + 3 |b|) / (4 tau) ~ 100, so its error is taken relative to its largest entry.
    pr = _problem(4, 37, rel_kind, "mask", seed=11, dtype=torch.float32)
    params = _params(step)
    ga, gp = _packed_grads(pr.pb, dtype=torch.float32)
    got = _triton(pr, params, ga, gp)
    assert all(t.dtype == torch.float32 for t in got)
    _assert_close(got, _reference(pr, params, ga, gp), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs(dtype):
    # float32 math on the half scores; only the outputs are rounded to the half dtype
    # (8 bits of mantissa for bfloat16, 11 for float16)
    pr = _problem(3, 19, "float", "index", seed=12, dtype=dtype)
    params = _params("sigmoid", tau=0.05)
    ga, gp = _packed_grads(pr.pb, dtype=dtype)
    got = _triton(pr, params, ga, gp, rel=pr.rel.to(dtype))
    assert all(t.dtype == dtype for t in got)
    ref_pr = pr._replace(rel=pr.rel.to(dtype).double())
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    _assert_close(got, _reference(ref_pr, params, ga, gp), rtol=tol, atol=tol)


@pytest.mark.parametrize("step", STEPS)
def test_strided_inputs_float32_relevance_and_none_grads(step):
    # scores and relevance as non-contiguous views, relevance float32 with float64 scores
    # (grades 0..3 are exact in float32), packed grads non-contiguous, grad_pos / grad_all None
    pr = _problem(4, 23, "int", "mask", seed=13)
    params = _params(step)
    s_t = pr.scores.t().contiguous().t()  # column-major view
    rel32 = torch.zeros(4, 46, dtype=torch.float32, device=DEVICE)[:, ::2]
    rel32.copy_(pr.rel)
    assert not s_t.is_contiguous() and not rel32.is_contiguous()
    ga, gp = _packed_grads(pr.pb)
    ga_t = ga.t().contiguous().t()
    got = _triton(pr._replace(scores=s_t), params, ga_t, gp, rel=rel32)
    _assert_close(got, _reference(pr, params, ga, gp), rtol=1e-10, atol=1e-10)

    pb = pr.pb
    args = (pr.scores, pr.rel, None, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, params)
    zero = torch.zeros_like(ga)
    assert torch.equal(gk.backward(ga, None, *args), gk.backward(ga, zero, *args))
    assert torch.equal(gk.backward(None, gp, *args), gk.backward(zero, gp, *args))
    assert torch.equal(gk.backward(None, None, *args), torch.zeros_like(pr.scores))


# --------------------------------------------------------------------------- binary relevance = rank_sums


@pytest.mark.parametrize("ignore_kind", IGNORES)
@pytest.mark.parametrize("step", STEPS)
def test_binary_relevance_equals_rank_sums(step, ignore_kind):
    pr = _problem(4, 37, "binary", ignore_kind, seed=17, ties=True)
    params = _params(step)
    pb = pr.pb
    ga, gp = _packed_grads(pb)
    ra, rp, grad = _triton(pr, params, ga, gp)
    ra0, rp0 = tk.forward(pr.scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, params)
    grad0 = tk.backward(ga, gp, pr.scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, params)
    torch.testing.assert_close(ra, ra0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rp, rp0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad0, rtol=1e-12, atol=1e-12 * max(1.0, float(grad0.abs().max())))


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("step", STEPS)
def test_queries_without_ranked_items(step):
    params = _params(step)
    # row 1 of a 3-query batch has no relevant item: zero outputs (all holes) and zero gradient
    pr = _problem(3, 9, "int", "none", seed=19)
    assert int(pr.pb.n_pos[1]) == 0
    ga, gp = _packed_grads(pr.pb)
    ra, rp, grad = _triton(pr, params, ga, gp)
    assert not ra[1].any() and not rp[1].any() and not grad[1].any()
    _assert_close((ra, rp, grad), _reference(pr, params, ga, gp), rtol=1e-10, atol=1e-10)
    # no relevant item anywhere: P = 0
    s = pr.scores
    rel = torch.zeros_like(s)
    pb = build_problem(rel, None, *s.shape, DEVICE)
    ra, rp = gk.forward(s, rel, None, pb.pos_idx, None, None, params)
    assert ra.shape == (3, 0) and rp.shape == (3, 0)
    grad = gk.backward(None, None, s, rel, None, pb.pos_idx, None, None, params)
    assert grad.shape == s.shape and not grad.any()


@pytest.mark.parametrize("step", STEPS)
def test_single_item(step):
    # N = 1: no competitor, rank_all = 1 and rank_pos = rel_j exactly (sigmoid: 1/2 + sigma(0))
    s = torch.tensor([[0.7]], dtype=torch.float64, device=DEVICE)
    rel = torch.tensor([[2.5]], dtype=torch.float64, device=DEVICE)
    pos_idx = torch.zeros(1, 1, dtype=torch.int64, device=DEVICE)
    params = _params(step)
    ra, rp = gk.forward(s, rel, None, pos_idx, None, None, params)
    assert ra.item() == 1.0 and rp.item() == 2.5
    grad = gk.backward(torch.ones_like(ra), torch.ones_like(rp), s, rel, None, pos_idx, None, None, params)
    assert grad.item() == 0.0


@pytest.mark.parametrize("where", ["unranked", "ranked", "ignored"])
@pytest.mark.parametrize("step", STEPS)
def test_nan_score(step, where):
    pr = _problem(3, 15, "int", "mask", seed=23)
    pb = pr.pb
    rank0 = pr.valid[0] & (pr.rel[0] > 0)
    if where == "unranked":
        col = int(torch.nonzero(pr.valid[0] & (pr.rel[0] == 0))[0])
    elif where == "ranked":
        col = int(torch.nonzero(rank0)[0])
    else:
        col = int(torch.nonzero(~pr.valid[0])[0])
    scores = pr.scores.clone()
    scores[0, col] = float("nan")
    params = _params(step)
    ga, gp = _packed_grads(pb)
    ra, rp, grad = _triton(pr._replace(scores=scores), params, ga, gp)
    if where == "ignored":  # an ignored score takes no part: the row is unaffected
        ref = _reference(pr._replace(scores=scores.nan_to_num(0.0)), params, ga, gp)
        _assert_close((ra, rp, grad), ref, rtol=1e-10, atol=1e-10)
        return
    has0 = pb.pos_idx[0] >= 0
    assert torch.isnan(ra[0, has0]).all() and torch.isnan(rp[0, has0]).all()
    assert not ra[0, ~has0].any() and not rp[0, ~has0].any()  # holes stay 0
    assert torch.isnan(grad[0, pr.valid[0]]).all()
    assert not grad[0, ~pr.valid[0]].any()  # ignored entries keep a zero gradient
    # row 1 has no ranked item (zero outputs and gradient), row 2 is finite and exact
    ref = _reference(pr, params, ga, gp)
    _assert_close((ra[1:], rp[1:], grad[1:]), (ref[0][1:], ref[1][1:], ref[2][1:]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("step", STEPS)
def test_nan_in_row_without_ranked_items(step):
    # a NaN score in a query without relevant items: outputs (holes) and gradient stay 0
    pr = _problem(3, 10, "int", "none", seed=29)
    scores = pr.scores.clone()
    scores[1, 3] = float("nan")
    ga, gp = _packed_grads(pr.pb)
    ra, rp, grad = _triton(pr._replace(scores=scores), _params(step), ga, gp)
    assert not ra[1].any() and not rp[1].any() and not grad[1].any()
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("step", STEPS)
def test_backward_deterministic(small_blocks, step):
    pr = _problem(5, 37, "dense", "index", seed=31)
    params = _params(step)
    ga, gp = _packed_grads(pr.pb)
    pb = pr.pb
    args = (pr.scores, pr.rel, None, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, params)
    g1 = gk.backward(ga, gp, *args)
    g2 = gk.backward(ga, gp, *args)
    assert torch.equal(g1, g2)
    assert torch.equal(g1.view(torch.int64), g2.view(torch.int64))  # bitwise, signed zeros included


# --------------------------------------------------------------------------- autograd


class _GradedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, rel, pos_idx, ignore_idx, ignore_mask, params):
        ctx.save_for_backward(scores, rel, pos_idx)
        ctx.extra = (ignore_idx, ignore_mask, params)
        return gk.forward(scores, rel, None, pos_idx, ignore_idx, ignore_mask, params)

    @staticmethod
    def backward(ctx, grad_all, grad_pos):
        scores, rel, pos_idx = ctx.saved_tensors
        ignore_idx, ignore_mask, params = ctx.extra
        grad = gk.backward(grad_all, grad_pos, scores, rel, None, pos_idx, ignore_idx, ignore_mask, params)
        return grad, None, None, None, None, None


@pytest.mark.parametrize("ignore_kind", ["none", "mask"])
@pytest.mark.parametrize("step", STEPS)
def test_gradcheck(step, ignore_kind):
    q, n = 2, 6
    g = torch.Generator().manual_seed(37)
    # scores 0.1 apart (+-0.01 jitter): finite differences never cross a tie (H) or delta = 0.05 (H^-)
    base = torch.stack([torch.randperm(n, generator=g) for _ in range(q)]).double() * 0.1
    scores = (base + torch.rand(q, n, generator=g, dtype=torch.float64) * 0.02).to(DEVICE)
    rel = torch.tensor([[0, 1, 2, 2, 3, 1.5], [2, 0, 0, 1, 3, 3]], dtype=torch.float64, device=DEVICE)
    ignore = None
    if ignore_kind == "mask":
        ignore = torch.tensor([[False] * 5 + [True], [True] + [False] * 5], device=DEVICE)
    pb = build_problem(rel, ignore, q, n, DEVICE)
    params = _params(step, tau=0.1, rho=2.0, delta=0.05)
    s = scores.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: _GradedFn.apply(x, rel, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, params), (s,),
        eps=1e-6, atol=1e-6, rtol=1e-5,
    )


# --------------------------------------------------------------------------- validation


def test_input_validation():
    pr = _problem(3, 8, "int", "none", seed=41)
    pb = pr.pb
    s, rel, pos_idx = pr.scores, pr.rel, pb.pos_idx
    params = _params("suprank")
    fwd = gk.forward
    bwd = gk.backward
    with pytest.raises(TypeError, match="relevance"):
        fwd(s, rel.tolist(), None, pos_idx, None, None, params)
    with pytest.raises(TypeError, match="relevance"):
        fwd(s, rel.to(torch.int64), None, pos_idx, None, None, params)
    with pytest.raises(ValueError, match="relevance"):
        fwd(s, rel[:, :-1], None, pos_idx, None, None, params)
    with pytest.raises(ValueError, match="relevance"):
        fwd(s, rel[0], None, pos_idx, None, None, params)
    with pytest.raises(ValueError, match="relevance"):
        fwd(s, rel.to("meta"), None, pos_idx, None, None, params)
    with pytest.raises(ValueError, match="relevance"):
        bwd(None, None, s, rel[:-1], None, pos_idx, None, None, params)
    with pytest.raises(TypeError, match="scores"):
        fwd(s.to(torch.int64), rel, None, pos_idx, None, None, params)
    with pytest.raises(TypeError, match="pos_idx"):
        fwd(s, rel, None, pos_idx.to(torch.int32), None, None, params)
    with pytest.raises(ValueError, match="ignore_mask"):
        fwd(s, rel, None, pos_idx, None, torch.zeros(3, 7, dtype=torch.bool, device=DEVICE), params)
    with pytest.raises(TypeError, match="params"):
        fwd(s, rel, None, pos_idx, None, None, ("suprank", 0.01))
    with pytest.raises(ValueError, match="grad_all"):
        wide = torch.zeros(3, pos_idx.shape[1] + 1, dtype=s.dtype, device=DEVICE)
        bwd(wide, None, s, rel, None, pos_idx, None, None, params)
    with pytest.raises(TypeError, match="grad_pos"):
        bad_grad = torch.zeros(pos_idx.shape, dtype=torch.int64, device=DEVICE)
        bwd(None, bad_grad, s, rel, None, pos_idx, None, None, params)
    # the ordering key is checked as the relevance is
    with pytest.raises(ValueError, match="key"):
        fwd(s, rel, rel[:, :-1], pos_idx, None, None, params)
    with pytest.raises(TypeError, match="key"):
        fwd(s, rel, rel.to(torch.int64), pos_idx, None, None, params)
    with pytest.raises(ValueError, match="key"):
        bwd(None, None, s, rel, rel.to("meta"), pos_idx, None, None, params)
