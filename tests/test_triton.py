"""Triton rank-sums kernels (docs/design.md §3 tier 3 and 5) against the fp64 naive cube.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports the
kernels, and they run in Triton's interpreter on CPU tensors (small shapes: it is
slow). With a GPU the same tests run on CUDA tensors (autotuned launches), and the
GPU-only tests (low precision, the FAST special-function path) run too.
"""
import pytest

pytest.importorskip("triton", reason="Triton is not importable: the Triton backend cannot be tested here")

import torch  # noqa: E402

import fastrank  # noqa: E402
from fastrank.core.problem import build_problem  # noqa: E402
from fastrank.core.params import SIGMOID, SUPRANK, StepParams  # noqa: E402
from fastrank.rank_sums.chunked import backward as torch_rank_sums_backward  # noqa: E402
from fastrank.rank_sums.naive import forward as naive_rank_sums  # noqa: E402

from .cases import Case, all_cases, make_case  # noqa: E402
from .conftest import TRITON_DEVICE as DEVICE  # noqa: E402
from .conftest import TRITON_ON_GPU as ON_GPU  # noqa: E402
from .conftest import requires  # noqa: E402
from .conftest import triton_gpu_only as gpu_only  # noqa: E402

pytestmark = requires("triton")

tk = pytest.importorskip("fastrank.triton_kernels.rank_sums")


CASES = all_cases()
STEPS = ["sigmoid", "suprank"]


def _to(case: Case, device=DEVICE, dtype=None) -> Case:
    def mv(t):
        return None if t is None else t.to(device)

    target = tuple(mv(t) for t in case.target) if isinstance(case.target, tuple) else mv(case.target)
    scores = case.scores.to(device=device, dtype=dtype or case.scores.dtype)
    return Case(case.name, scores, target, mv(case.ignore))


def _run(case, backend, step, **kw):
    """Values and the gradient of a random linear functional of both outputs."""
    s = case.scores.clone().requires_grad_()
    out = fastrank.rank_sums(s, case.target, step=step, ignore=case.ignore, backend=backend, **kw)
    g = torch.Generator().manual_seed(123)
    wa = torch.randn(out.rank_all.shape, generator=g, dtype=torch.float64).to(s.device, s.dtype)
    wp = torch.randn(out.rank_pos.shape, generator=g, dtype=torch.float64).to(s.device, s.dtype)
    (grad,) = torch.autograd.grad((out.rank_all * wa).sum() + (out.rank_pos * wp).sum(), s)
    return out.rank_all.detach(), out.rank_pos.detach(), grad


def _assert_fp64_close(got, ref):
    ra, rp, g = got
    ra0, rp0, g0 = ref
    torch.testing.assert_close(ra, ra0, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(rp, rp0, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(g, g0, rtol=1e-9, atol=1e-8)


@pytest.fixture
def small_blocks(monkeypatch):
    """Interpreter: tiny blocks, so small shapes run the multi-tile loops and all-hole tiles."""
    monkeypatch.setattr(tk, "INTERPRETER_MAX_BLOCK_P", 4)
    monkeypatch.setattr(tk, "INTERPRETER_MAX_BLOCK_K", 8)


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_matches_naive_fp64(case, step):
    case = _to(case)
    _assert_fp64_close(_run(case, "triton", step), _run(case, "naive", step))


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_multi_tile_loops(small_blocks, step, ignore_kind):
    # (GPU: the autotuner's own blocks; the case still has several column tiles)
    # P up to ~12 and N = 21: three tiles of positives (the last one partly or wholly holes) and of columns
    case = _to(make_case(4, 21, 2, "labels", ignore_kind, ties=True, seed=21))
    _assert_fp64_close(_run(case, "triton", step), _run(case, "naive", step))


@pytest.mark.parametrize("step", STEPS)
def test_wide_rows_many_positives(step):
    # several BLOCK_P tiles of positives and column tiles at the default launch configuration
    q, n = (3, 300) if not ON_GPU else (16, 1500)
    case = _to(make_case(q, n, 2, "bool", "mask", seed=22))
    _assert_fp64_close(_run(case, "triton", step), _run(case, "torch", step))


def test_hand_computed_example():
    # one query, items a (pos), b (neg), c (pos) with s = 0.3, 0.2, 0.1, suprank step:
    # rank_all[a] = 1 + H^-(-0.1) + H(-0.2) = 1 + sigma(-10)
    # rank_all[c] = 1 + H(0.2) + H^-(0.1) = 2 + 100 * (0.1 - 0.05) + sigma(5) + 0.5
    s = torch.tensor([[0.3, 0.2, 0.1]], dtype=torch.float64, device=DEVICE)
    t = torch.tensor([[1, 0, 1]], device=DEVICE)
    r = fastrank.rank_sums(s, t, step="suprank", backend="triton")
    sig = lambda x: 1 / (1 + torch.exp(torch.tensor(-x, dtype=torch.float64)))  # noqa: E731
    expect_all = torch.tensor([[1 + sig(-10.0), 0.0, 2 + 5.0 + sig(5.0) + 0.5]], dtype=torch.float64)
    expect_pos = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(r.rank_all.cpu(), expect_all)
    torch.testing.assert_close(r.rank_pos.cpu(), expect_pos)


@pytest.mark.parametrize(
    "kw",
    [
        dict(step="suprank", tau=0.05, rho=7.0, delta=0.2, start=0.25, offset=1.5),
        dict(step="suprank", tau=0.02, rho=0.0, delta=0.0, start=0.0),
        dict(step="sigmoid", tau=0.3),
    ],
    ids=["suprank-custom", "suprank-degenerate", "sigmoid-tau"],
)
def test_non_default_step_parameters(kw):
    case = _to(make_case(10, 25, 3, "bool", "none", seed=8))
    _assert_fp64_close(_run(case, "triton", **kw), _run(case, "naive", **kw))


@pytest.mark.parametrize("step", STEPS)
def test_labels_and_dense_target_agree(step):
    case = _to(make_case(12, 30, 4, "labels", "index", seed=3))
    qlab, glab = case.target
    dense = qlab.unsqueeze(1) == glab.unsqueeze(0)
    a = fastrank.rank_sums(case.scores, case.target, step=step, ignore=case.ignore, backend="triton")
    b = fastrank.rank_sums(case.scores, dense, step=step, ignore=case.ignore, backend="triton")
    assert torch.equal(a.rank_all, b.rank_all) and torch.equal(a.rank_pos, b.rank_pos)


@pytest.mark.parametrize("step", STEPS)
def test_fp32_close_to_fp64_reference(step):
    # the rule of docs/design.md §3: error vs the fp64 reference at most 2x the naive fp32 error
    case = make_case(24, 70, 5, "labels", "self", seed=11)
    ra64, rp64, g64 = _run(_to(case), "naive", step)
    c32 = _to(case, dtype=torch.float32)
    ra_n, rp_n, g_n = _run(c32, "naive", step)
    ra_f, rp_f, g_f = _run(c32, "triton", step)
    assert ra_f.dtype == g_f.dtype == torch.float32
    for got, naive, ref, slack in ((ra_f, ra_n, ra64, 1e-5), (rp_f, rp_n, rp64, 1e-5), (g_f, g_n, g64, 1e-4)):
        err_naive = (naive.double() - ref).abs().max().item()
        err = (got.double() - ref).abs().max().item()
        assert err <= 2 * err_naive + slack, (err, err_naive)


def test_half_inputs_are_ranked_in_fp32():
    case = make_case(8, 40, 3, "labels", "none", seed=2, dtype=torch.float32)
    for dt in (torch.float16, torch.bfloat16):
        s = case.scores.to(DEVICE, dt)
        target = tuple(t.to(DEVICE) for t in case.target)
        r = fastrank.rank_sums(s, target, backend="triton")
        ref = fastrank.rank_sums(s.float(), target, backend="naive")
        assert r.rank_all.dtype == torch.float32
        torch.testing.assert_close(r.rank_all, ref.rank_all, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- gradcheck


def _spread_scores(q, n, seed):
    # distinct scores on a 0.013 grid: every difference is a multiple of 0.013, so no pair sits
    # within gradcheck's step of the kinks of H^- at d = 0 and d = delta = 0.05
    g = torch.Generator().manual_seed(seed)
    vals = torch.randperm(q * n, generator=g).to(torch.float64) * 0.013 - 0.5
    return vals.view(q, n).to(DEVICE)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_gradcheck_rank_sums(step, ignore_kind):
    q, n = 4, 7
    scores = _spread_scores(q, n, seed=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2], device=DEVICE)
    ignore = {
        "none": None,
        "index": torch.tensor([0, -1, 3, 6], device=DEVICE),
        "mask": (torch.rand(q, n) < 0.2).to(DEVICE),
    }[ignore_kind]

    def f(s):
        r = fastrank.rank_sums(s, (labels[:q], labels), step=step, tau=0.05, ignore=ignore, backend="triton")
        return r.rank_all, r.rank_pos

    # the full Jacobian once per step; the ignore variants with gradcheck's fast mode (random
    # projections), which costs a handful of interpreted launches instead of ~100
    fast = ignore_kind != "none"
    assert torch.autograd.gradcheck(f, (scores.requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap], ids=["smooth_ap", "sup_ap"])
def test_gradcheck_ap(fn):
    scores = _spread_scores(5, 9, seed=2)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2, 1], device=DEVICE)

    def f(s):
        return fn(s, (labels[:5], labels), tau=0.05, backend="triton", reduction="none")

    assert torch.autograd.gradcheck(f, (scores.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_linear_branch_of_suprank():
    # negatives far above positives: many pairs on the rho * (d - delta) branch
    scores = _spread_scores(3, 8, seed=3)
    target = scores < scores.median()

    def f(s):
        return fastrank.sup_ap(s, target, tau=0.05, backend="triton", reduction="none")

    assert torch.autograd.gradcheck(f, (scores.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap], ids=["smooth_ap", "sup_ap"])
@pytest.mark.parametrize("case", CASES[12:20], ids=repr)
def test_ap_matches_naive(fn, case):
    case = _to(case)

    def ap(backend):
        s = case.scores.clone().requires_grad_()
        v = fn(s, case.target, ignore=case.ignore, backend=backend, reduction="none")
        (g,) = torch.autograd.grad((v * torch.linspace(0.5, 1.5, v.numel(), dtype=v.dtype, device=v.device)).sum(), s)
        return v.detach(), g

    v, g = ap("triton")
    v0, g0 = ap("naive")
    torch.testing.assert_close(v, v0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, g0, rtol=1e-9, atol=1e-8)


# --------------------------------------------------------------------------- NaN, determinism


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("ignore_kind", ["none", "mask", "index"])
def test_nan_rows(step, ignore_kind):
    case = _to(make_case(6, 15, 2, "bool", ignore_kind, seed=4))
    case.target[0, :3] = True  # rows 0 (NaN, positives) and 1 (ignored NaN) both rank something
    case.target[1, :3] = True
    s = case.scores.clone()
    s[0, 5] = float("nan")  # a valid NaN: row 0 is poisoned
    s[1, 3] = float("nan")  # an ignored NaN: row 1 is unaffected
    if ignore_kind == "mask":
        case.ignore[1, 3] = True
        case.ignore[0, 5] = False
    elif ignore_kind == "index":
        case.ignore[1] = 3
        case.ignore[0] = -1
    else:
        s[1, 3] = 0.25
    x = s.clone().requires_grad_()
    r = fastrank.rank_sums(x, case.target, step=step, ignore=case.ignore, backend="triton", packed=True)
    (r.rank_all.sum() + r.rank_pos.sum()).backward()
    has = r.index >= 0
    assert torch.isnan(r.rank_all[0][has[0]]).all() and torch.isnan(r.rank_pos[0][has[0]]).all()
    assert (r.rank_all[0][~has[0]] == 0).all()
    from fastrank.core.problem import dense_valid_mask

    pb = build_problem(case.target, case.ignore, 6, 15, DEVICE)
    valid = dense_valid_mask(6, 15, pb.ignore_idx, pb.ignore_mask, DEVICE)
    assert torch.isnan(x.grad[0][valid[0]]).all()
    assert (x.grad[0][~valid[0]] == 0).all()
    # every other row matches the naive computation on the same scores without the NaN rows
    clean = s.clone()
    clean[0] = 0.0
    if ignore_kind != "none":
        clean[1, 3] = 0.0  # ignored: its value does not matter
    ra0, rp0 = naive_rank_sums(clean, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, StepParams(STEPS.index(step)))
    torch.testing.assert_close(r.rank_all[1:], ra0[1:], rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(r.rank_pos[1:], rp0[1:], rtol=1e-10, atol=1e-9)
    assert torch.isfinite(x.grad[1:]).all()
    if fastrank.backends()["cpp"].available:  # same NaN convention as the C++ kernel
        y = s.detach().cpu().clone().requires_grad_()
        target_cpu = case.target.cpu()
        ign_cpu = None if case.ignore is None else case.ignore.cpu()
        rc = fastrank.rank_sums(y, target_cpu, step=step, ignore=ign_cpu, backend="cpp", packed=True)
        (rc.rank_all.sum() + rc.rank_pos.sum()).backward()
        torch.testing.assert_close(r.rank_all.cpu(), rc.rank_all, equal_nan=True)
        torch.testing.assert_close(x.grad.cpu(), y.grad, equal_nan=True)


@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap], ids=["smooth_ap", "sup_ap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_is_bitwise_reproducible(fn, dtype):
    q, n = (24, 61) if not ON_GPU else (256, 3001)
    case = _to(make_case(q, n, 7, "labels", "self", seed=9, dtype=dtype))

    def grad():
        s = case.scores.clone().requires_grad_()
        fn(s, case.target, ignore=case.ignore, backend="triton").backward()
        return s.grad

    assert torch.equal(grad(), grad())


# --------------------------------------------------------------------------- the kernel API


def _problem(case):
    q, n = case.scores.shape
    return build_problem(case.target, case.ignore, q, n, case.scores.device)


@pytest.mark.parametrize("step", [SIGMOID, SUPRANK])
def test_kernel_api_strides_and_gradient_forms(step):
    case = _to(make_case(9, 23, 3, "labels", "mask", seed=3))
    pb = _problem(case)
    prm = StepParams(step)
    s_t = case.scores.t().contiguous().t()  # column-major storage
    assert not s_t.is_contiguous()
    ra, rp = tk.forward(s_t, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    ra0, rp0 = naive_rank_sums(case.scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    torch.testing.assert_close(ra, ra0, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(rp, rp0, rtol=1e-10, atol=1e-9)
    # a stride-0 (expanded) incoming gradient, as autograd hands out for sums
    ga = torch.randn(9, 1, dtype=torch.float64, device=DEVICE).expand(pb.pos_idx.shape)
    gp = torch.randn(pb.pos_idx.shape, dtype=torch.float64, device=DEVICE)
    g = tk.backward(ga, gp, s_t, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    g0 = torch_rank_sums_backward(ga, gp, case.scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    torch.testing.assert_close(g, g0, rtol=1e-9, atol=1e-8)
    assert g.is_contiguous() and g.dtype == torch.float64
    # None stands for a zero gradient
    g_none = tk.backward(None, gp, s_t, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    g_zero = tk.backward(torch.zeros_like(gp), gp, s_t, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    assert torch.equal(g_none, g_zero)


@pytest.mark.parametrize("step", [SIGMOID, SUPRANK])
def test_kernel_api_index_and_mask_together(step):
    case = _to(make_case(9, 23, 3, "bool", "mask", seed=5))
    ign_idx = torch.randint(-1, 23, (9,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    q, n = case.scores.shape
    pos_idx = build_problem(case.target, case.ignore, q, n, DEVICE).pos_idx
    keep = pos_idx != ign_idx.unsqueeze(1)
    pos_idx = torch.where(keep, pos_idx, -1)  # a hole in the middle of a row
    prm = StepParams(step)
    got = tk.forward(case.scores, pos_idx, ign_idx, case.ignore, prm)
    ref = naive_rank_sums(case.scores, pos_idx, ign_idx, case.ignore, prm)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)
    ga, gp = torch.randn_like(got[0]), torch.randn_like(got[1])
    g = tk.backward(ga, gp, case.scores, pos_idx, ign_idx, case.ignore, prm)
    g0 = torch_rank_sums_backward(ga, gp, case.scores, pos_idx, ign_idx, case.ignore, prm)
    torch.testing.assert_close(g, g0, rtol=1e-9, atol=1e-8)


def test_kernel_api_empty_shapes():
    prm = StepParams(SIGMOID)
    s = torch.rand(3, 5, dtype=torch.float64, device=DEVICE)
    no_pos = torch.empty(3, 0, dtype=torch.int64, device=DEVICE)
    ra, rp = tk.forward(s, no_pos, None, None, prm)
    assert ra.shape == rp.shape == (3, 0)
    g = tk.backward(ra, rp, s, no_pos, None, None, prm)
    assert g.shape == (3, 5) and not g.any()
    all_holes = torch.full((3, 2), -1, dtype=torch.int64, device=DEVICE)
    ra, rp = tk.forward(s, all_holes, None, None, prm)
    assert not ra.any() and not rp.any()
    g = tk.backward(torch.ones_like(ra), torch.ones_like(rp), s, all_holes, None, None, prm)
    assert not g.any()
    s0 = torch.rand(0, 5, dtype=torch.float64, device=DEVICE)
    ra, _ = tk.forward(s0, torch.empty(0, 2, dtype=torch.int64, device=DEVICE), None, None, prm)
    assert ra.shape == (0, 2)


def test_fast_flag_is_ignored_where_it_cannot_apply(monkeypatch):
    # the interpreter has no inline PTX and float64 has no tanh.approx: FAST must change nothing
    case = _to(make_case(7, 13, 3, "labels", "index", seed=1))
    ref = _run(case, "triton", "sigmoid")
    monkeypatch.setenv("FASTRANK_TRITON_FAST", "1")
    got = _run(case, "triton", "sigmoid")
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_kernel_api_validation():
    prm = StepParams(SIGMOID)
    s = torch.rand(3, 5, device=DEVICE)
    pos = torch.tensor([[0, 1], [2, -1], [-1, -1]], device=DEVICE)
    with pytest.raises(TypeError, match="scores"):
        tk.forward(s.to(torch.int32), pos, None, None, prm)
    with pytest.raises(ValueError, match="scores"):
        tk.forward(s[0], pos, None, None, prm)
    with pytest.raises(TypeError, match="pos_idx"):
        tk.forward(s, pos.to(torch.int32), None, None, prm)
    with pytest.raises(ValueError, match="pos_idx"):
        tk.forward(s, pos[:2], None, None, prm)
    with pytest.raises(ValueError, match="pos_idx"):
        tk.forward(s, pos.to("meta"), None, None, prm)
    with pytest.raises(ValueError, match="ignore_idx"):
        tk.forward(s, pos, torch.zeros(4, dtype=torch.int64, device=DEVICE), None, prm)
    with pytest.raises(TypeError, match="ignore_mask"):
        tk.forward(s, pos, None, torch.zeros(3, 5, device=DEVICE), prm)
    with pytest.raises(ValueError, match="ignore_mask"):
        tk.forward(s, pos, None, torch.zeros(3, 4, dtype=torch.bool, device=DEVICE), prm)
    with pytest.raises(TypeError, match="params"):
        tk.forward(s, pos, None, None, "sigmoid")
    z32, z33, z22 = (torch.zeros(shape, device=DEVICE) for shape in ((3, 2), (3, 3), (2, 2)))
    with pytest.raises(ValueError, match="grad_rank_all"):
        tk.backward(z33, z32, s, pos, None, None, prm)
    with pytest.raises(ValueError, match="grad_rank_pos"):
        tk.backward(z32, z22, s, pos, None, None, prm)


# --------------------------------------------------------------------------- GPU only


def _direct(scores, pos_idx, ignore_idx, ignore_mask, prm, wa, wp, fast=None):
    ra, rp = tk.forward(scores, pos_idx, ignore_idx, ignore_mask, prm, fast=fast)
    g = tk.backward(wa, wp, scores, pos_idx, ignore_idx, ignore_mask, prm, fast=fast)
    return ra, rp, g


def _naive_with_grad(scores, pos_idx, ignore_idx, ignore_mask, prm, wa, wp):
    s = scores.clone().requires_grad_()
    ra, rp = naive_rank_sums(s, pos_idx, ignore_idx, ignore_mask, prm)
    (g,) = torch.autograd.grad((ra * wa).sum() + (rp * wp).sum(), s)
    return ra.detach(), rp.detach(), g


def _max_err(x, ref):
    return (x.double() - ref).abs().max().item()


@gpu_only
@pytest.mark.parametrize("step", [SIGMOID, SUPRANK])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_kernels_vs_fp64(step, dtype):
    # docs/design.md §3: error vs the fp64 reference at most 2x the error of naive PyTorch in the same dtype.
    # The kernel is called directly so that it reads the half-precision scores itself.
    case = _to(make_case(48, 300, 6, "labels", "self", seed=12))
    pb = _problem(case)
    prm = StepParams(step)
    g = torch.Generator().manual_seed(7)
    # incoming gradients scaled by 1/16 so that SupAP's gradient (rho = 100 per pair) stays inside
    # the float16 range: beyond 65504 the exact answer rounds to inf, which says nothing about accuracy
    wa = (torch.randn(pb.pos_idx.shape, generator=g, dtype=torch.float64) / 16).to(DEVICE, dtype)
    wp = (torch.randn(pb.pos_idx.shape, generator=g, dtype=torch.float64) / 16).to(DEVICE, dtype)
    s_lo = case.scores.to(dtype)
    ref = _naive_with_grad(case.scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm, wa.double(), wp.double())
    got = _direct(s_lo, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm, wa, wp)
    naive = _naive_with_grad(s_lo, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm, wa, wp)
    # Half dtypes: the result is computed in float32 and rounded once to the dtype, so it may also be
    # off by the float32 error on the same rounded inputs (naive float32) plus one rounding (an ulp).
    # That also covers float16 gradients, where naive overflows (exp(50) = inf in float16, NaN gradient).
    naive32 = _naive_with_grad(s_lo.float(), pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm, wa.float(), wp.float())
    eps = torch.finfo(dtype).eps
    for x, nv, n32, r in zip(got, naive, naive32, ref):
        assert x.dtype == dtype
        bound = 2 * _max_err(nv, r)
        if not bound < float("inf"):  # NaN or inf
            bound = 0.0
        if dtype != torch.float32:
            bound = max(bound, 2 * _max_err(n32, r) + eps * r.abs().max().item())
        assert _max_err(x, r) <= bound + 1e-6, (_max_err(x, r), bound)


@gpu_only
@pytest.mark.parametrize("step", [SIGMOID, SUPRANK])
def test_fast_special_function_path(step, monkeypatch):
    # sigma through tanh.approx.f32 (max rel. error 2^-11 in tanh => |error of sigma| <= 2.5e-4 per term)
    case = _to(make_case(64, 500, 8, "labels", "index", seed=13))
    pb = _problem(case)
    prm = StepParams(step)
    g = torch.Generator().manual_seed(8)
    wa = torch.randn(pb.pos_idx.shape, generator=g).to(DEVICE)
    wp = torch.randn(pb.pos_idx.shape, generator=g).to(DEVICE)
    s32 = case.scores.float()
    ref = _naive_with_grad(case.scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm, wa.double(), wp.double())
    exact = _direct(s32, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm, wa, wp, fast=False)
    fast = _direct(s32, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm, wa, wp, fast=True)
    n = case.scores.shape[1]
    for k in range(2):  # values: the per-term bound, summed over a row
        assert _max_err(fast[k], ref[k]) <= 2.5e-4 * n + 2 * _max_err(exact[k], ref[k])
    # the gradient uses ex2.approx and div.approx: close to the exact path
    assert _max_err(fast[2], ref[2]) <= 1e-4 * ref[2].abs().max().item() + 2 * _max_err(exact[2], ref[2])
    # and the losses it feeds barely move (FASTRANK_TRITON_FAST is read at every call)
    fn = fastrank.smooth_ap if step == SIGMOID else fastrank.sup_ap
    ap_ref = fn(case.scores, case.target, ignore=case.ignore, backend="naive")
    monkeypatch.setenv("FASTRANK_TRITON_FAST", "1")
    ap_fast = fn(s32, case.target, ignore=case.ignore, backend="triton")
    assert abs(ap_fast.item() - ap_ref.item()) < 2e-3


@gpu_only
@pytest.mark.parametrize("step", STEPS)
def test_large_fp32_against_torch_backend(step):
    # autotuned launches on realistic shapes (many tiles, partially filled positive blocks)
    case = _to(make_case(512, 4099, 40, "labels", "mask", seed=14, dtype=torch.float32))
    ra, rp, g = _run(case, "triton", step)
    ra0, rp0, g0 = _run(_to(case, dtype=torch.float64), "torch", step)
    assert _max_err(ra, ra0) <= 1e-6 * ra0.abs().max().item() * 4099 ** 0.5
    assert _max_err(rp, rp0) <= 1e-3
    assert _max_err(g, g0) <= 1e-5 * g0.abs().max().item() * 4099 ** 0.5
