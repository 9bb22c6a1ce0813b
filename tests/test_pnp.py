"""PNP (fastrank.pnp, losses.PNPLoss, integrations.pml.PNPLoss): every backend against the published
formula (tests/published.py, the Q x N x N cube) in fp64, every variant; ties, N = 1, queries without
positives, every ignore form, gradcheck, NaN rows, arguments, and parity with pytorch-metric-learning."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastrank
from fastrank.pnp import VARIANTS, _ib_over_x2, pnp_transform

from .cases import (
    assert_all_close,
    assert_zero_without_positives,
    backend_device,
    backend_params,
    make_case,
    outputs_and_grad,
    over_backends,
    spread_scores,
    to_device,
)
from .conftest import CPU_BACKENDS
from .nan_rows import NAN_BACKENDS, check_nan_rows
from .published import published_pnp

ALL_BACKENDS = ("naive", "torch", "cpp", "triton", "cuda")
#: every target and ignore form, ties, Q > N, N = 1, Q = 1, queries without positives (make_case's
#: query label `classes` never occurs in the gallery)
CASES = [
    make_case(1, 1, 1, "labels", "none", seed=1),
    make_case(5, 1, 2, "bool", "none", seed=2),
    make_case(1, 7, 2, "labels", "index", ties=True, seed=3),
    make_case(7, 13, 3, "int", "mask", seed=4),
    make_case(13, 13, 4, "labels", "self", ties=True, seed=5),
    make_case(16, 33, 5, "float", "index", seed=6),
    make_case(31, 17, 2, "bool", "mask", ties=True, seed=7),
    make_case(23, 37, 4, "labels", "none", seed=8),
]
#: the interpreter is slow: these cover labels/dense, index/mask and ties
INTERPRETED = [CASES[2], CASES[3], CASES[6]]
#: non-default parameters where a variant has them (b for Ib, alpha for Dq) and a wider sigmoid
PARAMS = {"O": dict(tau=0.05), "Ds": dict(), "Dq": dict(alpha=2.5), "Iu": dict(tau=0.02), "Ib": dict(b=0.7)}


def _masks(case):
    """(positive, valid) dense (Q, N) bool masks of a case, written out from its target and ignore."""
    q, n = case.scores.shape
    t = case.target
    if isinstance(t, tuple):
        pos = t[0].unsqueeze(1) == t[1].unsqueeze(0)
    else:
        pos = t > 0 if t.dtype != torch.bool else t.clone()
    valid = torch.ones(q, n, dtype=torch.bool, device=case.scores.device)
    if case.ignore is not None and case.ignore.dtype == torch.bool:
        valid &= ~case.ignore
    elif case.ignore is not None:
        for i, k in enumerate(case.ignore.tolist()):
            if k >= 0:
                valid[i, k] = False
    return pos, valid


def _reference(case, variant, **kw):
    pos, valid = _masks(case)
    args = dict(b=kw.get("b", 2.0), alpha=kw.get("alpha", 1.0), anneal=kw.get("tau", 0.01))
    return outputs_and_grad(lambda s: published_pnp(s, pos, valid, variant, **args), case.scores)


def _ours(case, variant, backend, reduction="none", **kw):
    return outputs_and_grad(lambda s: fastrank.pnp(s, case.target, variant=variant, ignore=case.ignore,
                                                   reduction=reduction, backend=backend, **kw), case.scores)


# --------------------------------------------------------------------------- the published formula


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend,case", over_backends(CASES, backends=ALL_BACKENDS, interpreted=INTERPRETED))
def test_matches_published_formula(backend, case, variant):
    # fp64, defaults and non-default parameters: values and the gradient of a random weighting
    case = to_device(case, backend_device(backend))
    for kw in ({}, PARAMS[variant]):
        assert_all_close(_ours(case, variant, backend, **kw), _reference(case, variant, **kw),
                         rtol=1e-10, atol=1e-12, grad_rtol=1e-9, grad_atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_reductions(backend, variant):
    case = make_case(19, 23, 5, "labels", "mask", seed=11)
    per_query = fastrank.pnp(case.scores, case.target, variant=variant, ignore=case.ignore, reduction="none",
                             backend=backend)
    pos, valid = _masks(case)
    has = (pos & valid).any(1)
    assert not has.all() and has.any()  # the case has queries with and without positives
    assert torch.equal(per_query[~has], torch.zeros_like(per_query[~has]))
    mean = fastrank.pnp(case.scores, case.target, variant=variant, ignore=case.ignore, backend=backend)
    total = fastrank.pnp(case.scores, case.target, variant=variant, ignore=case.ignore, reduction="sum",
                         backend=backend)
    torch.testing.assert_close(mean, per_query[has].mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(total, per_query.sum(), rtol=1e-12, atol=0)


def _f(variant, x, b=2.0, alpha=1.0):
    return {"O": x, "Ds": math.log1p(x), "Dq": 1 - (1 + x) ** -alpha, "Iu": (1 + x) * math.log1p(x),
            "Ib": (b * x - math.log1p(b * x)) / b ** 2}[variant]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_hand_computed_with_ties(backend, variant):
    # positives a (0.5) and c (0.2); negatives b tied with a (0.5) and d (0.3); e ignored (above all)
    s = torch.tensor([[0.5, 0.5, 0.2, 0.3, 0.9]], dtype=torch.float64)
    t = torch.tensor([[1, 0, 1, 0, 1]])
    ignore = torch.tensor([4])
    sig = lambda d: 1 / (1 + math.exp(-max(min(d / 0.01, 50), -50)))  # noqa: E731
    before_a = 0.5 + sig(0.3 - 0.5)  # the tied negative counts sigma(0) = 1/2
    before_c = sig(0.5 - 0.2) + sig(0.3 - 0.2)
    expect = (_f(variant, before_a) + _f(variant, before_c)) / 2
    got = fastrank.pnp(s, t, variant=variant, ignore=ignore, backend=backend)
    assert got.item() == pytest.approx(expect, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_positive_anywhere_is_zero_and_differentiable(backend):
    for variant in VARIANTS:
        assert_zero_without_positives(lambda x, t: fastrank.pnp(x, t, variant=variant, backend=backend),
                                      torch.rand(4, 6, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.bool))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_no_negative_before_is_zero(backend, variant):
    # N = 1 (the one item a positive) and every item positive: nothing to penalise, zero gradient
    for s, t in ((torch.rand(3, 1, dtype=torch.float64), torch.ones(3, 1, dtype=torch.bool)),
                 (torch.rand(2, 5, dtype=torch.float64), torch.ones(2, 5, dtype=torch.bool))):
        x = s.clone().requires_grad_()
        loss = fastrank.pnp(x, t, variant=variant, backend=backend)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ignored_negative_is_as_if_absent(backend):
    case = make_case(9, 15, 3, "bool", "none", seed=12)
    mask = torch.zeros(9, 15, dtype=torch.bool)
    mask[:, 4] = True
    keep = [c for c in range(15) if c != 4]
    for variant in VARIANTS:
        with_mask = fastrank.pnp(case.scores, case.target, variant=variant, ignore=mask, reduction="none",
                                 backend=backend)
        dropped = fastrank.pnp(case.scores[:, keep], case.target[:, keep], variant=variant, reduction="none",
                               backend=backend)
        torch.testing.assert_close(with_mask, dropped, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", backend_params(("naive", "torch", "cpp", "triton")))
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck(backend, variant):
    device = backend_device(backend)
    scores = spread_scores(4, 7, seed=3, device=device)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2], device=device)
    ignore = torch.tensor([1, -1, 3, 6], device=device)

    def f(s):
        return fastrank.pnp(s, (labels[:4], labels), variant=variant, b=1.5, alpha=2.0, tau=0.05, ignore=ignore,
                            reduction="none", backend=backend)

    fast = backend == "triton"  # interpreted: random projections instead of the full Jacobian
    assert torch.autograd.gradcheck(f, (scores.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp") if b in CPU_BACKENDS])
@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_close_to_fp64(backend, variant):
    # rank_all - rank_pos cancels in float32: the error stays at float32 rounding of the ranks
    case = make_case(24, 64, 3, "labels", "self", seed=13)
    ref = _reference(case, variant)
    got = _ours(to_device(case, "cpu", torch.float32), variant, backend)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0].double(), ref[0], rtol=2e-5, atol=2e-5)
    scale = ref[1].abs().max()
    torch.testing.assert_close(got[1].double() / scale, ref[1] / scale, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", NAN_BACKENDS)
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_nan_rows(backend, ignore_kind):
    for variant in ("O", "Ib"):
        check_nan_rows(lambda *a, **kw: fastrank.pnp(*a, variant=variant, **kw), backend, ignore_kind)


# --------------------------------------------------------------------------- the transforms


def test_ib_series_and_direct_branches_agree():
    # on both sides of the switch at u = 0.1 both forms are accurate in fp64 to ~1e-14
    u = torch.tensor([0.02, 0.05, 0.0999999, 0.1, 0.1000001, 0.3, 1.0, 1e3, 1e12], dtype=torch.float64)
    exact = (u - torch.log1p(u)) / u ** 2
    torch.testing.assert_close(_ib_over_x2(u), exact, rtol=5e-13, atol=0)
    tiny = torch.tensor([0.0, 1e-300, 1e-12, 1e-6], dtype=torch.float64)
    torch.testing.assert_close(_ib_over_x2(tiny), 0.5 - tiny / 3 + tiny ** 2 / 4, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ib_tiny_b_is_the_quadratic_limit(dtype):
    # (b x - log(1 + b x)) / b^2 -> x^2 / 2 as b -> 0: the direct formula gives 0/0 or pure rounding
    x = torch.tensor([0.0, 1e-3, 0.7, 3.0, 40.0], dtype=dtype, requires_grad=True)
    f = pnp_transform(x, "Ib", 1e-30, 1.0)
    torch.testing.assert_close(f, x.detach() ** 2 / 2, rtol=1e-6, atol=0)
    f.sum().backward()
    torch.testing.assert_close(x.grad, x.detach(), rtol=1e-6, atol=0)


def test_extreme_alpha_and_b_stay_finite():
    s = torch.rand(5, 9, dtype=torch.float32)
    t = torch.rand(5, 9) < 0.4
    for kw in (dict(variant="Dq", alpha=3e38), dict(variant="Dq", alpha=1e-30), dict(variant="Ib", b=3e37),
               dict(variant="Ib", b=1e-40)):
        x = s.clone().requires_grad_()
        loss = fastrank.pnp(x, t, **kw)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), kw


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kw,name", [
    (dict(variant="o"), "variant"), (dict(variant="PNP-O"), "variant"), (dict(variant=None), "variant"),
    (dict(b=0.0), "b"), (dict(b=-1.0), "b"), (dict(b=float("inf")), "b"), (dict(b=float("nan")), "b"),
    (dict(alpha=0), "alpha"), (dict(alpha=-2.0), "alpha"), (dict(alpha=float("inf")), "alpha"),
    (dict(tau=0.0), "tau"), (dict(tau=-0.01), "tau"), (dict(tau=float("nan")), "tau"),
    (dict(reduction="avg"), "reduction"),
])
def test_bad_arguments(kw, name):
    s, t = torch.rand(3, 4), torch.rand(3, 4) < 0.5
    with pytest.raises(ValueError, match=rf"fastrank.pnp: `{name}`"):
        fastrank.pnp(s, t, **kw)


def test_bad_argument_types():
    s, t = torch.rand(3, 4), torch.rand(3, 4) < 0.5
    for kw, name in ((dict(b="2"), "b"), (dict(alpha=True), "alpha"), (dict(tau=[0.01]), "tau")):
        with pytest.raises(TypeError, match=rf"fastrank.pnp: `{name}`"):
            fastrank.pnp(s, t, **kw)
    with pytest.raises(TypeError, match="fastrank.pnp"):
        fastrank.pnp(s.long(), t)


def test_parameters_must_be_finite_in_the_compute_dtype():
    s, t = torch.rand(3, 4), torch.rand(3, 4) < 0.5
    with pytest.raises(ValueError, match=r"fastrank.pnp: `alpha` must be finite in torch.float32"):
        fastrank.pnp(s, t, variant="Dq", alpha=1e39)
    with pytest.raises(ValueError, match=r"fastrank.pnp: `b` must be at most"):
        fastrank.pnp(s, t, variant="Ib", b=1e38)  # b * N overflows float32
    fastrank.pnp(s.double(), t, variant="Ib", b=1e38)  # fine in float64
    with pytest.raises(ValueError, match=r"fastrank.pnp: `tau` must lie in"):
        fastrank.pnp(s, t, tau=1e-40)


# --------------------------------------------------------------------------- the module


def _batch(classes, per, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(classes * per, dim, generator=g, dtype=torch.float64)
    return emb, torch.arange(classes).repeat_interleave(per)


@pytest.mark.parametrize("variant", VARIANTS)
def test_module_is_the_functional(variant):
    emb, labels = _batch(4, 3, seed=1)
    labels = labels[torch.randperm(12, generator=torch.Generator().manual_seed(2))]
    e = F.normalize(emb, dim=1)
    loss = fastrank.losses.PNPLoss(variant=variant, b=3.0, alpha=0.5, tau=0.02)(emb, labels)
    expect = fastrank.pnp(e @ e.T, (labels, labels), variant=variant, b=3.0, alpha=0.5, tau=0.02, backend="naive")
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=1e-14)
    left_out = fastrank.losses.PNPLoss(variant=variant, include_self=False)(emb, labels)
    expect = fastrank.pnp(e @ e.T, (labels, labels), variant=variant, ignore=torch.arange(12), backend="naive")
    torch.testing.assert_close(left_out, expect, rtol=1e-12, atol=1e-14)
    ref, ref_labels = _batch(4, 5, seed=3)
    r = F.normalize(ref, dim=1)
    got = fastrank.losses.PNPLoss(variant=variant)(emb, labels, ref, ref_labels)
    expect = fastrank.pnp(e @ r.T, (labels, ref_labels), variant=variant, backend="naive")
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-14)


def test_module_checks_its_arguments_at_construction():
    for kw, name in ((dict(variant="X"), "variant"), (dict(b=0), "b"), (dict(alpha=-1), "alpha"),
                     (dict(tau=0), "tau")):
        with pytest.raises(ValueError, match=f"PNPLoss: `{name}`"):
            fastrank.losses.PNPLoss(**kw)


# --------------------------------------------------------------------------- pytorch-metric-learning


@pytest.fixture
def pml():
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    from fastrank.integrations import pml as ours

    return losses, ours


def _value_and_grad(loss_fn, emb, labels, **kw):
    e = emb.clone().requires_grad_()
    loss = loss_fn(e, labels, **kw)
    (g,) = torch.autograd.grad(loss, e)
    return loss.detach(), g


#: equal contiguous classes, unequal unordered ones, and classes of one (left out by PML)
PML_BATCHES = {
    "4x4": _batch(4, 4, seed=4),
    "3x5": _batch(3, 5, seed=5),
    "unequal": (_batch(1, 13, seed=6)[0], torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 2, 5, 5, 7, 3])),
}


@pytest.mark.parametrize("batch", list(PML_BATCHES))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pml_parity(pml, batch, variant, backend):
    theirs_cls, ours = pml[0].PNPLoss, pml[1].PNPLoss
    emb, labels = PML_BATCHES[batch]
    for kw in ({}, dict(b=0.5, alpha=3.0, anneal=0.05)):
        v0, g0 = _value_and_grad(theirs_cls(variant=variant, **kw), emb, labels)
        v1, g1 = _value_and_grad(ours(variant=variant, backend=backend, **kw), emb, labels)
        torch.testing.assert_close(v1, v0, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-12)


def test_pml_parity_float32(pml):
    emb, labels = PML_BATCHES["unequal"]
    for variant in VARIANTS:
        v0, g0 = _value_and_grad(pml[0].PNPLoss(variant=variant), emb.float(), labels)
        v1, g1 = _value_and_grad(pml[1].PNPLoss(variant=variant), emb.float(), labels)
        assert v1.dtype == torch.float32
        torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-5 * g0.abs().max().item())


def test_pml_published_batch_mean(pml):
    # the drop-in is the published per-query loss averaged over the queries with another positive
    emb, labels = PML_BATCHES["unequal"]
    e = F.normalize(emb, dim=1)
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    per_query = published_pnp(e @ e.T, same, variant="Iu")
    keep = same.sum(1) > 1
    torch.testing.assert_close(pml[1].PNPLoss(variant="Iu")(emb, labels), per_query[keep].mean(),
                               rtol=1e-12, atol=1e-14)


def test_pml_no_query_with_a_positive(pml):
    emb, _ = _batch(1, 6, seed=7)
    labels = torch.arange(6)
    for cls in (pml[0].PNPLoss, pml[1].PNPLoss):
        e = emb.clone().requires_grad_()
        loss = cls()(e, labels)
        assert loss.item() == 0
        loss.backward()
        assert e.grad is None or torch.equal(e.grad, torch.zeros_like(e))


def test_pml_constructor_and_refusals(pml):
    theirs_cls, ours = pml[0].PNPLoss, pml[1].PNPLoss
    assert ours.VARIANTS == theirs_cls.VARIANTS
    loss = ours()
    assert (loss.b, loss.alpha, loss.anneal, loss.variant) == (2, 1, 0.01, "O")
    with pytest.raises(ValueError, match="variant"):
        theirs_cls(variant="X")
    for kw, name in ((dict(variant="X"), "variant"), (dict(b=0), "b"), (dict(alpha=-1), "alpha"),
                     (dict(anneal=0), "anneal"), (dict(anneal=float("nan")), "anneal")):
        with pytest.raises(ValueError, match=f"PNPLoss: `{name}`"):
            ours(**kw)
    emb, labels = _batch(3, 4)
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([5]))
    for cls in (theirs_cls, ours):
        with pytest.raises(ValueError, match="indices_tuple is not supported"):
            cls()(emb, labels, indices_tuple=pairs)


def test_pml_ref_emb(pml):
    # PML refuses ref_emb; ours ranks the queries against it, queries without a positive left out
    emb, labels = _batch(3, 4, seed=8)
    labels = labels.clone()
    labels[0] = 9
    ref, ref_labels = _batch(3, 6, seed=9)
    with pytest.raises(ValueError, match="ref_emb is not supported"):
        pml[0].PNPLoss()(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    e, r = F.normalize(emb, dim=1), F.normalize(ref, dim=1)
    got = pml[1].PNPLoss(variant="Ds")(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    per_query = fastrank.pnp(e @ r.T, (labels, ref_labels), variant="Ds", reduction="none", backend="naive")
    torch.testing.assert_close(got, per_query[1:].mean(), rtol=1e-12, atol=1e-14)
    emb = emb.clone()
    emb[0, 0] = float("nan")  # the query without positives holds a NaN: NaN in, NaN out
    assert torch.isnan(pml[1].PNPLoss()(emb, labels, ref_emb=ref, ref_labels=ref_labels))


def test_pml_patch_swaps_pnp(pml):
    theirs_cls, ours = pml[0].PNPLoss, pml[1]
    ours.patch()
    try:
        assert pml[0].PNPLoss is ours.PNPLoss
    finally:
        ours.unpatch()
    assert pml[0].PNPLoss is theirs_cls
