"""The fused Triton histogram AP kernels (triton_kernels/histogram_loss.py): FastAP and SoftBin in a
fixed number of launches without host synchronisation.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports the kernels, and
they run in Triton's interpreter on CPU tensors (numpy: float64 is exact arithmetic in the same
order as on a GPU, so fp64 results are held to the naive (Q, N, L) tensor at 1e-10). With a GPU
the same tests run compiled.
"""

import pytest

pytest.importorskip("triton", reason="Triton is not importable: the Triton backend cannot be tested here")

import torch  # noqa: E402

import fastrank  # noqa: E402
from fastrank.histogram import histogram_params  # noqa: E402

from .cases import HIST_CONFIGS, Case, all_cases, assert_all_close, bin_kinks_case, make_case  # noqa: E402
from .cases import max_err, outputs_and_grad, to_device  # noqa: E402
from .conftest import TRITON_DEVICE as DEVICE  # noqa: E402
from .conftest import TRITON_ON_GPU as ON_GPU  # noqa: E402
from .conftest import compile_ahead_of_time, requires  # noqa: E402
from .nan_rows import POISONED, nan_problem  # noqa: E402
from .test_fused_histogram import _OUTSIDE, VARIANTS  # noqa: E402
from .test_triton_fused import _CountingKernel  # noqa: E402
from .test_triton_fused_graded import gpu_no_sync_and_graph_replay  # noqa: E402

pytestmark = requires("triton")

hl = pytest.importorskip("fastrank.triton_kernels.histogram_loss")
hh = pytest.importorskip("fastrank.triton_kernels.histogram")

KINDS = ("fastap", "softbin")

#: the interpreter is slow on small CPUs: every third shared case; compiled on a GPU, all of them
CASES = all_cases() if ON_GPU else all_cases()[::3]


def _to(case, dtype=None):
    return to_device(case, DEVICE, dtype)


def _value_and_grad(case, backend, kind, bins=None, rng=(0.0, 1.0), reduction="none"):
    return outputs_and_grad(
        lambda s: fastrank.histogram_ap(s, case.target, kind=kind, bins=bins, range=rng, ignore=case.ignore,
                                        backend=backend, reduction=reduction), case.scores)


def _assert_fp64_close(got, ref):
    assert_all_close(got, ref, rtol=1e-10, atol=1e-12, grad_rtol=1e-10, grad_atol=1e-11)


@pytest.fixture
def small_blocks(monkeypatch):
    """Interpreter: 4 columns per tile, 4 bins per bin block and per epilogue tile, 3 splits of a row's
    columns: small shapes run every multi-tile loop and the carried sums (GPU: its own blocks)."""
    monkeypatch.setattr(hh, "INTERPRETER_MAX_BLOCK_K", 4)
    monkeypatch.setattr(hh, "INTERPRETER_SPLIT", 3)
    monkeypatch.setattr(hh, "MAX_BLOCK_L", 4)
    monkeypatch.setattr(hl, "MAX_BLOCK_BINS", 4)


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fused_triton_equals_naive(kind, case):
    case = _to(case)
    _assert_fp64_close(_value_and_grad(case, "triton", kind), _value_and_grad(case, "naive", kind))


@pytest.mark.parametrize("kind,bins,rng", VARIANTS, ids=lambda v: repr(v))
def test_bins_ranges_and_scores_beyond_them(kind, bins, rng):
    # scores beyond the range (SoftBin: the open end bins; FastAP: mass lost), +-inf, bin centres
    case = _to(_OUTSIDE)
    got = _value_and_grad(case, "triton", kind, bins, rng)
    _assert_fp64_close(got, _value_and_grad(case, "naive", kind, bins, rng))
    assert (got[-1][torch.isinf(case.scores)] == 0).all()  # +-inf: beyond the ends, no gradient


@pytest.mark.parametrize("config", HIST_CONFIGS)
def test_bin_centres_and_open_ends(config):
    # v exactly an integer (derivative 0, torch's relu/abs convention) and exactly on the open ends
    kind, bins, rng = HIST_CONFIGS[config]
    case = _to(bin_kinks_case(config))
    _assert_fp64_close(_value_and_grad(case, "triton", kind, bins, rng),
                       _value_and_grad(case, "naive", kind, bins, rng))


@pytest.mark.parametrize("kind,bins,rng,ignore_kind", [("fastap", None, (0.0, 1.0), "index"),
                                                       ("softbin", 20, (-1.0, 1.0), "mask"),
                                                       ("softbin", 7, (-0.3, 0.5), "none")])
def test_multi_tile_rows_bins_and_splits(small_blocks, kind, bins, rng, ignore_kind):
    # N = 15: four column tiles over three splits (partials added in kernel 2); 11, 20 or 7 bins:
    # several bin blocks in kernel 1 and several epilogue tiles with carried prefix / suffix sums
    for classes, target in ((2, "labels"), (5, "float")):
        case = _to(make_case(5, 15, classes, target, ignore_kind, ties=True, seed=30 + classes))
        _assert_fp64_close(_value_and_grad(case, "triton", kind, bins, rng),
                           _value_and_grad(case, "naive", kind, bins, rng))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_equals_the_two_pass_triton_path(kind, reduction, monkeypatch):
    case = _to(CASES[4])
    fused = _value_and_grad(case, "triton", kind, reduction=reduction)
    monkeypatch.setenv("FASTRANK_FUSED", "0")
    two_pass = _value_and_grad(case, "triton", kind, reduction=reduction)
    _assert_fp64_close(fused, two_pass)


def test_the_switch_selects_the_path(monkeypatch):
    # the fused path never packs the problem on the host; FASTRANK_FUSED=0 does (build_problem)
    import fastrank.histogram as hist_mod

    calls = []
    real = hist_mod.build_problem
    monkeypatch.setattr(hist_mod, "build_problem", lambda *a: calls.append(1) or real(*a))
    case = _to(CASES[2])
    fastrank.histogram_ap(case.scores, case.target, ignore=case.ignore, backend="triton")
    assert calls == []
    monkeypatch.setenv("FASTRANK_FUSED", "0")
    fastrank.histogram_ap(case.scores, case.target, ignore=case.ignore, backend="triton")
    assert calls == [1]


def test_no_positive_anywhere_gives_zero():
    s = torch.rand(4, 6, dtype=torch.float64, device=DEVICE)
    target = (torch.arange(4, device=DEVICE) + 10, torch.arange(6, device=DEVICE))
    for kind in KINDS:
        x = s.clone().requires_grad_()
        loss = fastrank.histogram_ap(x, target, kind=kind, backend="triton")
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_bitwise_reproducible():
    case = _to(make_case(9, 40, 3, "labels", "self", seed=8, dtype=torch.float32))
    for kind in KINDS:
        a = _value_and_grad(case, "triton", kind)
        b = _value_and_grad(case, "triton", kind)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- NaN and invalid entries


@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_nan_in_nan_out(ignore_kind):
    s, target, ignore = nan_problem(ignore_kind)
    case = _to(Case("nan", s, target, ignore))
    for kind in KINDS:
        x = case.scores.clone().requires_grad_()
        v = fastrank.histogram_ap(x, case.target, kind=kind, ignore=case.ignore, backend="triton", reduction="none")
        assert torch.equal(torch.isnan(v).cpu(), POISONED)
        ref = fastrank.histogram_ap(case.scores, case.target, kind=kind, ignore=case.ignore, backend="naive",
                                    reduction="none")
        torch.testing.assert_close(v[~POISONED], ref[~POISONED], rtol=1e-10, atol=1e-12)
        (g,) = torch.autograd.grad(v.sum(), x)
        assert torch.isfinite(g[~POISONED]).all()  # row i's gradient comes from query i alone
        assert torch.isnan(g[0]).any()  # query 0 has positives: its NaN reaches its gradient
        assert torch.equal(g[1], torch.zeros_like(g[1]))  # query 1 has none: its AP is a constant NaN
        assert torch.isnan(fastrank.histogram_ap(case.scores, case.target, kind=kind, ignore=case.ignore,
                                                 backend="triton")).item()


def test_invalid_entries_make_their_query_nan():
    # an ignore index outside [-1, N) and a NaN relevance are checked inside the kernels (no host
    # sync, so no exception): the query they belong to is NaN, the others are unaffected
    case = _to(make_case(5, 9, 2, "float", "index", seed=3))
    ign = case.ignore.clone()
    ign[1] = 9
    ign[3] = -2
    rel = case.target.clone()
    rel[2, 4] = float("nan")
    bad = torch.tensor([False, True, True, True, False])
    for kind in KINDS:
        x = case.scores.clone().requires_grad_()
        v = fastrank.histogram_ap(x, rel, kind=kind, ignore=ign, backend="triton", reduction="none")
        assert torch.equal(torch.isnan(v).cpu(), bad)
        good_ign = torch.where(bad.to(ign.device), -1, ign)
        ref = fastrank.histogram_ap(case.scores, torch.nan_to_num(rel), kind=kind, ignore=good_ign, backend="naive",
                                    reduction="none")
        torch.testing.assert_close(v[~bad], ref[~bad], rtol=1e-10, atol=1e-12)
        (g,) = torch.autograd.grad(v.sum(), x)
        assert torch.isnan(g[bad]).all() and torch.isfinite(g[~bad]).all()
    # the other backends still raise: the ValueError is the host-synchronising path's
    with pytest.raises(ValueError, match="ignore"):
        fastrank.histogram_ap(case.scores, rel.nan_to_num(), ignore=ign, backend="naive")


# --------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_half_scores_straight_into_the_kernels(dtype, kind):
    # The kernels read half scores and compute in float32; the AP is float32, the gradient comes back
    # in the input dtype. Reference: fp64 on the same rounded inputs. Allowed: 2x the error of naive
    # float32 on those inputs (docs/design.md §3), plus, for the gradient, its one rounding to the
    # dtype (eps * max |gradient|).
    case = _to(make_case(12, 37, 3, "labels", "self", seed=40))
    s_lo = case.scores.to(dtype)
    got = _value_and_grad(Case("lo", s_lo, case.target, case.ignore), "triton", kind)
    naive32 = _value_and_grad(Case("n32", s_lo.float(), case.target, case.ignore), "naive", kind)
    ref = _value_and_grad(Case("ref", s_lo.double(), case.target, case.ignore), "naive", kind)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    assert max_err(got[0], ref[0]) <= 2 * max_err(naive32[0], ref[0]) + 1e-6
    eps = torch.finfo(dtype).eps
    assert max_err(got[1], ref[1]) <= 2 * max_err(naive32[1], ref[1]) + eps * ref[1].abs().max().item() + 1e-6


# --------------------------------------------------------------------------- launches


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_number_of_launches_whatever_the_data(monkeypatch, kind):
    log = []
    monkeypatch.setattr(hh, "INTERPRETER_SPLIT", 3)
    for k in ("_hist_kernel", "_epilogue_kernel", "_grad_kernel"):
        monkeypatch.setattr(hl, k, _CountingKernel(getattr(hl, k), log))
    few = _to(make_case(5, 12, 8, "labels", "index", seed=1))  # rows of 0-3 positives
    many = _to(make_case(5, 12, 1, "bool", "mask", seed=2))  # every item positive
    nan = _to(make_case(5, 12, 2, "float", "none", seed=3))
    nan.scores[2, 3] = float("nan")
    nan.target[4, 1] = float("nan")
    counts = []
    for case in (few, many, nan):
        for grad in (True, False):
            log.clear()
            s = case.scores.clone().requires_grad_(grad)
            v = fastrank.histogram_ap(s, case.target, kind=kind, ignore=case.ignore, backend="triton")
            if grad:
                v.backward()
            counts.append((grad, len(log)))
    assert counts == [(True, 3), (False, 2)] * 3


# --------------------------------------------------------------------------- the kernel API


@pytest.mark.parametrize("over,err,msg", [
    (dict(relevance=torch.ones(4, 6)), ValueError, "either query_labels and gallery_labels, or relevance"),
    (dict(gallery_labels=torch.rand(6)), TypeError, "gallery_labels"),
    (dict(ignore_idx=torch.zeros(4, dtype=torch.int32)), TypeError, "ignore_idx"),
    (dict(ignore_mask=torch.zeros(4, 6)), TypeError, "ignore_mask"),
    (dict(scores=torch.zeros(4, 6, dtype=torch.int32)), TypeError, "scores"),
    (dict(params="fastap"), TypeError, "params"),
    (dict(kind="map"), ValueError, "kind"),
])
def test_direct_calls_are_checked(over, err, msg):
    kw = dict(scores=torch.rand(4, 6, dtype=torch.float64), query_labels=torch.arange(4),
              gallery_labels=torch.arange(6) % 3, relevance=None, ignore_idx=None, ignore_mask=None,
              params=histogram_params("fastap", 10, (0.0, 1.0)))
    kind = over.pop("kind", "fastap")
    kw.update(over)
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with pytest.raises(err, match=msg):
        hl.hist_loss_rows(*kw.values(), kind=kind)


def test_direct_call_outputs():
    s = torch.rand(4, 6, dtype=torch.float64, device=DEVICE)
    lab = (torch.tensor([0, 1, 2, 9], device=DEVICE), torch.arange(6, device=DEVICE) % 3)
    prm = histogram_params("softbin", 25, (0.0, 1.0))
    ap, n_pos, rows = hl.hist_loss_rows(s, *lab, None, None, None, prm, kind="softbin", with_grad=False)
    assert rows.shape == (0, 6) and n_pos.tolist() == [2, 2, 2, 0] and n_pos.dtype == torch.int64
    ref = fastrank.histogram_ap(s, lab, kind="softbin", backend="naive", reduction="none")
    torch.testing.assert_close(ap, ref, rtol=1e-12, atol=1e-12)
    ap2, _, rows2 = hl.hist_loss_rows(s, *lab, None, None, None, prm, kind="softbin")
    assert rows2.shape == (4, 6) and torch.equal(ap, ap2)


# --------------------------------------------------------------------------- GPU: no host sync, CUDA graphs


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (Triton kernels compiled, not interpreted)")
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_no_host_sync_and_cuda_graph_replay(kind):
    labels = torch.arange(256, device="cuda") // 4
    gpu_no_sync_and_graph_replay(
        lambda s, ig: fastrank.histogram_ap(s, (labels, labels), kind=kind, ignore=ig, backend="triton"))


# --------------------------------------------------------------------------- AOT compilation (no GPU needed)

_AOT_SCRIPT = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastrank.triton_kernels import histogram_loss as hl

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

def compile_all(launches, common):
    for fn, consts in launches:
        src = ASTSource(fn=fn, signature=sig(fn, common, consts), constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert k.asm["cubin"], fn.__name__

for st, acc in (("*fp32", "*fp32"), ("*fp64", "*fp64"), ("*bf16", "*fp32"), ("*fp16", "*fp32")):
    for target, lab, rel in ((0, "*i64", "*fp32"), (1, "*i64", "*u8"), (1, "*i32", "*fp64")):
        common = {"scores_ptr": st, "qlab_ptr": lab, "glab_ptr": lab, "rel_ptr": rel, "ign_idx_ptr": "*i64",
                  "ign_mask_ptr": "*u8", "params_ptr": acc, "part_ptr": acc, "cnt_ptr": "*i32", "meta_ptr": "*i32",
                  "score_ptr": acc, "npos_ptr": "*i64", "gb_ptr": acc, "grad_ptr": acc}
        launches = []
        for open_ in (False, True):
            launches.append((hl._hist_kernel, {"OPEN": open_, "TARGET": target, "IGNORE": 3,
                                               "REL_FLOAT": rel.startswith("*fp"), "S": 2, "BLOCK_L": 16,
                                               "BLOCK_K": hl.GPU_TILE // 16}))
            launches.append((hl._grad_kernel, {"OPEN": open_, "TARGET": target, "IGNORE": 3,
                                               "BLOCK_K": hl.GPU_BLOCK_K_GRAD}))
        for kind in (0, 1):
            for grad in (False, True):
                launches.append((hl._epilogue_kernel, {"KIND": kind, "IGNORE": 3, "GRAD": grad, "S": 2,
                                                       "BLOCK_B": 32}))
        compile_all(launches, common)
print("AOT-OK")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    # the interpreter never lowers the kernels: compile every variant ahead of time for an H100
    # (Triton's bundled ptxas, no GPU) in a process without TRITON_INTERPRET
    compile_ahead_of_time(_AOT_SCRIPT)
