"""Recall@k surrogates: every backend vs the fp64 naive cube, the formulas by hand, edge cases."""
import pytest
import torch

import fastrank

from .cases import assert_all_close, make_case, outputs_and_grad
from .conftest import CPU_BACKENDS, FUSED_CPU
from .nan_rows import NAN_BACKENDS, check_nan_rows


def _by_hand(scores, pos, ks, variant, temp=1.0, tau=0.01):
    """Per-query recall straight from the definition, with the naive ranks."""
    r = fastrank.rank_sums(scores, pos, step="suprank" if variant == "suprank" else "sigmoid", tau=tau,
                           backend="naive")
    out = []
    for i in range(scores.shape[0]):
        p = pos[i].nonzero().squeeze(1)
        if p.numel() == 0:
            out.append(0.0)
            continue
        acc = 0.0
        for k in ks:
            hit = torch.sigmoid((k - r.rank_all[i, p]) / temp).sum().item()
            if variant == "patel":
                hit = min(hit, k)
            acc += hit / min(p.numel(), k)
        out.append(acc / len(ks))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("variant", ["suprank", "patel"])
@pytest.mark.parametrize("ks", [(1, 2, 4, 8, 16), (3,), (1, 50)])
def test_recall_formula_by_hand(variant, ks):
    case = make_case(11, 29, 4, "bool", "none", seed=2)
    got = fastrank.recall_at_k(case.scores, case.target, ks=ks, variant=variant, reduction="none", backend="naive")
    torch.testing.assert_close(got, _by_hand(case.scores, case.target, ks, variant))


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("variant", ["suprank", "patel"])
@pytest.mark.parametrize("ignore_kind", ["none", "self", "mask"])
def test_recall_matches_naive(backend, variant, ignore_kind):
    case = make_case(19, 41, 5, "labels", ignore_kind, ties=True, seed=4)

    def recall(b):
        return outputs_and_grad(lambda s: fastrank.recall_at_k(s, case.target, variant=variant, ignore=case.ignore,
                                                               backend=b, reduction="none"), case.scores, seed=None)

    assert_all_close(recall(backend), recall("naive"), rtol=1e-10, atol=1e-12, grad_rtol=1e-9, grad_atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_recall_perfect_and_worst_rankings(backend):
    # two positives ranked 1 and 2: recall@k -> 1 for every k > 2 (at rank = k the sigmoid gives 1/2)
    s = torch.tensor([[0.9, 0.8, -0.5, -0.6, -0.7]], dtype=torch.float64)
    t = torch.tensor([[1, 1, 0, 0, 0]])
    for variant in ("suprank", "patel"):
        half = fastrank.recall_at_k(s, t, ks=(1,), variant=variant, temp=0.01, backend=backend)
        assert half.item() == pytest.approx(0.5, abs=2e-3)
        r = fastrank.recall_at_k(s, t, ks=(3, 4, 16), variant=variant, temp=0.01, backend=backend)
        assert r.item() == pytest.approx(1.0, abs=1e-6)
        # positives ranked last: recall@1 is ~0
        r1 = fastrank.recall_at_k(-s, t, ks=(1,), variant=variant, temp=0.01, backend=backend)
        assert r1.item() < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_recall_unequal_positive_counts_and_no_positive(backend):
    s = torch.rand(3, 7, dtype=torch.float64, requires_grad=True)
    qlab = torch.tensor([0, 1, 9])
    glab = torch.tensor([0, 0, 0, 1, 2, 2, 2])  # 3 positives, 1 positive, none
    r = fastrank.recall_at_k(s, (qlab, glab), reduction="none", backend=backend)
    assert r[2] == 0 and torch.isfinite(r).all()
    mean = fastrank.recall_at_k(s, (qlab, glab), backend=backend)
    torch.testing.assert_close(mean, r[:2].mean())
    mean.backward()
    assert torch.isfinite(s.grad).all()


def test_recall_argument_errors():
    s = torch.rand(2, 3)
    t = torch.ones(2, 3)
    with pytest.raises(ValueError, match="every k in `ks` must be >= 1"):
        fastrank.recall_at_k(s, t, ks=(0, 1))
    with pytest.raises(TypeError, match="`ks` must contain integers"):
        fastrank.recall_at_k(s, t, ks=(1.5,))
    with pytest.raises(TypeError, match="`ks` must be a non-empty sequence"):
        fastrank.recall_at_k(s, t, ks=())
    with pytest.raises(ValueError, match="`variant` must be one of"):
        fastrank.recall_at_k(s, t, variant="smooth")
    with pytest.raises(ValueError, match="`temp` must be a finite number > 0"):
        fastrank.recall_at_k(s, t, temp=0)
    with pytest.raises(ValueError, match="`step` must be one of"):
        fastrank.recall_at_k(s, t, step="exact")


# --------------------------------------------------------------------------- NaN in -> NaN out


@pytest.mark.parametrize("backend", NAN_BACKENDS)
@pytest.mark.parametrize("variant", ["suprank", "patel"])
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_nan_poisons_its_query_with_or_without_positives(backend, variant, ignore_kind):
    def fn(s, t, **kw):
        return fastrank.recall_at_k(s, t, ks=(1, 3), variant=variant, **kw)

    check_nan_rows(fn, backend, ignore_kind)


# --------------------------------------------------------------------------- extreme but accepted parameters


@pytest.mark.parametrize("backend", NAN_BACKENDS)
@pytest.mark.parametrize("temp", [1e-39, 1e-46, 1e-300])
def test_tiny_temp_in_float32_is_a_step_not_nan(backend, temp):
    # negatives far below, positives 0.1 apart: every rank_all is an exact integer, so some equal k
    # and (k - rank) / temp was 0 / 0 once temp was rounded (or flushed) to a float32 zero
    s64 = torch.tensor([[0.9, 0.8, 0.7, -0.9, -0.8], [0.5, -0.9, 0.4, 0.3, -0.7]], dtype=torch.float64)
    target = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]])
    x = s64.float().requires_grad_()
    got = fastrank.recall_at_k(x, target, ks=(1, 2, 3), temp=temp, reduction="none", backend=backend)
    ref = fastrank.recall_at_k(s64, target, ks=(1, 2, 3), temp=temp, reduction="none", backend="naive")
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    got.sum().backward()
    assert torch.isfinite(x.grad).all()
