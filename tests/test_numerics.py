"""Numerical extremes: infinities, huge |d|/tau, tiny tau, all-equal scores, duplicates, half
precision near +-1. No NaN where the fp64 reference is finite; gradients finite."""
import pytest
import torch

import fastrank

from .conftest import CPU_BACKENDS, FUSED_CPU

FNS = {
    "smooth_ap": lambda s, t, b, **kw: fastrank.smooth_ap(s, t, backend=b, reduction="none", **kw),
    "sup_ap": lambda s, t, b, **kw: fastrank.sup_ap(s, t, backend=b, reduction="none", **kw),
    "recall": lambda s, t, b, **kw: fastrank.recall_at_k(s, t, backend=b, reduction="none", **kw),
    "fastap": lambda s, t, b, **kw: fastrank.histogram_ap(s, t, backend=b, reduction="none"),
}


def _vg(name, s, t, backend, **kw):
    x = s.clone().requires_grad_()
    v = FNS[name](x, t, backend, **kw)
    (g,) = torch.autograd.grad(v.sum(), x)
    return v.detach(), g


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
