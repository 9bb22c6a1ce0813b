"""The histogram family (fastrank.histogram_ap: FastAP, SoftBin): published formulas, every backend
vs the fp64 naive (Q, N, L) tensor, gradcheck, edge cases. Triton runs in the interpreter on CPU
tensors without a GPU (tests/conftest.py); its kernel API: tests/test_triton_histogram.py."""
import pytest
import torch
import torch.nn.functional as F

import fastrank

from .cases import (
    FUSED,
    Case,
    all_cases,
    assert_histogram_ap_close,
    assert_zero_without_positives,
    backend_device,
    backend_params,
    bin_kinks_case,
    histogram_ap_and_grad,
    make_case,
    nan_label_batch,
    over_backends,
    to_device,
)
from .conftest import CPU_BACKENDS, TRITON_ON_GPU
from .nan_rows import NAN_BACKENDS, check_nan_rows
from .published import published_fastap, published_softbin_ap

BACKENDS = backend_params()


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


# --------------------------------------------------------------------------- every backend vs naive

#: ties (many equal scores on a 0.1 grid, some exactly on bin centres) with every ignore form
_TIED = [(kind, make_case(q, n, c, "labels", ik, ties=True, seed=5))
         for q, n, c in ((17, 43, 4), (11, 29, 3)) for kind in ("fastap", "softbin")
         for ik in ("none", "index", "self", "mask")]
#: N = 1: the only item is a positive (rows 0, 2), ignored (row 1) or a negative (row 3)
_N1 = Case("n1", torch.tensor([[0.3], [0.7], [-0.4], [0.9]], dtype=torch.float64),
           torch.tensor([[1], [1], [1], [0]]), torch.tensor([-1, 0, -1, -1]))
#: SoftBin: beyond [min, max] falls into the end bins (no gradient); FastAP: x = 2 - 2s outside
#: [0, 4] is lost (s > 1 or s < -1), partly lost within one bin width of the ends; +-inf
_OUTSIDE = Case("outside", torch.tensor(
    [[3.0, -2.0, 0.5, 0.5, 0.2, 1.04, -1.04, 1.2],
     [0.1, 0.1, float("inf"), 0.1, float("-inf"), 0.97, 1.0, 0.0],
     [0.9, 0.8, 0.7, 0.6, 0.5, -0.9, -1.0, 1.01]], dtype=torch.float64),
    torch.tensor([[1, 0, 1, 0, 0, 1, 0, 1], [1, 1, 0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1, 1, 1]]), None)
#: what the interpreter runs (the (17, 43) ties: every other backend)
_INTERPRETED = (
    _TIED[8:]
    + [(config, make_case(9, 31, 3, "bool", "mask", seed=6)) for config in ("softbin-20-roadmap", "fastap-3")]
    # every target form, odd shapes (N = 1, Q > N, queries without positives), every ignore form
    + [(("fastap", "softbin")[i % 2], c) for i, c in enumerate(all_cases()[::3])]
    + [(config, case) for case in (_N1, _OUTSIDE) for config in ("fastap", "softbin")]
    + [(config, bin_kinks_case(config)) for config in ("fastap", "softbin")]
)
HIST_CASES = _TIED[:8] + _INTERPRETED


@pytest.mark.parametrize("backend,config,case", over_backends(HIST_CASES, interpreted=_INTERPRETED))
def test_histogram_matches_naive_values_and_gradients(backend, config, case):
    case = to_device(case, backend_device(backend))
    got = histogram_ap_and_grad(case, config, backend)
    assert_histogram_ap_close(got, histogram_ap_and_grad(case, config, "naive"))
    assert (got[-1][torch.isinf(case.scores)] == 0).all()  # +-inf: beyond the ends, no gradient


_GRADCHECK = [(kind, ik) for kind in ("fastap", "softbin") for ik in ("none", "index")]


@pytest.mark.parametrize("backend,kind,ignore_kind", over_backends(_GRADCHECK, interpreted=_GRADCHECK[1::2]))
def test_histogram_gradcheck(backend, kind, ignore_kind):
    # scores on a grid that keeps every bin coordinate away from integers (the kinks)
    device = backend_device(backend)
    g = torch.Generator().manual_seed(1)
    s = ((torch.randperm(5 * 9, generator=g).to(torch.float64) * 0.0173 + 0.013).view(5, 9) % 1.0).to(device)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1, 2], device=device)
    ignore = torch.tensor([0, -1, 3, 8, 4], device=device) if ignore_kind == "index" else None

    def f(x):
        return fastrank.histogram_ap(x, (labels[:5], labels), kind=kind, bins=6, ignore=ignore, backend=backend,
                                     reduction="none")

    # interpreted Triton: the full Jacobian costs ~100 launches, fast mode (random projections) there
    fast = backend == "triton" and not TRITON_ON_GPU
    assert torch.autograd.gradcheck(f, (s.requires_grad_(),), eps=1e-7, atol=1e-6, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_histogram_gradcheck_full_jacobian_small(backend):
    device = backend_device(backend)
    s = torch.tensor([[0.113, 0.571, 0.342, 0.904, 0.268], [0.447, 0.029, 0.781, 0.652, 0.196]],
                     dtype=torch.float64, device=device)
    t = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 1, 0, 0]], device=device)

    def f(x):
        a = fastrank.histogram_ap(x, t, kind="softbin", bins=4, backend=backend, reduction="none")
        b = fastrank.histogram_ap(x, t, kind="fastap", bins=5, backend=backend, reduction="none")
        return a, b

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
def test_histogram_nan_score_gives_nan_loss(backend):
    s, target = nan_label_batch(3, (0, 2))
    assert torch.isnan(fastrank.histogram_ap(s, target, backend=backend))


_KINDS = ["fastap", "softbin"]


@pytest.mark.parametrize("backend,kind", over_backends(_KINDS, ("naive",) + FUSED, interpreted=_KINDS[1:]))
def test_no_positive_anywhere_is_zero_and_differentiable(backend, kind):
    device = backend_device(backend)
    scores = torch.rand(3, 6, dtype=torch.float64, device=device)
    assert_zero_without_positives(lambda x, t: fastrank.histogram_ap(x, t, kind=kind, backend=backend),
                                  scores, torch.zeros(3, 6, device=device))


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
