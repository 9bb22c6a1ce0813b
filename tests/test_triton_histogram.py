"""Triton soft-histogram kernels (histogram AP, docs/design.md §1.3): the kernel API against the fp64
naive (Q, N, L) tensor and the torch backward, the launch configuration (tiles, bin blocks, the split
forward), AOT compilation. Triton through the public API, like every backend: tests/test_histogram.py.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports the
kernels, and they run in Triton's interpreter on CPU tensors (small shapes: it is slow).
With a GPU the same tests run on CUDA tensors (autotuned launches), and the GPU-only tests
(fp32 / half precision against fp64, large shapes, the split forward) run too.
"""
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is not importable: the Triton backend cannot be tested here")

import torch  # noqa: E402

import fastrank  # noqa: E402
from fastrank.core.params import HistParams  # noqa: E402
from fastrank.core.problem import build_problem, dense_valid_mask  # noqa: E402
from fastrank.histogram.chunked import backward as torch_histograms_backward  # noqa: E402
from fastrank.histogram.naive import forward as naive_histograms  # noqa: E402

from .cases import HIST_CONFIGS as CONFIGS  # noqa: E402
from .cases import Case, assert_histogram_ap_close, bin_kinks_case, histogram_ap_and_grad, make_case  # noqa: E402
from .cases import histogram_params as _params  # noqa: E402
from .cases import max_err, poisoned_rows_case  # noqa: E402
from .cases import to_device as _to_device  # noqa: E402
from .conftest import TRITON_DEVICE as DEVICE  # noqa: E402
from .conftest import TRITON_ON_GPU as ON_GPU  # noqa: E402
from .conftest import compile_ahead_of_time, requires  # noqa: E402
from .conftest import triton_gpu_only as gpu_only  # noqa: E402
from .kernel_api import check_common_arguments  # noqa: E402

pytestmark = requires("triton")

tk = pytest.importorskip("fastrank.triton_kernels.histogram")


def _to(case: Case, dtype=None) -> Case:
    return _to_device(case, DEVICE, dtype)


def _assert_matches_naive(case: Case, config: str):
    got = histogram_ap_and_grad(case, config, "triton")
    assert_histogram_ap_close(got, histogram_ap_and_grad(case, config, "naive"))


def _problem(case: Case):
    q, n = case.scores.shape
    return build_problem(case.target, case.ignore, q, n, case.scores.device)


def _assert_kernels_match_torch(case: Case, prm: HistParams, seed: int = 0):
    """Both histograms against the naive tensor; the backward with random incoming gradients
    (h_all and h_pos separately weighted) against the pure-torch backward."""
    pb = _problem(case)
    h_all, h_pos = tk.forward(case.scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    r_all, r_pos = naive_histograms(case.scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    torch.testing.assert_close(h_all, r_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_pos, r_pos, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(seed)
    ga = torch.randn(h_all.shape, generator=g, dtype=torch.float64).to(DEVICE)
    gp = torch.randn(h_pos.shape, generator=g, dtype=torch.float64).to(DEVICE)
    got = tk.backward(ga, gp, case.scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    ref = torch_histograms_backward(ga, gp, case.scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.fixture
def small_blocks(monkeypatch):
    """Interpreter: tiny blocks, so small shapes run the multi-tile loops, several bin-blocks per
    query (more bins than BLOCK_L), several positives programs, and the split forward."""
    monkeypatch.setattr(tk, "INTERPRETER_MAX_BLOCK_K", 8)
    monkeypatch.setattr(tk, "INTERPRETER_MAX_BLOCK_P", 4)
    monkeypatch.setattr(tk, "INTERPRETER_SPLIT", 3)
    monkeypatch.setattr(tk, "MAX_BLOCK_L", 8)


# --------------------------------------------------------------------------- kernels, tiles and bin blocks


@pytest.mark.parametrize("config", ["fastap", "softbin"])
def test_bin_centres_and_edges_use_torch_derivative_conventions(config):
    # the kinks and open ends of bin_kinks_case (through the public API: tests/test_histogram.py)
    _assert_kernels_match_torch(_to(bin_kinks_case(config)), _params(config))


@pytest.mark.parametrize("config", ["fastap", "softbin"])
@pytest.mark.parametrize("ignore_kind", ["index", "mask"])
def test_multi_tile_split_and_bin_blocks(small_blocks, config, ignore_kind):
    # (GPU: the autotuner's blocks) N = 21: three column tiles per split, P ~ 10: three positives
    # programs, the last partly holes; L = 11 or 25 bins in blocks of 8
    case = _to(make_case(4, 21, 2, "labels", ignore_kind, ties=True, seed=21))
    _assert_kernels_match_torch(case, _params(config))
    _assert_matches_naive(case, config)


# --------------------------------------------------------------------------- NaN, determinism


@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_nan_rows(ignore_kind):
    case = poisoned_rows_case(5, 13, ignore_kind, DEVICE)
    s = case.scores
    pb = _problem(case)
    valid = dense_valid_mask(5, 13, pb.ignore_idx, pb.ignore_mask, DEVICE)
    for config in ("fastap", "softbin"):
        prm = _params(config)
        h_all, h_pos = tk.forward(s, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
        assert torch.isnan(h_all[0]).all() and torch.isnan(h_pos[0]).all()
        assert torch.isfinite(h_all[1:]).all() and torch.isfinite(h_pos[1:]).all()
        ga = torch.rand_like(h_all)
        gp = torch.rand_like(h_pos)
        grad = tk.backward(ga, gp, s, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
        assert torch.isnan(grad[0][valid[0]]).all() and (grad[0][~valid[0]] == 0).all()
        assert torch.isfinite(grad[1:]).all()
        # the other rows: exactly what they give without the poisoned row
        clean = s.clone()
        clean[0] = 0.0
        if ignore_kind != "none":
            clean[1, 3] = 0.0  # ignored: its value does not matter
        r_all, r_pos = naive_histograms(clean, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
        torch.testing.assert_close(h_all[1:], r_all[1:], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_pos[1:], r_pos[1:], rtol=1e-12, atol=1e-12)
        ref = torch_histograms_backward(ga, gp, clean, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
        torch.testing.assert_close(grad[1:], ref[1:], rtol=1e-12, atol=1e-12)
        if fastrank.backends()["cpp"].available:  # same NaN convention as the C++ kernel
            cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
            args = (s.cpu(), pb.pos_idx.cpu(), cpu(pb.ignore_idx), cpu(pb.ignore_mask)) + prm.as_op_args()
            c_all, c_pos = torch.ops.fastrank.histogram_fwd(*args)
            c_grad = torch.ops.fastrank.histogram_bwd(ga.cpu(), gp.cpu(), *args)
            torch.testing.assert_close(h_all.cpu(), c_all, equal_nan=True)
            torch.testing.assert_close(h_pos.cpu(), c_pos, equal_nan=True)
            torch.testing.assert_close(grad.cpu(), c_grad, equal_nan=True)
    ap = fastrank.histogram_ap(s, case.target, ignore=case.ignore, backend="triton", reduction="none")
    assert torch.isnan(ap[0]) and torch.isfinite(ap[1:]).all()


@pytest.mark.parametrize("config", ["fastap", "softbin"])
def test_backward_is_bitwise_reproducible(config):
    q, n = (24, 61) if not ON_GPU else (256, 3001)
    kind, bins, rng = CONFIGS[config]
    for dtype in (torch.float32, torch.float64):
        case = _to(make_case(q, n, 7, "labels", "self", seed=9, dtype=dtype))

        def grad(c=case):
            s = c.scores.clone().requires_grad_()
            fastrank.histogram_ap(s, c.target, kind=kind, bins=bins, range=rng, ignore=c.ignore,
                                  backend="triton").backward()
            return s.grad

        assert torch.equal(grad(), grad())


# --------------------------------------------------------------------------- the kernel API


def test_kernel_api_strides_gradient_forms_and_holes():
    case = _to(make_case(9, 23, 3, "bool", "mask", seed=3))
    ign_idx = torch.randint(-1, 23, (9,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    q, n = case.scores.shape
    pos_idx = build_problem(case.target, case.ignore, q, n, DEVICE).pos_idx
    pos_idx = torch.where(pos_idx != ign_idx.unsqueeze(1), pos_idx, -1)  # holes in the middle of rows
    pos_idx = torch.cat([pos_idx, torch.full((q, 2), -1, device=DEVICE)], 1)  # and trailing holes
    prm = _params("softbin")
    s_t = case.scores.t().contiguous().t()  # column-major storage
    assert not s_t.is_contiguous()
    h_all, h_pos = tk.forward(s_t, pos_idx, ign_idx, case.ignore, prm)
    r_all, r_pos = naive_histograms(case.scores, pos_idx, ign_idx, case.ignore, prm)
    torch.testing.assert_close(h_all, r_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_pos, r_pos, rtol=1e-12, atol=1e-12)
    # a stride-0 (expanded) incoming gradient, as autograd hands out for sums, and a transposed one
    ga = torch.randn(q, 1, dtype=torch.float64, device=DEVICE).expand(h_all.shape)
    gp = torch.randn(prm.bins, q, dtype=torch.float64, device=DEVICE).t()
    g = tk.backward(ga, gp, s_t, pos_idx, ign_idx, case.ignore, prm)
    g0 = torch_histograms_backward(ga, gp, case.scores, pos_idx, ign_idx, case.ignore, prm)
    torch.testing.assert_close(g, g0, rtol=1e-12, atol=1e-12)
    assert g.is_contiguous() and g.dtype == torch.float64
    # None stands for a zero gradient
    g_none = tk.backward(None, gp, s_t, pos_idx, ign_idx, case.ignore, prm)
    g_zero = tk.backward(torch.zeros_like(ga), gp, s_t, pos_idx, ign_idx, case.ignore, prm)
    assert torch.equal(g_none, g_zero)
    assert not tk.backward(None, None, s_t, pos_idx, ign_idx, case.ignore, prm).any()


def test_kernel_api_empty_shapes():
    prm = _params("fastap")
    s = torch.rand(3, 5, dtype=torch.float64, device=DEVICE)
    no_pos = torch.empty(3, 0, dtype=torch.int64, device=DEVICE)
    h_all, h_pos = tk.forward(s, no_pos, None, None, prm)
    assert h_all.shape == h_pos.shape == (3, prm.bins) and not h_pos.any()
    torch.testing.assert_close(h_all, naive_histograms(s, no_pos, None, None, prm)[0], rtol=1e-12, atol=1e-12)
    g = tk.backward(torch.zeros_like(h_all), torch.ones_like(h_pos), s, no_pos, None, None, prm)
    assert g.shape == (3, 5) and not g.any()
    all_holes = torch.full((3, 2), -1, dtype=torch.int64, device=DEVICE)
    _, h_pos = tk.forward(s, all_holes, None, None, prm)
    assert not h_pos.any()
    g = tk.backward(torch.zeros_like(h_all), torch.ones_like(h_pos), s, all_holes, None, None, prm)
    assert not g.any()
    for shape in ((0, 5), (3, 0)):
        s0 = torch.rand(shape, dtype=torch.float64, device=DEVICE)
        pos = torch.full((shape[0], 1), -1, dtype=torch.int64, device=DEVICE)
        h_all, _ = tk.forward(s0, pos, None, None, prm)
        assert h_all.shape == (shape[0], prm.bins) and not h_all.any()
        assert tk.backward(None, None, s0, pos, None, None, prm).shape == shape


def test_half_inputs_are_binned_in_fp32():
    # the kernels read float16/bfloat16 scores themselves and accumulate in float32
    case = make_case(6, 40, 3, "labels", "index", seed=2, dtype=torch.float32)
    pb = build_problem(tuple(t.to(DEVICE) for t in case.target), case.ignore.to(DEVICE), 6, 40, DEVICE)
    prm = _params("softbin")
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        s = case.scores.to(DEVICE, dt)
        h_all, h_pos = tk.forward(s, pb.pos_idx, pb.ignore_idx, None, prm)
        r_all, r_pos = naive_histograms(s.double(), pb.pos_idx, pb.ignore_idx, None, prm)
        assert h_all.dtype == h_pos.dtype == dt
        # float32 sums rounded once to the dtype
        tol = {"rtol": 1e-5 if dt == torch.float32 else torch.finfo(dt).eps, "atol": 1e-5}
        torch.testing.assert_close(h_all.double(), r_all, **tol)
        torch.testing.assert_close(h_pos.double(), r_pos, **tol)
        ga, gp = torch.randn_like(r_all), torch.randn_like(r_pos)
        g = tk.backward(ga.to(dt), gp.to(dt), s, pb.pos_idx, pb.ignore_idx, None, prm)
        g0 = torch_histograms_backward(ga.to(dt).double(), gp.to(dt).double(), s.double(), pb.pos_idx,
                                       pb.ignore_idx, None, prm)
        assert g.dtype == dt
        # the slopes are exactly 0 or +-1: the float32 result is exact up to rounding of scale * (b - a)
        torch.testing.assert_close(g.double(), g0, rtol=2 * torch.finfo(dt).eps, atol=1e-6)


def test_kernel_api_validation():
    prm = _params("fastap")
    s = torch.rand(3, 5, device=DEVICE)
    pos = torch.tensor([[0, 1], [2, -1], [-1, -1]], device=DEVICE)
    check_common_arguments(tk.forward, s, pos, prm)
    with pytest.raises(TypeError, match="params"):
        tk.forward(s, pos, None, None, (11, -5.0, 5.0, False))
    with pytest.raises(ValueError, match="bins"):
        tk.forward(s, pos, None, None, HistParams(1, 1.0, 0.0, True))
    with pytest.raises(ValueError, match="scale"):
        tk.forward(s, pos, None, None, HistParams(4, float("inf"), 0.0, True))
    z = torch.zeros(3, prm.bins, device=DEVICE)
    with pytest.raises(ValueError, match="grad_h_all"):
        tk.backward(z[:, :-1], z, s, pos, None, None, prm)
    with pytest.raises(TypeError, match="grad_h_pos"):
        tk.backward(z, z.to(torch.int64), s, pos, None, None, prm)
    if not ON_GPU:
        with pytest.raises(ValueError, match="CPU tensor"):
            tk.forward(s.to("meta"), pos, None, None, prm)


# --------------------------------------------------------------------------- GPU only


@gpu_only
@pytest.mark.parametrize("config", ["fastap", "softbin"])
@pytest.mark.parametrize("shape", [(512, 4099), (8, 100_003)], ids=["wide-grid", "split-forward"])
def test_fp32_against_fp64(config, shape):
    # autotuned launches on realistic shapes; (8, 100003) takes the split forward (few queries)
    q, n = shape
    case = _to(make_case(q, n, 40, "labels", "mask", seed=14, dtype=torch.float32))
    pb = _problem(case)
    prm = _params(config)
    s64 = case.scores.double()
    h_all, h_pos = tk.forward(case.scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    r_all, r_pos = naive_histograms(s64, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    # per item the weights are off by ~ulp(v) in float32, and bins hold up to ~n/4 of mass
    torch.testing.assert_close(h_all.double(), r_all, rtol=1e-5, atol=1e-7 * n)
    torch.testing.assert_close(h_pos.double(), r_pos, rtol=1e-5, atol=1e-7 * n)
    ga = torch.randn(r_all.shape, device=DEVICE)
    gp = torch.randn(r_pos.shape, device=DEVICE)
    g = tk.backward(ga, gp, case.scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    g0 = torch_histograms_backward(ga.double(), gp.double(), s64, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    # slopes are 0 or +-1, so the gradients agree except where float32 moves v across a bin centre
    bad = (g.double() - g0).abs() > 1e-5 * (1 + g0.abs())
    assert bad.float().mean().item() < 1e-3
    # the losses on top barely move
    kind = CONFIGS[config][0]
    if q * n < 1e7:
        a32 = fastrank.histogram_ap(case.scores, case.target, kind=kind, ignore=case.ignore, backend="triton")
        a64 = fastrank.histogram_ap(s64, case.target, kind=kind, ignore=case.ignore, backend="triton")
        assert abs(a32.item() - a64.item()) < 1e-4
    # and the split forward reproduces itself bitwise
    again = tk.forward(case.scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    assert torch.equal(again[0], h_all) and torch.equal(again[1], h_pos)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gpu(dtype):
    case = _to(make_case(64, 2000, 6, "labels", "self", seed=12))
    pb = _problem(case)
    prm = _params("softbin")
    s_lo = case.scores.to(dtype)
    h_all, h_pos = tk.forward(s_lo, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    # binned in float32 from the rounded scores, then rounded once to the dtype
    r_all, r_pos = naive_histograms(s_lo.double(), pb.pos_idx, pb.ignore_idx, pb.ignore_mask, prm)
    eps = torch.finfo(dtype).eps
    assert max_err(h_all, r_all) <= eps * r_all.abs().max().item() + 1e-3
    assert max_err(h_pos, r_pos) <= eps * r_pos.abs().max().item() + 1e-3


# --------------------------------------------------------------------------- AOT compilation (no GPU needed)

_AOT_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastrank.triton_kernels import histogram as tk

    def sig(fn, types, consts):
        out = {}
        for name in fn.arg_names:
            if name in consts:
                out[name] = "constexpr"
            elif name.endswith("_ptr"):
                out[name] = types[name]
            else:
                out[name] = "i64" if name.startswith("stride") else "i32"
        return out

    for st, acc in (("*fp32", "*fp32"), ("*fp64", "*fp64"), ("*bf16", "*fp32"), ("*fp16", "*fp32")):
        common = {"scores_ptr": st, "pos_idx_ptr": "*i64", "ign_idx_ptr": "*i64", "ign_mask_ptr": "*u8",
                  "params_ptr": acc, "nan_flag_ptr": "*i32", "grad_ptr": acc}
        launches = [
            (tk._hist_fwd_kernel, {"h_all_ptr": st, "h_pos_ptr": st},
             {"OPEN": True, "IGNORE": 3, "SPLIT": 1, "BLOCK_L": 32, "BLOCK_K": 128}, 4),
            (tk._hist_fwd_kernel, {"h_all_ptr": acc, "h_pos_ptr": acc},
             {"OPEN": False, "IGNORE": 0, "SPLIT": 4, "BLOCK_L": 16, "BLOCK_K": 64}, 2),
            (tk._hist_bwd_cols_kernel, {"grad_all_ptr": st},
             {"OPEN": True, "IGNORE": 3, "BLOCK_K": 1024}, 4),
            (tk._hist_bwd_pos_kernel, {"grad_pos_ptr": st},
             {"OPEN": False, "IGNORE": 3, "BLOCK_P": tk._BLOCK_P, "BLOCK_N": tk._BLOCK_N}, 4),
        ]
        for fn, types, consts, warps in launches:
            src = ASTSource(fn=fn, signature=sig(fn, {**common, **types}, consts), constexprs=consts)
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            assert k.asm["cubin"], fn.__name__
    print("AOT-OK")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    # the interpreter never lowers the kernels: compile them ahead of time for an H100 (needs
    # only Triton's bundled ptxas, no GPU) in a process without TRITON_INTERPRET
    compile_ahead_of_time(_AOT_SCRIPT, timeout=600)
