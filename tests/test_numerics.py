"""Numerical extremes: infinities, huge |d|/tau, tiny tau, all-equal scores, duplicates, half
precision near +-1. No NaN where the fp64 reference is finite; gradients finite."""
import pytest
import torch

import fastrank

from .cases import outputs_and_grad
from .conftest import AVAILABLE, CPU_BACKENDS, FUSED_CPU

FNS = {
    "smooth_ap": lambda s, t, b, **kw: fastrank.smooth_ap(s, t, backend=b, reduction="none", **kw),
    "sup_ap": lambda s, t, b, **kw: fastrank.sup_ap(s, t, backend=b, reduction="none", **kw),
    "recall": lambda s, t, b, **kw: fastrank.recall_at_k(s, t, backend=b, reduction="none", **kw),
    "fastap": lambda s, t, b, **kw: fastrank.histogram_ap(s, t, backend=b, reduction="none"),
}


def _vg(name, s, t, backend, **kw):
    """(per-query value, gradient of its sum) of FNS_ALL[name] (FNS and the ops added below)."""
    return outputs_and_grad(lambda x: FNS_ALL[name](x, t, backend, **kw), s, seed=None)


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("name", ["smooth_ap", "sup_ap", "recall"])
@pytest.mark.parametrize("tau", [1e-4, 1e-6])
def test_tiny_tau_and_huge_ratios(backend, name, tau):
    # |d| / tau up to ~2e6: sigma saturates (clamped exponent), H^- linear branch is large but finite
    g = torch.Generator().manual_seed(0)
    s = torch.rand(6, 20, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.rand(6, 20, generator=g) < 0.3
    v0, g0 = _vg(name, s, t, "naive", tau=tau)
    v1, g1 = _vg(name, s, t, backend, tau=tau)
    assert torch.isfinite(v1).all() and torch.isfinite(g1).all()
    torch.testing.assert_close(v1, v0, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g1, g0, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(FNS))
def test_all_equal_scores_and_duplicates(backend, name):
    s = torch.full((4, 9), 0.3, dtype=torch.float64)
    s[:, 5:] = 0.7  # two groups of exact duplicates
    t = torch.tensor([[1, 0, 1, 0, 0, 1, 0, 0, 1]] * 4)
    v, g = _vg(name, s, t, backend)
    v0, g0 = _vg(name, s, t, "naive")
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    torch.testing.assert_close(v, v0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g0, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["smooth_ap", "sup_ap", "recall"])
def test_infinite_scores_match_reference(backend, name):
    s = torch.tensor([[0.5, float("inf"), 0.1, -float("inf"), 0.3],
                      [0.2, 0.1, -float("inf"), 0.4, 0.0]], dtype=torch.float64)
    t = torch.tensor([[1, 0, 1, 0, 0], [1, 0, 0, 1, 0]])
    v0 = FNS[name](s, t, "naive")
    v1 = FNS[name](s, t, backend)
    assert torch.isfinite(v0).all(), "reference finite: a negative at +inf only pushes positives down"
    torch.testing.assert_close(v1, v0, rtol=1e-10, atol=1e-12)
    x = s.clone().requires_grad_()
    FNS[name](x, t, backend).sum().backward()
    assert not torch.isnan(x.grad).any()


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["smooth_ap", "sup_ap"])
def test_half_precision_near_one(backend, dtype, name):
    # scores packed near +1 (trained embeddings): fp16 spacing ~5e-4, bf16 ~4e-3 (~0.4 tau)
    g = torch.Generator().manual_seed(3)
    s64 = 1 - torch.rand(8, 40, generator=g, dtype=torch.float64) * 0.05
    t = torch.rand(8, 40, generator=g) < 0.25
    s = s64.to(dtype)
    ref, gref = _vg(name, s.double(), t, "naive")  # fp64 on the rounded inputs
    got, ggot = _vg(name, s, t, backend)
    naive_lp, gnaive = _vg(name, s, t, "naive")
    assert torch.isfinite(got).all() and torch.isfinite(ggot.float()).all()
    assert ggot.dtype == dtype
    err = (got.double() - ref).abs().max().item()
    err_naive = (naive_lp.double() - ref).abs().max().item()
    # ranked in fp32: far better than PyTorch's own half-precision cube
    assert err <= max(2 * err_naive, 1e-5), (err, err_naive)


# =========================================================================== hostile input: NaN through
# the modules (fastrank.losses). The functions' per-query contract is tested next to each function
# (tests/nan_rows.py); here, a query embedding that is NaN and has no positive in a separate gallery
# poisons only its own row, the case the mean used to swallow.

from fastrank import losses as _losses  # noqa: E402

from .nan_rows import NAN_BACKENDS  # noqa: E402

_LABEL_MODULES = {
    "SmoothAPLoss": _losses.SmoothAPLoss, "SupAPLoss": _losses.SupAPLoss, "RecallAtKLoss": _losses.RecallAtKLoss,
    "FastAPLoss": _losses.FastAPLoss, "SoftBinAPLoss": _losses.SoftBinAPLoss,
    "CalibrationLoss": _losses.CalibrationLoss, "ROADMAPLoss": _losses.ROADMAPLoss,
}


def _nan_query_without_positive():
    g = torch.Generator().manual_seed(21)
    emb = torch.randn(4, 8, generator=g, dtype=torch.float64)
    emb[3] = float("nan")
    ref = torch.randn(6, 8, generator=g, dtype=torch.float64)
    return emb, torch.tensor([0, 0, 1, 7]), ref, torch.tensor([0, 0, 1, 1, 2, 2])  # label 7: no positive


@pytest.mark.parametrize("backend", NAN_BACKENDS)
@pytest.mark.parametrize("name", sorted(_LABEL_MODULES))
def test_module_nan_query_without_positive_gives_nan(backend, name):
    emb, labels, ref, ref_labels = _nan_query_without_positive()
    kw = {} if name == "CalibrationLoss" else {"backend": backend}
    x = emb.clone().requires_grad_()
    loss = _LABEL_MODULES[name](**kw)(x, labels, ref, ref_labels)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isfinite(x.grad[:3]).all()  # the other queries train on


@pytest.mark.parametrize("backend", NAN_BACKENDS)
@pytest.mark.parametrize("module", [_losses.HAPLoss, _losses.NDCGLoss], ids=["HAPLoss", "NDCGLoss"])
def test_graded_module_nan_query_without_relevant_item_gives_nan(backend, module):
    emb, _, ref, _ = _nan_query_without_positive()
    rel = torch.zeros(4, 6, dtype=torch.float64)
    rel[0, :2], rel[1, 2], rel[2, 3] = 2.0, 1.0, 1.0  # query 3: nothing relevant
    assert torch.isnan(module(backend=backend)(emb, rel, ref))

# ---- infinite scores at ranked items, ties of equal infinities, fp16 overflow (every backend)

INF = float("inf")
ALL_BACKENDS = CPU_BACKENDS + [b for b in ("triton",) if b in AVAILABLE]
FNS_ALL = dict(FNS)
FNS_ALL.update({
    "recall_sigmoid": lambda s, t, b, **kw: fastrank.recall_at_k(s, t, backend=b, reduction="none",
                                                                 variant="patel", **kw),
    "softbin": lambda s, t, b, **kw: fastrank.histogram_ap(s, t, backend=b, reduction="none", kind="softbin",
                                                          range=(-1.0, 1.0)),
    "h_ap": lambda s, t, b, **kw: fastrank.h_ap(s, t, backend=b, reduction="none", **kw),
    "h_ap_sigmoid": lambda s, t, b, **kw: fastrank.h_ap(s, t, backend=b, reduction="none", step="sigmoid", **kw),
    "ndcg": lambda s, t, b, **kw: fastrank.ndcg(s, t, backend=b, reduction="none", **kw),
})
GRADED = ("h_ap", "h_ap_sigmoid", "ndcg")


def _inf_problem():
    """Rows with a ranked item at +inf, at -inf, two ranked items tied at +inf, a ranked item tied
    with a competitor at -inf, +inf and -inf competitors, and a row without infinities."""
    s = torch.tensor([
        [INF, 0.5, 0.1, -INF, 0.3, 0.2],
        [0.2, INF, -INF, 0.4, 0.0, -0.3],
        [INF, INF, 0.1, 0.7, -0.2, 0.4],
        [0.3, -INF, -INF, 0.6, INF, 0.1],
        [-INF, -INF, -INF, 0.2, 0.9, -0.5],
        [0.1, 0.4, -0.6, 0.3, 0.8, -0.1],
    ], dtype=torch.float64)
    rel = torch.tensor([
        [2, 0, 1, 0, 0, 1],
        [1, 0, 2, 1, 0, 0],
        [1, 2, 1, 0, 0, 0],
        [0, 1, 0, 2, 0, 1],
        [1, 2, 0, 0, 1, 0],
        [1, 0, 2, 0, 1, 0],
    ], dtype=torch.float64)
    return s, rel


def _target(name, rel):
    return rel if name in GRADED else rel > 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", sorted(FNS_ALL))
def test_infinite_ranked_items_match_reference(backend, name):
    s, rel = _inf_problem()
    t = _target(name, rel)
    v0, g0 = _vg(name, s, t, "naive")
    v1, g1 = _vg(name, s, t, backend)
    assert torch.isfinite(v0).all(), v0
    torch.testing.assert_close(v1, v0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, g0, rtol=1e-8, atol=1e-10)
    assert torch.isfinite(g1).all()


@pytest.mark.parametrize("name", ["smooth_ap", "sup_ap", "recall", "h_ap", "h_ap_sigmoid"])
def test_equal_infinities_are_ties(name):
    # the definition every backend shares (fastrank.core.step.score_diff): scores that compare equal
    # tie, infinities included, so items at +inf rank like items tied above every finite score
    s, rel = _inf_problem()
    t = _target(name, rel)
    top = s.masked_fill(s == INF, 1e6).masked_fill(s == -INF, -1e6)
    v_inf = FNS_ALL[name](s, t, "naive")
    v_big = FNS_ALL[name](top, t, "naive")
    assert torch.isfinite(v_inf).all()
    torch.testing.assert_close(v_inf, v_big, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", ["smooth_ap", "sup_ap", "h_ap", "ndcg", "fastap"])
def test_float16_limits_and_overflow(backend, name):
    # +-65504 (the largest float16) and scores that overflowed to +-inf
    s, rel = _inf_problem()
    s16 = s.masked_fill(s == INF, 7e4).masked_fill(s == -INF, -7e4).to(torch.float16)
    s16[5, 0], s16[5, 3] = 65504.0, -65504.0
    t = _target(name, rel)
    assert torch.isinf(s16).sum() == 12
    v0, g0 = _vg(name, s16.double(), t, "naive")
    v1, g1 = _vg(name, s16, t, backend)
    assert torch.isfinite(v1).all() and torch.isfinite(g1.float()).all()
    torch.testing.assert_close(v1.double(), v0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1.double(), g0, rtol=1e-3, atol=1e-4)


# ---- parameters at the edge of the compute dtype: rejected on every backend, not NaN


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype,tau", [(torch.float32, 1e-40), (torch.float16, 1e-39), (torch.float32, 1e39),
                                       (torch.float64, 1e-310)])
def test_tau_whose_reciprocal_overflows_is_rejected(backend, dtype, tau):
    s = torch.rand(3, 5, dtype=torch.float64).to(dtype)
    t = torch.rand(3, 5) < 0.5
    for fn in (fastrank.smooth_ap, fastrank.sup_ap, fastrank.recall_at_k):
        with pytest.raises(ValueError, match=r"`tau` must lie in"):
            fn(s, t, tau=tau, backend=backend)
    with pytest.raises(ValueError, match=r"fastrank.h_ap: `tau` must lie in"):
        fastrank.h_ap(s, t.double(), tau=tau, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_parameters_not_finite_in_float32_are_rejected(backend):
    s = torch.rand(3, 5)
    t = torch.rand(3, 5) < 0.5
    for kw in (dict(rho=1e39), dict(delta=1e39), dict(start=-1e39), dict(offset=1e39)):
        with pytest.raises(ValueError, match=f"fastrank.sup_ap: `{next(iter(kw))}` must be finite in torch.float32"):
            fastrank.sup_ap(s, t, backend=backend, **kw)
    if backend == "triton":
        return  # its sweep adds a positive's H^- and takes it back: a line of 1e39 cancels the rest
    # fine in float64, and equal to the reference there
    v0 = fastrank.sup_ap(s.double(), t, backend="naive", rho=1e39)
    v1 = fastrank.sup_ap(s.double(), t, backend=backend, rho=1e39)
    torch.testing.assert_close(v1, v0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_tiny_tau_in_float64_matches_reference(backend):
    # 1e-300 is far below float32's limit but fine in float64: computed, not rejected
    s, rel = _inf_problem()
    s = torch.where(torch.isinf(s), torch.zeros_like(s), s)
    s[0, 1] = s[0, 0]  # an exact tie at tau = 1e-300: sigma(0) = 1/2
    for name in ("smooth_ap", "sup_ap", "h_ap_sigmoid"):
        v0, g0 = _vg(name, s, _target(name, rel), "naive", tau=1e-300)
        v1, g1 = _vg(name, s, _target(name, rel), backend, tau=1e-300)
        torch.testing.assert_close(v1, v0, rtol=1e-12, atol=1e-12)
        assert torch.isfinite(v1).all()
        # the tie's gradient is 1/(4 tau) = 2.5e299, finite; the others are rounding next to it
        assert torch.isfinite(g1).all() and torch.isfinite(g0).all()
        torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-12 * g0.abs().max().item())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_flat_linear_branch_with_an_infinite_competitor(backend):
    # rho = 0: H^- is the constant offset beyond delta, also at d = +inf (0 * inf would be NaN)
    s, rel = _inf_problem()
    for kw in (dict(rho=0.0), dict(rho=0.0, delta=0.0)):
        x0, x1 = s.clone().requires_grad_(), s.clone().requires_grad_()
        v0 = fastrank.sup_ap(x0, rel > 0, backend="naive", reduction="none", **kw)
        v1 = fastrank.sup_ap(x1, rel > 0, backend=backend, reduction="none", **kw)
        assert torch.isfinite(v0).all()
        torch.testing.assert_close(v1, v0, rtol=1e-10, atol=1e-12)
        v0.sum().backward()
        v1.sum().backward()
        torch.testing.assert_close(x1.grad, x0.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_histogram_range_too_narrow_for_float32_is_rejected(backend):
    s = torch.rand(3, 5)
    t = torch.rand(3, 5) < 0.5
    with pytest.raises(ValueError, match=r"fastrank.histogram_ap: `range` gives the bin map"):
        fastrank.histogram_ap(s, t, kind="softbin", range=(0.0, 1e-38), backend=backend)
    # float64 holds that scale: computed, as the reference does
    v0 = fastrank.histogram_ap(s.double() * 1e-38, t, kind="softbin", range=(0.0, 1e-38), backend="naive")
    v1 = fastrank.histogram_ap(s.double() * 1e-38, t, kind="softbin", range=(0.0, 1e-38), backend=backend)
    torch.testing.assert_close(v1, v0)
