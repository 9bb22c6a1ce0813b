"""HAPPIER's H-AP (issue 18): the ordering key apart from the relevance, the smoothed H-rank
(`with_hrank`, beta, gamma, leak) and HAPPIER's relevance functions, on every backend, against
the transcription of the published code (tests/published.py) and the fp64 naive cube."""
import pytest
import torch

import fastrank
from fastrank.graded import graded_rank_sums, h_ap, ndcg, relevance_from_hierarchy
from fastrank.losses import HAPLoss, NDCGLoss

from .cases import assert_all_close, backend_device, outputs_and_grad
from .conftest import requires
from .published import (
    published_happier_hap,
    published_happier_relevance_map,
    published_happier_relevance_pop,
)

#: (backend, FASTRANK_FUSED): the fused loss op and the two-pass path where a backend has both
PATHS = [
    pytest.param("naive", "1", id="naive"),
    pytest.param("torch", "1", id="torch"),
    pytest.param("cpp", "1", marks=requires("cpp"), id="cpp-fused"),
    pytest.param("cpp", "0", marks=requires("cpp"), id="cpp-two-pass"),
    pytest.param("triton", "1", marks=requires("triton"), id="triton-fused"),
    pytest.param("triton", "0", marks=requires("triton"), id="triton-two-pass"),
    pytest.param("cuda", "1", marks=requires("cuda"), id="cuda"),
]

#: HAPPIER's smoothed H-rank settings: the clamped ramp (gamma < 1), the step (gamma > 1), and the
#: degenerate slopes (leak = 0, beta = 0)
HRANKS = {
    "off": {},
    "ramp": dict(with_hrank=True, beta=25.0, gamma=0.5, leak=10.0),
    "step": dict(with_hrank=True, beta=25.0, gamma=2.0, leak=1.0),
    "flat": dict(with_hrank=True, beta=0.0, gamma=0.25, leak=0.0),
}


def _hierarchy_batch(b: int = 12, seed: int = 0):
    """A batch of 2-level labels (HAPPIER's columns: [class, super_class]) with unequal classes,
    so that the "pop" relevance is not monotone in the shared level, and fp64 embeddings whose
    scores have ties (duplicated rows)."""
    g = torch.Generator().manual_seed(seed)
    sup = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2][:b])
    cls = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2, 3, 4, 5, 5][:b])
    labels = torch.stack([cls, sup], 1)
    emb = torch.nn.functional.normalize(torch.randn(b, 6, generator=g, dtype=torch.float64), dim=1)
    emb[3] = emb[1]  # a tie across levels
    return labels, emb


def _with_fused(monkeypatch, fused):
    monkeypatch.setenv("FASTRANK_FUSED", fused)


def test_pop_relevance_is_not_monotone_in_the_level():
    """The reason for `key`: with unequal classes a same-super-class item can outweigh a same-class one."""
    labels, _ = _hierarchy_batch()
    levels = relevance_from_hierarchy(labels, labels, order="finest_first", dtype=torch.float64)
    rel = relevance_from_hierarchy(labels, labels, order="finest_first", relevance="pop", dtype=torch.float64)
    above = levels.unsqueeze(2) > levels.unsqueeze(1)
    assert bool((above & (rel.unsqueeze(2) < rel.unsqueeze(1))).any())


@pytest.mark.parametrize("kind", ["pop", "map"])
@pytest.mark.parametrize("mode", ["shared_prefix", "shared_levels"])
def test_happier_relevance_matches_published(kind, mode):
    labels, _ = _hierarchy_batch()
    levels = relevance_from_hierarchy(labels, labels, mode, order="finest_first", dtype=torch.float64)
    t = levels.long()
    if kind == "pop":
        got = relevance_from_hierarchy(labels, labels, mode, order="finest_first", relevance="pop", alpha=1.5,
                                       dtype=torch.float64)
        ref = published_happier_relevance_pop(t, levels=2, alpha=1.5)
    else:
        w = [0.25, 0.75]
        got = relevance_from_hierarchy(labels, labels, mode, order="finest_first", relevance="map", weights=w,
                                       dtype=torch.float64)
        ref = published_happier_relevance_map(t, w)
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=0)
    # a query and gallery of different sizes, and float32 out
    got32 = relevance_from_hierarchy(labels[:5], labels, mode, order="finest_first", relevance=kind,
                                     **({"alpha": 1.5} if kind == "pop" else {"weights": [0.25, 0.75]}))
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref[:5], rtol=1e-6, atol=0)


def test_happier_relevance_errors():
    labels, _ = _hierarchy_batch()
    fn = "fastrank.relevance_from_hierarchy"
    with pytest.raises(ValueError, match=f"{fn}: `relevance` must be one of"):
        relevance_from_hierarchy(labels, labels, order="finest_first", relevance="decay")
    with pytest.raises(ValueError, match="relevance='pop' needs at least 2 levels"):
        relevance_from_hierarchy(labels[:, :1], labels[:, :1], relevance="pop")
    with pytest.raises(ValueError, match="relevance='map' needs `weights`"):
        relevance_from_hierarchy(labels, labels, order="finest_first", relevance="map")
    with pytest.raises(ValueError, match=r"one weight per level \(2\), got 3"):
        relevance_from_hierarchy(labels, labels, order="finest_first", relevance="map", weights=[1, 1, 1])
    with pytest.raises(ValueError, match="`weights` are the level weights of relevance='map'"):
        relevance_from_hierarchy(labels, labels, order="finest_first", relevance="pop", weights=[1, 1])
    with pytest.raises(ValueError, match="`alpha` must be a finite number >= 0"):
        relevance_from_hierarchy(labels, labels, order="finest_first", relevance="pop", alpha=-1.0)


@pytest.mark.parametrize("hrank", list(HRANKS))
@pytest.mark.parametrize("backend,fused", PATHS)
def test_h_ap_with_key_matches_published(backend, fused, hrank, monkeypatch):
    """HAPPIER's HAPLoss (levels order, "pop" relevance weighs) equals h_ap(key=levels), values
    and gradients, fp64."""
    _with_fused(monkeypatch, fused)
    labels, emb = _hierarchy_batch()
    levels = relevance_from_hierarchy(labels, labels, order="finest_first", dtype=torch.float64)
    rel = relevance_from_hierarchy(labels, labels, order="finest_first", relevance="pop", dtype=torch.float64)
    kw = dict(tau=0.05, offset=1.44, **HRANKS[hrank])
    pub_kw = {k: v for k, v in kw.items()}
    ref_s = (emb @ emb.T).requires_grad_()
    ref = published_happier_hap(ref_s, levels.long(), rel, **pub_kw)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_s)
    dev = backend_device(backend)
    s = (emb @ emb.T).to(dev).requires_grad_()
    got = h_ap(s, rel.to(dev), key=levels.to(dev), reduction="none", backend=backend, **kw)
    (grad,) = torch.autograd.grad(got.sum(), s)
    torch.testing.assert_close(got.cpu(), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad.cpu(), ref_grad, rtol=1e-12, atol=1e-12)


def _hard_problem(q=6, n=17, seed=3):
    """Keys not monotone in the relevance, items with rel = 0 but key > 0 and rel > 0 but key = 0,
    tied scores and keys, a query without ranked items, an ignored item per query."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(q, n, generator=g, dtype=torch.float64) * 0.1
    scores[:, 5] = scores[:, 2]  # ties
    key = torch.randint(0, 4, (q, n), generator=g).double()
    rel = torch.where(key > 0, torch.rand(q, n, generator=g, dtype=torch.float64) + 0.05, 0)
    rel[:, 7] = 0.0
    key[:, 7] = 3.0  # key > 0, not ranked
    rel[:, 8] = 0.5
    key[:, 8] = 0.0  # ranked, lowest key
    rel[q - 1] = 0  # no ranked item
    ignore = torch.arange(q) % n
    return scores, rel, key, ignore


@pytest.mark.parametrize("hrank", list(HRANKS))
@pytest.mark.parametrize("backend,fused", [p for p in PATHS if p.values[0] != "naive"])
def test_rank_sums_and_losses_with_key_match_naive(backend, fused, hrank, monkeypatch):
    _with_fused(monkeypatch, fused)
    scores, rel, key, ignore = _hard_problem()
    dev = backend_device(backend)
    kw = dict(tau=0.05, **HRANKS[hrank])

    def run(b, d):
        def f(s):
            ra, rp = graded_rank_sums(s, rel.to(d), key=key.to(d), ignore=ignore.to(d), backend=b, **kw)
            hap = h_ap(s, rel.to(d), key=key.to(d), ignore=ignore.to(d), reduction="none", backend=b, **kw)
            out = (ra, rp, hap)
            if not HRANKS[hrank]:
                out += (ndcg(s, rel.to(d), key=key.to(d), ignore=ignore.to(d), reduction="none", backend=b,
                             tau=0.05),)
            return out
        return tuple(t.cpu() for t in outputs_and_grad(f, scores.to(d)))

    assert_all_close(run(backend, dev), run("naive", torch.device("cpu")), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,fused", PATHS)
def test_key_equal_to_relevance_changes_nothing(backend, fused, monkeypatch):
    _with_fused(monkeypatch, fused)
    scores, rel, _, ignore = _hard_problem()
    dev = backend_device(backend)
    s, r, ig = scores.to(dev), rel.to(dev), ignore.to(dev)
    a = h_ap(s, r, ignore=ig, reduction="none", backend=backend)
    b = h_ap(s, r, key=r, ignore=ig, reduction="none", backend=backend)
    # (a kernel may take another summation order once a key is given)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    # a key that orders as the relevance does gives the same steps
    c = h_ap(s, r, key=r * 3 + 1, ignore=ig, reduction="none", backend=backend)
    torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend,fused", PATHS)
def test_nan_score_row_stays_nan_with_hrank(backend, fused, monkeypatch):
    _with_fused(monkeypatch, fused)
    scores, rel, key, _ = _hard_problem()
    scores[1, 4] = float("nan")
    dev = backend_device(backend)
    got = h_ap(scores.to(dev), rel.to(dev), key=key.to(dev), reduction="none", backend=backend,
               **HRANKS["ramp"]).cpu()
    assert torch.isnan(got[1])
    assert torch.isfinite(torch.cat([got[:1], got[2:]])).all()


def test_hrank_float32_within_float32_error_of_naive():
    """cpp in float32 against the fp64 naive cube, judged by the naive backend's own float32 error."""
    scores, rel, key, ignore = _hard_problem(q=8, n=40, seed=4)
    kw = dict(key=key, ignore=ignore, reduction="none", **HRANKS["ramp"])
    ref = h_ap(scores, rel, backend="naive", **kw)
    kw32 = dict(kw, key=key.float())
    naive32 = h_ap(scores.float(), rel.float(), backend="naive", **kw32).double()
    for backend in [b for b in ("torch", "cpp") if fastrank.backends()[b].available]:
        got = h_ap(scores.float(), rel.float(), backend=backend, **kw32).double()
        err, base = (got - ref).abs().max().item(), (naive32 - ref).abs().max().item()
        assert err <= 4 * base + 1e-5, (backend, err, base)


def test_gradcheck_hrank():
    scores, rel, key, ignore = _hard_problem(q=3, n=10)
    # finite differences across a step's jump (a tie) are not derivatives: untie the scores
    scores = scores + 0.013 * torch.arange(scores.shape[1], dtype=scores.dtype)
    for backend in ("naive", "torch"):
        assert torch.autograd.gradcheck(
            lambda s: h_ap(s, rel[:3], key=key[:3], ignore=ignore[:3], reduction="none", backend=backend,
                           **HRANKS["ramp"]), (scores[:3].clone().requires_grad_(),))


def test_argument_errors():
    scores, rel, key, _ = _hard_problem()
    fn = "fastrank.h_ap"
    with pytest.raises(ValueError, match=f"{fn}: with_hrank=True needs step='suprank'"):
        h_ap(scores, rel, step="sigmoid", with_hrank=True, beta=1.0, gamma=0.5, leak=1.0)
    with pytest.raises(ValueError, match=r"needs `beta`, `gamma` and `leak`.*missing: gamma, leak"):
        h_ap(scores, rel, with_hrank=True, beta=1.0)
    with pytest.raises(ValueError, match="`beta` is a parameter of the smoothed H-rank"):
        h_ap(scores, rel, beta=1.0)
    with pytest.raises(TypeError, match="`with_hrank` must be a bool"):
        h_ap(scores, rel, with_hrank=1, beta=1.0, gamma=0.5, leak=1.0)
    with pytest.raises(ValueError, match="`leak` must be a finite number >= 0"):
        h_ap(scores, rel, with_hrank=True, beta=1.0, gamma=0.5, leak=float("inf"))
    with pytest.raises(ValueError, match="`gamma` must be finite"):
        h_ap(scores, rel, with_hrank=True, beta=1.0, gamma=float("nan"), leak=1.0)
    with pytest.raises(ValueError, match=r"`key` must have the shape of scores \(6, 17\), got \(6, 16\)"):
        h_ap(scores, rel, key=key[:, :-1])
    with pytest.raises(TypeError, match="`key` must be None or a \\(Q, N\\) tensor"):
        h_ap(scores, rel, key=key.tolist())
    with pytest.raises(TypeError, match="`key` must be a floating, integer or bool tensor"):
        h_ap(scores, rel, key=key.to(torch.complex128))
    for backend in [b for b in ("naive", "torch", "cpp") if fastrank.backends()[b].available]:
        bad = key.clone()
        bad[0, 0] = float("nan")
        with pytest.raises(ValueError, match="`key` must be finite"):
            h_ap(scores, rel, key=bad, backend=backend)
    with pytest.raises(ValueError, match="does not represent exactly"):
        h_ap(scores.float(), rel.float(), key=key + 1e-12 * torch.arange(key.shape[1]))
    with pytest.raises(ValueError, match="HAPLoss: with_hrank=True needs `beta`"):
        HAPLoss(with_hrank=True)


@pytest.mark.parametrize("backend", ["naive", pytest.param("cpp", marks=requires("cpp"))])
def test_modules_take_the_key(backend):
    labels, emb = _hierarchy_batch()
    levels = relevance_from_hierarchy(labels, labels, order="finest_first", dtype=torch.float64)
    rel = relevance_from_hierarchy(labels, labels, order="finest_first", relevance="pop", dtype=torch.float64)
    e = emb.clone().requires_grad_()
    loss = HAPLoss(offset=1.44, similarity="dot", backend=backend, **HRANKS["ramp"])(e, rel, key=levels)
    ref = 1 - published_happier_hap(emb @ emb.T, levels.long(), rel, tau=0.01, offset=1.44, **HRANKS["ramp"]).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    assert torch.isfinite(e.grad).all()
    nd = NDCGLoss(similarity="dot", backend=backend)(emb, rel, key=levels)
    torch.testing.assert_close(nd, 1 - ndcg(emb @ emb.T, rel, key=levels, backend="naive"), rtol=1e-12, atol=1e-12)
