"""Triton rank-sums kernels (docs/design.md §3 tier 3 and 5): the kernel API and the launch
configuration (blocks, tiles, the FAST path). Triton through the public API, against the naive cube
like every backend: tests/test_rank_sums.py (values, gradients, dtypes, NaN) and tests/test_gradcheck.py.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports the
kernels, and they run in Triton's interpreter on CPU tensors (small shapes: it is
slow). With a GPU the same tests run on CUDA tensors (autotuned launches), and the
GPU-only tests (low precision, the FAST special-function path) run too.
"""
import pytest

pytest.importorskip("triton", reason="Triton is not importable: the Triton backend cannot be tested here")

import torch  # noqa: E402

import fastrank  # noqa: E402
from fastrank.core.params import SIGMOID, SUPRANK, StepParams  # noqa: E402
from fastrank.core.problem import build_problem  # noqa: E402
from fastrank.rank_sums.chunked import backward as torch_rank_sums_backward  # noqa: E402
from fastrank.rank_sums.naive import forward as naive_rank_sums  # noqa: E402

from .cases import assert_rank_sums_close, make_case, max_err, rank_sums_and_grad  # noqa: E402
from .cases import to_device as _to_device  # noqa: E402
from .conftest import TRITON_DEVICE as DEVICE  # noqa: E402
from .conftest import TRITON_ON_GPU as ON_GPU  # noqa: E402
from .conftest import requires  # noqa: E402
from .conftest import triton_gpu_only as gpu_only  # noqa: E402
from .kernel_api import check_common_arguments  # noqa: E402

pytestmark = requires("triton")

tk = pytest.importorskip("fastrank.triton_kernels.rank_sums")

STEPS = ["sigmoid", "suprank"]


def _to(case, dtype=None):
    return _to_device(case, DEVICE, dtype)


@pytest.fixture
def small_blocks(monkeypatch):
    """Interpreter: tiny blocks, so small shapes run the multi-tile loops and all-hole tiles."""
    monkeypatch.setattr(tk, "INTERPRETER_MAX_BLOCK_P", 4)
    monkeypatch.setattr(tk, "INTERPRETER_MAX_BLOCK_K", 8)


# --------------------------------------------------------------------------- tiles and launches


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_multi_tile_loops(small_blocks, step, ignore_kind):
    # (GPU: the autotuner's own blocks; the case still has several column tiles)
    # P up to ~12 and N = 21: three tiles of positives (the last one partly or wholly holes) and of columns
    case = _to(make_case(4, 21, 2, "labels", ignore_kind, ties=True, seed=21))
    assert_rank_sums_close(rank_sums_and_grad(case, "triton", step), rank_sums_and_grad(case, "naive", step))


@pytest.mark.parametrize("step", STEPS)
def test_wide_rows_many_positives(step):
    # several BLOCK_P tiles of positives and column tiles at the default launch configuration
    q, n = (3, 300) if not ON_GPU else (16, 1500)
    case = _to(make_case(q, n, 2, "bool", "mask", seed=22))
    assert_rank_sums_close(rank_sums_and_grad(case, "triton", step), rank_sums_and_grad(case, "torch", step))


# --------------------------------------------------------------------------- determinism


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
    ref = rank_sums_and_grad(case, "triton", "sigmoid")
    monkeypatch.setenv("FASTRANK_TRITON_FAST", "1")
    got = rank_sums_and_grad(case, "triton", "sigmoid")
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_kernel_api_validation():
    prm = StepParams(SIGMOID)
    s = torch.rand(3, 5, device=DEVICE)
    pos = torch.tensor([[0, 1], [2, -1], [-1, -1]], device=DEVICE)
    check_common_arguments(tk.forward, s, pos, prm)
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
        bound = 2 * max_err(nv, r)
        if not bound < float("inf"):  # NaN or inf
            bound = 0.0
        if dtype != torch.float32:
            bound = max(bound, 2 * max_err(n32, r) + eps * r.abs().max().item())
        assert max_err(x, r) <= bound + 1e-6, (max_err(x, r), bound)


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
        assert max_err(fast[k], ref[k]) <= 2.5e-4 * n + 2 * max_err(exact[k], ref[k])
    # the gradient uses ex2.approx and div.approx: close to the exact path
    assert max_err(fast[2], ref[2]) <= 1e-4 * ref[2].abs().max().item() + 2 * max_err(exact[2], ref[2])
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
    ra, rp, g = rank_sums_and_grad(case, "triton", step)
    ra0, rp0, g0 = rank_sums_and_grad(_to(case, dtype=torch.float64), "torch", step)
    assert max_err(ra, ra0) <= 1e-6 * ra0.abs().max().item() * 4099 ** 0.5
    assert max_err(rp, rp0) <= 1e-3
    assert max_err(g, g0) <= 1e-5 * g0.abs().max().item() * 4099 ** 0.5
