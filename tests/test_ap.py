"""Smooth-AP, SupAP and calibration: published numbers, reductions, degenerate batches."""
import pytest
import torch
import torch.nn.functional as F

import fastrank

from .cases import assert_zero_without_positives, make_case, nan_label_batch
from .conftest import CPU_BACKENDS
from .nan_rows import NAN_BACKENDS, POISONED, check_nan_rows, nan_problem
from .published import published_smooth_ap, published_sup_ap


def _batch(num_id, per, dim=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(num_id * per, dim, generator=g, dtype=dtype), dim=1)
    labels = torch.arange(num_id).repeat_interleave(per)
    return emb, labels


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_id,per", [(4, 4), (3, 5), (8, 2)])
def test_smooth_ap_equals_published(backend, num_id, per):
    emb, labels = _batch(num_id, per, seed=num_id)
    expect = published_smooth_ap(emb, num_id)
    got = fastrank.smooth_ap(emb @ emb.T, (labels, labels), backend=backend)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_id,per", [(4, 4), (3, 5), (8, 2)])
def test_sup_ap_equals_published(backend, num_id, per):
    emb, labels = _batch(num_id, per, seed=num_id + 1)
    scores = emb @ emb.T
    target = (labels.unsqueeze(0) == labels.unsqueeze(1)).to(torch.float64)
    expect = published_sup_ap(scores, target)
    got = fastrank.sup_ap(scores, target, backend=backend)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)


# every backend vs naive, with unequal classes and every ignore form: tests/test_rank_sums.py


@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reductions_and_queries_without_positives(fn, backend):
    scores = torch.rand(4, 6, dtype=torch.float64)
    qlab = torch.tensor([0, 1, 7, 0])  # query 2 has no positive
    glab = torch.tensor([0, 1, 0, 1, 2, 2])
    per_query = fn(scores, (qlab, glab), reduction="none", backend=backend)
    assert per_query.shape == (4,)
    assert per_query[2] == 0 and torch.isfinite(per_query).all()
    assert ((per_query[[0, 1, 3]] > 0) & (per_query[[0, 1, 3]] <= 1)).all()
    mean = fn(scores, (qlab, glab), backend=backend)
    torch.testing.assert_close(mean, per_query[[0, 1, 3]].mean())
    torch.testing.assert_close(fn(scores, (qlab, glab), reduction="sum", backend=backend), per_query.sum())


@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_positive_anywhere_is_zero_and_differentiable(fn, backend):
    assert_zero_without_positives(lambda x, t: fn(x, t, backend=backend), torch.rand(5, 8, dtype=torch.float64),
                                  torch.zeros(5, 8, dtype=torch.bool))


@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_perfect_ranking_gives_ap_near_one(fn, backend):
    # positives far above negatives: AP -> 1 (ties among positives count as rank-sharing under H)
    s = torch.tensor([[0.9, 0.8, -0.5, -0.6, 0.7]], dtype=torch.float64)
    t = torch.tensor([[1, 1, 0, 0, 1]])
    ap = fn(s, t, backend=backend)
    assert ap.item() == pytest.approx(1.0, abs=1e-6)
    # and a reversed ranking is clearly worse
    assert fn(-s, t, backend=backend).item() < 0.7


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_item_positive_gives_ap_one_for_suprank(backend):
    s = torch.rand(3, 9, dtype=torch.float64)
    ap = fastrank.sup_ap(s, torch.ones(3, 9), backend=backend, reduction="none")
    torch.testing.assert_close(ap, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_score_gives_nan_loss(backend):
    s, target = nan_label_batch(4, (1, 3))
    assert torch.isnan(fastrank.sup_ap(s, target, backend=backend))
    assert torch.isnan(fastrank.smooth_ap(s, target, backend=backend))


def _calibration_by_hand(scores, pos, valid, pm=0.9, nm=0.6):
    pos_terms = [max(pm - scores[i, j].item(), 0.0) for i in range(scores.shape[0]) for j in range(scores.shape[1])
                 if pos[i, j] and valid[i, j]]
    neg_terms = [max(scores[i, j].item() - nm, 0.0) for i in range(scores.shape[0]) for j in range(scores.shape[1])
                 if not pos[i, j] and valid[i, j]]
    nz_p = [t for t in pos_terms if t > 0]
    nz_n = [t for t in neg_terms if t > 0]
    return (sum(nz_p) / len(nz_p) if nz_p else 0.0) + (sum(nz_n) / len(nz_n) if nz_n else 0.0)


@pytest.mark.parametrize("ignore_kind", ["none", "self", "mask"])
def test_calibration_loss_by_hand(ignore_kind):
    case = make_case(9, 9, 3, "labels", ignore_kind, seed=7)
    qlab, glab = case.target
    pos = qlab.unsqueeze(1) == glab.unsqueeze(0)
    valid = torch.ones(9, 9, dtype=torch.bool)
    if ignore_kind == "self":
        valid &= ~torch.eye(9, dtype=torch.bool)
    elif ignore_kind == "mask":
        valid &= ~case.ignore
    got = fastrank.calibration_loss(case.scores, case.target, ignore=case.ignore)
    assert got.item() == pytest.approx(_calibration_by_hand(case.scores, pos, valid), rel=1e-12)


def test_calibration_loss_zero_when_margins_met_and_nan_propagates():
    s = torch.tensor([[0.95, 0.1], [0.2, 0.99]], dtype=torch.float64, requires_grad=True)
    loss = fastrank.calibration_loss(s, torch.eye(2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    s2 = s.detach().clone()
    s2[0, 1] = float("nan")
    assert torch.isnan(fastrank.calibration_loss(s2, torch.eye(2, dtype=torch.bool)))


@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap, fastrank.recall_at_k, fastrank.histogram_ap])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_item_ignored_for_one_query(fn, backend):
    s = torch.rand(3, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    ignore = torch.zeros(3, 6, dtype=torch.bool)
    ignore[1] = True  # query 1 sees nothing: no positive, no competitor
    per_query = fn(s, (labels[:3], labels), ignore=ignore, backend=backend, reduction="none")
    assert per_query[1] == 0 and torch.isfinite(per_query).all()
    mean = fn(s, (labels[:3], labels), ignore=ignore, backend=backend)
    torch.testing.assert_close(mean, per_query[[0, 2]].mean())
    mean.backward()
    assert torch.equal(s.grad[1], torch.zeros(6, dtype=torch.float64))


# --------------------------------------------------------------------------- NaN in -> NaN out


@pytest.mark.parametrize("backend", NAN_BACKENDS)
@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap], ids=["smooth_ap", "sup_ap"])
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_nan_poisons_its_query_with_or_without_positives(backend, fn, ignore_kind):
    check_nan_rows(fn, backend, ignore_kind)


@pytest.mark.parametrize("ignore_kind", ["index", "mask"])
def test_calibration_loss_nan_at_a_valid_item_only(ignore_kind):
    s, labels, ignore = nan_problem(ignore_kind)
    assert torch.isnan(fastrank.calibration_loss(s, labels, ignore=ignore))
    # only an ignored NaN left: the loss is the one without it
    clean = s.clone()
    clean[POISONED] = 0.5
    got = fastrank.calibration_loss(clean, labels, ignore=ignore)
    expect = fastrank.calibration_loss(clean.nan_to_num(0.5), labels, ignore=ignore)
    assert torch.isfinite(got) and got == expect
