"""The fused CUDA loss kernels (csrc/cuda/loss.cu, histogram_loss.cu, graded_loss.cu): ap_loss
(Smooth-AP, SupAP), recall_loss (SupRank, Patel et al.), histogram_ap_loss (FastAP, SoftBin) and
graded_loss (H-AP with the ordering key and the smoothed H-rank, NDCG) on backend="cuda", in a
fixed number of launches without host sync.

GPU tier: every test here needs a CUDA device and a CUDA build of fastrank (skipped otherwise, so
they run in `make gpu-check`). fp64 results are held to the naive cube at 1e-9 relative: the
kernels sum the same terms in a different (fixed) order, so fp64 agrees to ~1e-13 on these sizes,
and any wrong term, sign or derivative is off by far more.
"""
import functools

import pytest
import torch

import fastrank

from .cases import all_cases, assert_all_close, assert_within_naive_error, assert_zero_without_positives
from .cases import make_case, outputs_and_grad, to_device
from .conftest import requires
from .nan_rows import POISONED, nan_problem

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    requires("cuda"),
]

DEVICE = "cuda"

FNS = {
    "smooth_ap": fastrank.smooth_ap,
    "sup_ap": fastrank.sup_ap,
    # ks past the gallery (min(|P|, k)), a temp that makes the sigmoid around k steep
    "recall_suprank": functools.partial(fastrank.recall_at_k, ks=(1, 3, 40), temp=0.5),
    "recall_patel": functools.partial(fastrank.recall_at_k, ks=(1, 2, 8), variant="patel"),
    "recall_patel_suprank_step": functools.partial(fastrank.recall_at_k, ks=(2, 5), variant="patel", step="suprank"),
    "fastap": functools.partial(fastrank.histogram_ap, kind="fastap"),
    # soft bins over [-1, 1] with open ends: scores beyond either end land in the end bins
    "softbin": functools.partial(fastrank.histogram_ap, kind="softbin", bins=12, range=(-1.0, 1.0)),
}

CASES = all_cases()  # every shape, target form (labels, bool, int, float), ignore form, ties


def _to(case, dtype=None):
    return to_device(case, DEVICE, dtype)


def _value_and_grad(fn, case, backend, reduction="none", **kw):
    return outputs_and_grad(
        lambda s: fn(s, case.target, ignore=case.ignore, backend=backend, reduction=reduction, **kw), case.scores)


def _assert_fp64_close(got, ref):
    assert_all_close(got, ref, rtol=1e-9, atol=1e-11, grad_rtol=1e-9, grad_atol=1e-10)


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fused_cuda_equals_naive(name, case):
    case = _to(case)
    _assert_fp64_close(_value_and_grad(FNS[name], case, "cuda"), _value_and_grad(FNS[name], case, "naive"))


@pytest.mark.parametrize("name", ["smooth_ap", "sup_ap", "recall_patel"])
@pytest.mark.parametrize("classes", [1500, 40])
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_split_rows_both_modes(name, classes, ignore_kind):
    # Q = 3 against N = 4500 columns: the sums kernel splits each row over C = 2 blocks (loss.cu
    # plan_loss: N / 2048 = 2). 1500 classes give rows of ~3 positives (fewer than C = 2 tiles of
    # 8: column chunks, partial sums reduced by the epilogue kernel), 40 classes ~110 (14 tiles
    # dealt to the two blocks). Reference: the cpp backend on the CPU (itself held to naive by test_fused.py),
    # since the naive cube at this size is 3 x 4500^2 fp64 per intermediate.
    case = make_case(3, 4500, classes, "labels", ignore_kind, ties=True, seed=classes)
    got = _value_and_grad(FNS[name], _to(case), "cuda")
    ref = _value_and_grad(FNS[name], case, "cpp")
    _assert_fp64_close(tuple(t.cpu() for t in got), ref)


@pytest.mark.parametrize("name", ["smooth_ap", "sup_ap", "recall_suprank"])
def test_float32_within_naive_error(name):
    case = make_case(40, 64, 9, "bool", "mask", seed=4)
    got = _value_and_grad(FNS[name], _to(case, torch.float32), "cuda")
    naive32 = _value_and_grad(FNS[name], _to(case, torch.float32), "naive")
    ref = _value_and_grad(FNS[name], _to(case), "naive")
    for g, n, r in zip(got, naive32, ref):
        assert_within_naive_error(g, n, r, slack=1e-5)


def test_infinite_scores_tie():
    # a tile with an infinite positive takes step_diff (equal infinities tie), as the CPU kernels
    case = make_case(7, 13, 3, "labels", "none", seed=21)
    case.scores[0, :3] = float("inf")
    case.scores[2, 5:7] = float("-inf")
    for name, fn in FNS.items():
        _assert_fp64_close(_value_and_grad(fn, _to(case), "cuda"), _value_and_grad(fn, case, "cpp"))


@pytest.mark.parametrize("name", ["sup_ap", "recall_suprank"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_equals_the_two_pass_cuda_path(name, reduction, monkeypatch):
    case = _to(CASES[5])
    fused = _value_and_grad(FNS[name], case, "cuda", reduction)
    monkeypatch.setenv("FASTRANK_FUSED", "0")
    two_pass = _value_and_grad(FNS[name], case, "cuda", reduction)
    _assert_fp64_close(fused, two_pass)


@pytest.mark.parametrize("module,fn", [("ap", fastrank.sup_ap), ("recall", fastrank.recall_at_k)])
def test_the_switch_selects_the_path(module, fn, monkeypatch):
    # the fused path never packs the problem on the host; FASTRANK_FUSED=0 does (build_problem)
    import importlib

    mod = importlib.import_module(f"fastrank.{module}")
    calls = []
    real = mod.build_problem
    monkeypatch.setattr(mod, "build_problem", lambda *a: calls.append(1) or real(*a))
    case = _to(CASES[3])
    fn(case.scores, case.target, ignore=case.ignore, backend="cuda")
    assert calls == []
    monkeypatch.setenv("FASTRANK_FUSED", "0")
    fn(case.scores, case.target, ignore=case.ignore, backend="cuda")
    assert calls == [1]


def test_gradcheck():
    case = _to(make_case(3, 5, 2, "labels", "mask", seed=13))
    for name in ("smooth_ap", "recall_suprank"):
        kw = {"tau": 0.5, **({"temp": 2.0} if name.startswith("recall") else {})}
        s = case.scores.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x: FNS[name](x, case.target, ignore=case.ignore, backend="cuda", reduction="none", **kw), (s,),
            eps=1e-6, atol=1e-7)


def test_no_positive_anywhere_gives_zero():
    s = torch.rand(4, 6, dtype=torch.float64, device=DEVICE)
    target = (torch.arange(4, device=DEVICE) + 10, torch.arange(6, device=DEVICE))
    for fn in FNS.values():
        assert_zero_without_positives(lambda x, t: fn(x, t, backend="cuda"), s, target)


def test_half_scores_are_computed_in_float32():
    case = make_case(13, 13, 4, "labels", "self", seed=2)
    half = _to(case, torch.float16)
    v = fastrank.sup_ap(half.scores, half.target, ignore=half.ignore, backend="cuda", reduction="none")
    ref = fastrank.sup_ap(half.scores.float(), half.target, ignore=half.ignore, backend="cuda", reduction="none")
    assert torch.equal(v, ref)
    # the op itself takes float32 / float64 only
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.fastrank.ap_loss(half.scores, half.target[0], half.target[1], None, None, None,
                                   1, 0.01, 0.0, 0.0, 0.0, 1.0, False)


def test_too_many_ks_is_refused():
    case = _to(CASES[3])
    with pytest.raises(ValueError, match="values of k"):
        fastrank.recall_at_k(case.scores, case.target, ks=tuple(range(1, 70)), backend="cuda")


def test_second_derivative_is_refused():
    case = _to(CASES[6])
    s = case.scores.clone().requires_grad_()
    v = fastrank.sup_ap(s, case.target, ignore=case.ignore, backend="cuda")
    (g,) = torch.autograd.grad(v, s, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        g.sum().backward()


def test_bitwise_reproducible():
    case = _to(make_case(9, 4500, 3, "labels", "self", seed=8, dtype=torch.float32))
    a = _value_and_grad(fastrank.smooth_ap, case, "cuda")
    b = _value_and_grad(fastrank.smooth_ap, case, "cuda")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_launch_count():
    # three kernels without the gradient, four with it, whatever the data (loss.cu)
    case = _to(CASES[7])
    names = ("compact_kernel", "sums_kernel", "epilogue_kernel", "grad_kernel")
    for requires_grad, expected in ((False, 3), (True, 4)):
        s = case.scores.clone().requires_grad_(requires_grad)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fastrank.sup_ap(s, case.target, ignore=case.ignore, backend="cuda")
            torch.cuda.synchronize()
        ours = [e for e in prof.events() if any(n in e.name for n in names) and "fastrank" in e.name]
        assert len(ours) == expected, [e.name for e in ours]


def test_histogram_is_one_launch():
    case = _to(CASES[7])
    for requires_grad in (False, True):
        s = case.scores.clone().requires_grad_(requires_grad)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fastrank.histogram_ap(s, case.target, kind="fastap", ignore=case.ignore, backend="cuda")
            torch.cuda.synchronize()
        ours = [e for e in prof.events() if "hist_loss_kernel" in e.name]
        assert len(ours) == 1, [e.name for e in prof.events()]


@pytest.mark.parametrize("kind", ["fastap", "softbin"])
@pytest.mark.parametrize("ignore_kind", ["none", "mask"])
def test_histogram_split_rows_equal_naive_in_three_launches(kind, ignore_kind):
    # 3 queries against 9000 columns: each row split over column chunks (histogram_loss.cu,
    # hist_part / hist_finish / hist_grad), a query without positives and a NaN row among them
    g = torch.Generator().manual_seed(30)
    s = torch.randn(4, 9000, generator=g, dtype=torch.float64).clamp(-3, 3) / 3
    qlab, glab = torch.tensor([0, 1, 7, 2]), torch.randint(0, 3, (9000,), generator=g)
    s[3, 5] = float("nan")
    ignore = None if ignore_kind == "none" else torch.rand(4, 9000, generator=g) < 0.1
    if ignore is not None:
        ignore[3, 5] = False  # the NaN stays a valid score
    kw = dict(kind=kind, bins=20, range=(-1.0, 1.0)) if kind == "softbin" else dict(kind=kind)
    out = []
    for backend, dev in (("cuda", DEVICE), ("naive", "cpu")):
        x = s.to(dev).clone().requires_grad_()
        v = fastrank.histogram_ap(x, (qlab.to(dev), glab.to(dev)), ignore=None if ignore is None else ignore.to(dev),
                                  backend=backend, reduction="none", **kw)
        (gr,) = torch.autograd.grad(v[:3].sum(), x)  # the NaN row's gradient is the NaN tests' business
        out.append((v.cpu(), gr[:3].cpu()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-9, atol=1e-11, equal_nan=True)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-9, atol=1e-10)
    assert torch.isnan(out[0][0][3]) and out[0][0][2] == 0
    for requires_grad, expected in ((False, 2), (True, 3)):
        x = s.to(DEVICE).clone().requires_grad_(requires_grad)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fastrank.histogram_ap(x, (qlab.to(DEVICE), glab.to(DEVICE)), backend="cuda", **kw)
            torch.cuda.synchronize()
        ours = [e for e in prof.events() if any(n in e.name for n in ("hist_part", "hist_finish", "hist_grad"))]
        assert len(ours) == expected, [e.name for e in prof.events()]


@pytest.mark.parametrize("kind", ["fastap", "softbin"])
def test_histogram_many_bins_take_the_two_pass_kernels(kind):
    # past kMaxFusedBins the fused op refuses (its histograms live in shared memory); the public
    # function takes the two-pass kernels instead, with the same numbers
    case = _to(make_case(6, 40, 3, "labels", "index", seed=5))
    got = _value_and_grad(functools.partial(fastrank.histogram_ap, kind=kind, bins=300), case, "cuda")
    ref = _value_and_grad(functools.partial(fastrank.histogram_ap, kind=kind, bins=300), case, "naive")
    _assert_fp64_close(got, ref)
    with pytest.raises(ValueError, match=r"bins must lie in \[2, 256\]"):
        torch.ops.fastrank.histogram_ap_loss(case.scores, case.target[0], case.target[1], None, None, None, 300,
                                             1.0, 0.0, True, 0, False)


# --------------------------------------------------------------------------- NaN and invalid entries


@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_nan_in_nan_out(ignore_kind):
    s, target, ignore = nan_problem(ignore_kind)
    case = _to(type(CASES[0])("nan", s, target, ignore))
    for fn in FNS.values():
        x = case.scores.clone().requires_grad_()
        v = fn(x, case.target, ignore=case.ignore, backend="cuda", reduction="none")
        assert torch.equal(torch.isnan(v).cpu(), POISONED)
        ref = fn(case.scores, case.target, ignore=case.ignore, backend="naive", reduction="none")
        torch.testing.assert_close(v[~POISONED.cuda()], ref[~POISONED.cuda()], rtol=1e-9, atol=1e-11)
        (g,) = torch.autograd.grad(v.sum(), x)
        assert torch.isfinite(g[~POISONED.cuda()]).all()  # row i's gradient comes from query i alone
        assert torch.isnan(g[0]).any()  # query 0 has positives: its NaN reaches its gradient
        assert torch.equal(g[1], torch.zeros_like(g[1]))  # query 1 has none: its score is a constant NaN
        assert torch.isnan(fn(case.scores, case.target, ignore=case.ignore, backend="cuda")).item()


def test_invalid_entries_make_their_query_nan():
    # an ignore index outside [-1, N) and a NaN relevance are flagged inside the kernels (no host
    # sync, so no exception): the query they belong to is NaN, the others are unaffected
    case = _to(make_case(5, 9, 2, "float", "index", seed=3))
    ign = case.ignore.clone()
    ign[1] = 9
    ign[3] = -2
    rel = case.target.clone()
    rel[2, 4] = float("nan")
    bad = torch.tensor([False, True, True, True, False], device=DEVICE)
    for fn in FNS.values():
        x = case.scores.clone().requires_grad_()
        v = fn(x, rel, ignore=ign, backend="cuda", reduction="none")
        assert torch.equal(torch.isnan(v), bad)
        good_ign = torch.where(bad, -1, ign)
        ref = fn(case.scores, torch.nan_to_num(rel), ignore=good_ign, backend="naive", reduction="none")
        torch.testing.assert_close(v[~bad], ref[~bad], rtol=1e-9, atol=1e-11)
        (g,) = torch.autograd.grad(v.sum(), x)
        assert torch.isnan(g[bad]).all() and torch.isfinite(g[~bad]).all()


# --------------------------------------------------------------------------- no host sync, CUDA graphs


def _batch(b=256, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(b, 64, device=DEVICE, generator=g), dim=1)
    return emb, torch.arange(b, device=DEVICE) // 4


_CUDA_FUSED = {
    "sup_ap": lambda s, t, ig: fastrank.sup_ap(s, t, ignore=ig, backend="cuda"),
    "smooth_ap": lambda s, t, ig: fastrank.smooth_ap(s, t, ignore=ig, backend="cuda"),
    "recall_at_k": lambda s, t, ig: fastrank.recall_at_k(s, t, ignore=ig, backend="cuda"),
    "recall_patel": lambda s, t, ig: fastrank.recall_at_k(s, t, ignore=ig, variant="patel", backend="cuda"),
    "fastap": lambda s, t, ig: fastrank.histogram_ap(s, t, kind="fastap", ignore=ig, backend="cuda"),
    "softbin": lambda s, t, ig: fastrank.histogram_ap(s, t, kind="softbin", ignore=ig, backend="cuda"),
}


@pytest.mark.parametrize("loss", list(_CUDA_FUSED))
@pytest.mark.parametrize("target_kind", ["labels", "relevance"])
@pytest.mark.parametrize("ignore_kind", ["index", "mask"])
def test_fused_cuda_loss_has_no_host_sync(loss, target_kind, ignore_kind):
    emb, lab = _batch()
    target = (lab, lab) if target_kind == "labels" else (lab[:, None] == lab[None, :]).float()
    ig = torch.arange(256, device=DEVICE) if ignore_kind == "index" else torch.eye(256, dtype=torch.bool, device=DEVICE)
    _CUDA_FUSED[loss]((emb @ emb.T).requires_grad_(), target, ig).backward()  # warm: registrations, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = (emb @ emb.T).requires_grad_()
        _CUDA_FUSED[loss](s, target, ig).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert s.grad is not None and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("loss", list(_CUDA_FUSED))
def test_fused_cuda_loss_cuda_graph_replay_equals_eager(loss):
    emb, lab = _batch(seed=2)
    static = (emb @ emb.T).detach().clone().requires_grad_()
    eager = _CUDA_FUSED[loss](static, lab, None)
    (g_eager,) = torch.autograd.grad(eager, static)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            torch.autograd.grad(_CUDA_FUSED[loss](static, lab, None), static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _CUDA_FUSED[loss](static, lab, None)
        (g_out,) = torch.autograd.grad(out, static)
    with torch.no_grad():
        static.copy_(emb @ emb.T)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(g_out, g_eager)  # no float atomics: bitwise
    # new inputs in the same buffer: the replay follows them
    emb2, _ = _batch(seed=3)
    with torch.no_grad():
        static.copy_(emb2 @ emb2.T)
    graph.replay()
    ref = _CUDA_FUSED[loss](static.detach().clone().requires_grad_(), lab, None)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def _direct(**over):
    s = torch.rand(4, 6, dtype=torch.float64, device=DEVICE)
    kw = dict(scores=s, query_labels=torch.arange(4, device=DEVICE), gallery_labels=torch.arange(6, device=DEVICE) % 3,
              relevance=None, ignore_idx=None, ignore_mask=None)
    kw.update(over)
    return torch.ops.fastrank.ap_loss(*kw.values(), 1, 0.01, 100.0, 0.05, 0.5, 1.5, True)


# the overrides as functions: tensors on the GPU cannot be built while pytest collects without one
@pytest.mark.parametrize("over,err,msg", [
    (lambda: dict(query_labels=None, gallery_labels=None), ValueError, "either query_labels"),
    (lambda: dict(query_labels=torch.arange(5, device=DEVICE)), ValueError, r"query_labels must have shape \(4,\)"),
    (lambda: dict(gallery_labels=torch.rand(6, device=DEVICE)), TypeError, "gallery_labels must be an integer tensor"),
    (lambda: dict(ignore_mask=torch.zeros(4, 5, dtype=torch.bool, device=DEVICE)), ValueError, "ignore_mask must be"),
    (lambda: dict(query_labels=torch.arange(4)), ValueError, "on the device of scores"),
])
def test_direct_calls_check_the_layout(over, err, msg):
    with pytest.raises(err, match=msg):
        _direct(**over())


def test_direct_call_flags_values_instead_of_raising():
    # the CUDA op does not sync to check values: the bad query is NaN, the others are finite
    score, n_pos, rows = _direct(ignore_idx=torch.tensor([0, 1, 9, 0], device=DEVICE))
    assert torch.equal(torch.isnan(score).cpu(), torch.tensor([False, False, True, False]))
    assert torch.isnan(rows[2]).all() and torch.isfinite(rows[[0, 1, 3]]).all()
    rel = torch.ones(4, 6, device=DEVICE)
    rel[1, 2] = float("nan")
    score, _, _ = _direct(query_labels=None, gallery_labels=None, relevance=rel)
    assert torch.equal(torch.isnan(score).cpu(), torch.tensor([False, True, False, False]))


# --------------------------------------------------------------------------- graded loss (graded_loss.cu)


def _graded_problem(q=37, n=301, seed=20, dtype=torch.float64):
    """Scores with ties, a graded relevance with many zeros and ties, and an ordering key that is
    not monotone in it (HAPPIER's levels against its "pop" weights)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(q, n, generator=g, dtype=torch.float64).round(decimals=1)
    levels = torch.randint(0, 3, (q, n), generator=g).double()
    rel = torch.where(levels > 0, torch.rand(q, n, generator=g, dtype=torch.float64) + 0.1, torch.zeros_like(levels))
    rel[:, ::5] = 0.7  # ties in the relevance
    rel[3] = 0  # a query without ranked items
    return s.to(DEVICE, dtype), rel.to(DEVICE, dtype), levels.to(DEVICE, dtype)


_GRADED = {
    "h_ap_suprank": (fastrank.h_ap, dict(step="suprank")),
    "h_ap_sigmoid": (fastrank.h_ap, dict(step="sigmoid", tau=0.05)),
    "h_ap_hrank": (fastrank.h_ap, dict(step="suprank", with_hrank=True, beta=25.0, gamma=0.5, leak=10.0)),
    "h_ap_hrank_step": (fastrank.h_ap, dict(step="suprank", with_hrank=True, beta=25.0, gamma=2.0, leak=0.0)),
    "ndcg_suprank": (fastrank.ndcg, dict(step="suprank")),
    "ndcg_sigmoid": (fastrank.ndcg, dict(step="sigmoid", tau=0.05)),
}


@pytest.mark.parametrize("name", _GRADED)
@pytest.mark.parametrize("with_key", [False, True])
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
@pytest.mark.parametrize("n", [1, 301])
def test_fused_cuda_graded_equals_naive(name, with_key, ignore_kind, n):
    _check_graded_against_naive(name, with_key, ignore_kind, n, q=37)


@pytest.mark.parametrize("name", _GRADED)
def test_fused_cuda_graded_split_rows_equal_naive(name):
    # 4100 columns against 3 queries: each row split over column chunks (graded_loss.cu, kernel 2)
    _check_graded_against_naive(name, True, "mask", 4100, q=3)


def _check_graded_against_naive(name, with_key, ignore_kind, n, q):
    fn, kw = _GRADED[name]
    s, rel, levels = _graded_problem(q=q, n=n)
    ignore = {"none": None, "index": torch.arange(q, device=DEVICE) % n,
              "mask": torch.rand(q, n, generator=torch.Generator().manual_seed(1)).to(DEVICE) < 0.2}[ignore_kind]
    key = levels if with_key else None
    out = []
    for backend, dev in (("cuda", DEVICE), ("naive", "cpu")):
        x = s.to(dev).clone().requires_grad_()
        v = fn(x, rel.to(dev), key=None if key is None else key.to(dev), ignore=None if ignore is None else
               ignore.to(dev), backend=backend, reduction="none", **kw)
        (gr,) = torch.autograd.grad(v.sum(), x)
        out.append((v.cpu(), gr.cpu()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-9, atol=1e-10)


def test_fused_cuda_graded_is_the_op_and_four_launches():
    s, rel, levels = _graded_problem(dtype=torch.float32)
    names = ("compact_kernel", "sums_kernel", "epilogue_kernel", "grad_kernel")
    for requires_grad, expected in ((False, 3), (True, 4)):
        x = s.clone().requires_grad_(requires_grad)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fastrank.h_ap(x, rel, key=levels, backend="cuda")
            torch.cuda.synchronize()
        ours = [e for e in prof.events() if any(n in e.name for n in names) and "graded_loss" in e.name]
        assert len(ours) == expected, [e.name for e in prof.events()]


def test_fused_cuda_graded_flags_invalid_rows():
    s, rel, levels = _graded_problem(dtype=torch.float64)
    rel, levels, s = rel.clone(), levels.clone(), s.clone()
    rel[0, 5] = -1.0  # negative relevance
    levels[1, 7] = float("inf")  # a key that is not finite
    s[2, 0] = float("nan")  # a NaN score: NaN row
    x = s.clone().requires_grad_()
    v = fastrank.h_ap(x, rel, key=levels, backend="cuda", reduction="none")
    (g,) = torch.autograd.grad(v.sum(), x)
    assert torch.isnan(v[:3]).all() and torch.isfinite(v[3:]).all()
    assert torch.isnan(g[:2]).all() and torch.isfinite(g[3:]).all()
    ref = fastrank.h_ap(s[3:].cpu(), rel[3:].cpu(), key=levels[3:].cpu(), backend="naive", reduction="none")
    torch.testing.assert_close(v[3:].cpu(), ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["h_ap_suprank", "h_ap_hrank", "ndcg_sigmoid"])
def test_fused_cuda_graded_has_no_host_sync_and_replays_in_a_graph(name):
    fn, kw = _GRADED[name]
    emb, lab = _batch(seed=4)
    levels = (lab[:, None] == lab[None, :]).float() + (lab[:, None] // 4 == lab[None, :] // 4).float()
    rel = levels * 0.5
    ig = torch.arange(256, device=DEVICE)
    static = (emb @ emb.T).detach().clone().requires_grad_()
    fn(static, rel, key=levels, ignore=ig, **kw).backward()  # warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = (emb @ emb.T).requires_grad_()
        fn(x, rel, key=levels, ignore=ig, **kw).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad).all()
    eager = fn(static, rel, key=levels, ignore=ig, **kw)
    (g_eager,) = torch.autograd.grad(eager, static)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            torch.autograd.grad(fn(static, rel, key=levels, ignore=ig, **kw), static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static, rel, key=levels, ignore=ig, **kw)
        (g_out,) = torch.autograd.grad(out, static)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(g_out, g_eager)
