"""The rank-sums primitive: every backend against the fp64 naive cube, values and gradients."""
import pytest
import torch

import fastrank
from fastrank.rank_sums import naive  # noqa: F401  (the oracle the backends are compared with)

from .cases import all_cases, make_case
from .conftest import FUSED_CPU

CASES = all_cases()
STEPS = ["sigmoid", "suprank"]


def _run(case, backend, step, **kw):
    s = case.scores.clone().requires_grad_()
    out = fastrank.rank_sums(s, case.target, step=step, ignore=case.ignore, backend=backend, **kw)
    g = torch.Generator().manual_seed(123)
    wa = torch.randn(out.rank_all.shape, generator=g, dtype=s.dtype)
    wp = torch.randn(out.rank_pos.shape, generator=g, dtype=s.dtype)
    (grad,) = torch.autograd.grad((out.rank_all * wa).sum() + (out.rank_pos * wp).sum(), s)
    return out.rank_all.detach(), out.rank_pos.detach(), grad


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_matches_naive_fp64(case, step, backend):
    ra0, rp0, g0 = _run(case, "naive", step)
    ra, rp, g = _run(case, backend, step)
    torch.testing.assert_close(ra, ra0, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(rp, rp0, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(g, g0, rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("backend", ["naive"] + FUSED_CPU)
def test_hand_computed_example(backend):
    # one query, items a (pos), b (neg), c (pos) with s = 0.3, 0.2, 0.1, suprank step:
    # rank_all[a] = 1 + H^-(-0.1) + H(-0.2) = 1 + sigma(-10)
    # rank_all[c] = 1 + H(0.2) + H^-(0.1) = 2 + 100 * (0.1 - 0.05) + sigma(5) + 0.5
    s = torch.tensor([[0.3, 0.2, 0.1]], dtype=torch.float64)
    t = torch.tensor([[1, 0, 1]])
    r = fastrank.rank_sums(s, t, step="suprank", backend=backend)
    sig = lambda x: 1 / (1 + torch.exp(torch.tensor(-x, dtype=torch.float64)))  # noqa: E731
    expect_all = torch.tensor([[1 + sig(-10.0), 0.0, 2 + 5.0 + sig(5.0) + 0.5]], dtype=torch.float64)
    expect_pos = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(r.rank_all, expect_all)
    torch.testing.assert_close(r.rank_pos, expect_pos)


@pytest.mark.parametrize("backend", ["naive"] + FUSED_CPU)
@pytest.mark.parametrize("step", STEPS)
def test_packed_layout_agrees_with_dense(backend, step):
    case = make_case(9, 21, 3, "labels", "mask", seed=5)
    dense = fastrank.rank_sums(case.scores, case.target, step=step, ignore=case.ignore, backend=backend)
    packed = fastrank.rank_sums(case.scores, case.target, step=step, ignore=case.ignore, backend=backend, packed=True)
    has = packed.index >= 0
    assert has.any()
    rows = torch.arange(9).unsqueeze(1).expand_as(packed.index)[has]
    cols = packed.index[has]
    torch.testing.assert_close(dense.rank_all[rows, cols], packed.rank_all[has])
    torch.testing.assert_close(dense.rank_pos[rows, cols], packed.rank_pos[has])
    # ignored items are never ranked
    assert not (case.ignore[rows, cols]).any()


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_labels_and_dense_target_agree(backend):
    case = make_case(12, 30, 4, "labels", "index", seed=3)
    qlab, glab = case.target
    dense = qlab.unsqueeze(1) == glab.unsqueeze(0)
    a = fastrank.rank_sums(case.scores, case.target, step="suprank", ignore=case.ignore, backend=backend)
    b = fastrank.rank_sums(case.scores, dense, step="suprank", ignore=case.ignore, backend=backend)
    torch.testing.assert_close(a.rank_all, b.rank_all, rtol=0, atol=0)
    torch.testing.assert_close(a.rank_pos, b.rank_pos, rtol=0, atol=0)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_non_default_step_parameters(backend):
    case = make_case(10, 25, 3, "bool", "none", seed=8)
    kw = dict(step="suprank", tau=0.05, rho=7.0, delta=0.2, start=0.25, offset=1.5)
    ra0, rp0, g0 = _run(case, "naive", **kw)
    ra, rp, g = _run(case, backend, **kw)
    torch.testing.assert_close(ra, ra0, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(g, g0, rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_fp32_close_to_fp64_reference(backend):
    # fp32 error judged against what the naive fp32 computation itself achieves
    case = make_case(24, 70, 5, "labels", "self", seed=11)
    ra64, _, g64 = _run(case, "naive", "sigmoid")
    c32 = make_case(24, 70, 5, "labels", "self", seed=11, dtype=torch.float32)
    ra_n, _, g_n = _run(c32, "naive", "sigmoid")
    ra_f, _, g_f = _run(c32, backend, "sigmoid")
    err_naive = (ra_n.double() - ra64).abs().max().item()
    err_fused = (ra_f.double() - ra64).abs().max().item()
    assert err_fused <= 2 * err_naive + 1e-5, (err_fused, err_naive)
    gerr_naive = (g_n.double() - g64).abs().max().item()
    gerr_fused = (g_f.double() - g64).abs().max().item()
    assert gerr_fused <= 2 * gerr_naive + 1e-4, (gerr_fused, gerr_naive)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_half_inputs_are_ranked_in_fp32(backend):
    case = make_case(8, 40, 3, "labels", "none", seed=2, dtype=torch.float32)
    for dt in (torch.float16, torch.bfloat16):
        s = case.scores.to(dt)
        r = fastrank.rank_sums(s, case.target, backend=backend)
        ref = fastrank.rank_sums(s.float(), case.target, backend="naive")
        assert r.rank_all.dtype == torch.float32
        torch.testing.assert_close(r.rank_all, ref.rank_all, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["naive"] + FUSED_CPU)
def test_nan_scores_give_nan_ranks(backend):
    case = make_case(6, 15, 2, "bool", "none", seed=4)
    s = case.scores.clone()
    s[2, 5] = float("nan")
    r = fastrank.rank_sums(s, case.target, backend=backend, packed=True)
    has = r.index >= 0
    assert torch.isnan(r.rank_all[2][has[2]]).all()
    others = torch.cat([r.rank_all[:2][has[:2]], r.rank_all[3:][has[3:]]])
    assert torch.isfinite(others).all()


def test_torch_backend_chunking_is_exact(monkeypatch):
    # tiny chunks force both the row-block and the split-row paths
    case = make_case(9, 40, 2, "labels", "mask", seed=6)
    ref = _run(case, "torch", "suprank")
    for chunk in ("7", "100", "3000"):
        monkeypatch.setenv("FASTRANK_TORCH_CHUNK", chunk)
        got = _run(case, "torch", "suprank")
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
