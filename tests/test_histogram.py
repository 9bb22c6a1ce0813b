"""Histogram AP (FastAP, SoftBin): published formulas, every backend vs naive, edge cases, memory."""
import pytest
import torch
import torch.nn.functional as F

import fastrank

from .cases import make_case
from .conftest import CPU_BACKENDS, FUSED_CPU
from .nan_rows import NAN_BACKENDS, check_nan_rows
from .published import published_fastap, published_softbin_ap


def _emb(n, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bins", [10, 7, 2])
def test_fastap_equals_published(backend, bins):
    emb = _emb(30, seed=bins)
    labels = torch.tensor([0, 1, 2, 0, 1, 3, 0, 2, 2, 1] * 3)
    expect = published_fastap(emb, labels, bins)
    got = fastrank.histogram_ap(emb @ emb.T, (labels, labels), bins=bins, kind="fastap",
                                ignore=torch.arange(30), backend=backend)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("nq,rng", [(25, (0.0, 1.0)), (20, (-1.0, 1.0)), (4, (-0.3, 0.5))])
def test_softbin_equals_published(backend, nq, rng):
    emb = _emb(21, seed=nq)
    scores = emb @ emb.T  # in [-1, 1]: with range (0, 1) many scores fall beyond the open end bin
    labels = torch.arange(21) % 4
    target = labels.view(-1, 1) == labels.view(1, -1)
    expect = published_softbin_ap(scores, target, nq, *rng)
    got = fastrank.histogram_ap(scores, target, bins=nq, kind="softbin", range=rng, backend=backend, reduction="none")
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("kind", ["fastap", "softbin"])
@pytest.mark.parametrize("ignore_kind", ["none", "index", "self", "mask"])
def test_histogram_matches_naive_values_and_gradients(backend, kind, ignore_kind):
    case = make_case(17, 43, 4, "labels", ignore_kind, ties=True, seed=5)
    s0 = case.scores.clone().requires_grad_()
    s1 = case.scores.clone().requires_grad_()
    a0 = fastrank.histogram_ap(s0, case.target, kind=kind, ignore=case.ignore, backend="naive", reduction="none")
    a1 = fastrank.histogram_ap(s1, case.target, kind=kind, ignore=case.ignore, backend=backend, reduction="none")
    torch.testing.assert_close(a1, a0, rtol=1e-10, atol=1e-12)
    w = torch.rand(17, dtype=torch.float64)
    (g0,) = torch.autograd.grad((a0 * w).sum(), s0)
    (g1,) = torch.autograd.grad((a1 * w).sum(), s1)
    torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("kind", ["fastap", "softbin"])
def test_histogram_gradcheck(backend, kind):
    # scores on a grid that keeps every bin coordinate away from integers (the kinks)
    g = torch.Generator().manual_seed(1)
    s = (torch.randperm(5 * 9, generator=g).to(torch.float64) * 0.0173 + 0.013).view(5, 9) % 1.0
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1, 2])

    def f(x):
        return fastrank.histogram_ap(x, (labels[:5], labels), kind=kind, bins=6, backend=backend, reduction="none")

    assert torch.autograd.gradcheck(f, (s.requires_grad_(),), eps=1e-7, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["fastap", "softbin"])
def test_histogram_edge_cases(backend, kind):
    # scores outside the range, empty bins, a query without positives, ties
    s = torch.tensor([[3.0, -2.0, 0.5, 0.5, 0.2], [0.1, 0.1, 0.1, 0.1, 0.1], [0.9, 0.8, 0.7, 0.6, 0.5]],
                     dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1, 0, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    ap = fastrank.histogram_ap(s, t, kind=kind, backend=backend, reduction="none")
    assert torch.isfinite(ap).all() and ap[2] == 0
    assert ((ap[:2] >= 0) & (ap[:2] <= 1 + 1e-12)).all()
    mean = fastrank.histogram_ap(s, t, kind=kind, backend=backend)
    torch.testing.assert_close(mean, ap[:2].mean())
    mean.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_histogram_nan_and_no_positive_batch(backend):
    s = torch.rand(3, 6, dtype=torch.float64)
    s[0, 2] = float("nan")
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    assert torch.isnan(fastrank.histogram_ap(s, (labels[:3], labels), backend=backend))
    x = torch.rand(3, 6, dtype=torch.float64, requires_grad=True)
    loss = fastrank.histogram_ap(x, torch.zeros(3, 6), backend=backend)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_histogram_argument_errors():
    s, t = torch.rand(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="`bins` must be >= 2"):
        fastrank.histogram_ap(s, t, bins=1)
    with pytest.raises(TypeError, match="`bins` must be an integer"):
        fastrank.histogram_ap(s, t, bins=2.5)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        fastrank.histogram_ap(s, t, kind="ap")
    with pytest.raises(ValueError, match="`range` must satisfy min < max"):
        fastrank.histogram_ap(s, t, kind="softbin", range=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"`range\[1\]` must be finite"):
        fastrank.histogram_ap(s, t, kind="softbin", range=(0.0, float("inf")))
    with pytest.raises(TypeError, match="`range` must be a pair"):
        fastrank.histogram_ap(s, t, kind="softbin", range=0.5)


# --------------------------------------------------------------------------- NaN in -> NaN out


@pytest.mark.parametrize("backend", NAN_BACKENDS)
@pytest.mark.parametrize("kind", ["fastap", "softbin"])
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_nan_poisons_its_query_with_or_without_positives(backend, kind, ignore_kind):
    # softbin turned a NaN score into AP = 0 (its epilogue drops bins whose count is not > 0)
    def fn(s, t, **kw):
        return fastrank.histogram_ap(s, t, kind=kind, range=(-1.0, 1.0), **kw)

    check_nan_rows(fn, backend, ignore_kind)
