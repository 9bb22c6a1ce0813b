"""fastrank.ltr: approx NDCG / approx MRR on (batch, slate) scores against transcriptions of
allRank's approxNDCGLoss and TF-Ranking's ApproxNDCG / ApproxMRR (tests/published.py), on every
CPU backend and Triton in the interpreter (tiny slates there)."""
import pytest
import torch

import fastrank
from fastrank import ltr

from .conftest import requires
from .published import published_allrank_approx_ndcg, published_tfr_approx_mrr, published_tfr_approx_ndcg

BACKENDS = [pytest.param(b, marks=requires(b)) for b in ("naive", "torch", "cpp", "triton")]


def _slates(b, s, seed, pad_frac=0.25, scale=1.0, dtype=torch.float64):
    """Scores ~ N(0, scale), graded labels 0..4 with ties, ~pad_frac padded (-1) at the end of a
    slate (allRank pads the tail); slate 1 all zero (no relevant item), slate 2 fully padded when b > 3."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, s, generator=g, dtype=dtype) * scale
    labels = torch.randint(0, 5, (b, s), generator=g).to(dtype)
    lengths = s - (torch.rand(b, generator=g) * pad_frac * s).long()
    labels[torch.arange(s).unsqueeze(0) >= lengths.unsqueeze(1)] = -1
    if b > 1:
        labels[1] = torch.where(labels[1] >= 0, 0.0, -1.0)
    if b > 3:
        labels[2] = -1
    return scores, labels


def _value_and_grad(fn, scores):
    s = scores.clone().requires_grad_()
    v = fn(s)
    (g,) = torch.autograd.grad(v, s)
    return v.detach(), g


# --------------------------------------------------------------------------- allRank's approxNDCGLoss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_approx_ndcg_equals_allrank(backend, alpha):
    b, s = (5, 6) if backend == "triton" else (9, 23)
    scores, labels = _slates(b, s, seed=int(alpha))
    # |alpha * d| < 23 here, so allRank's eps floor on each sigmoid term is inactive: equal to rounding
    assert (alpha * (scores.amax() - scores.amin())).item() < 23
    got = _value_and_grad(lambda x: ltr.approx_ndcg(x, labels, alpha=alpha, backend=backend), scores)
    ref = _value_and_grad(lambda x: published_allrank_approx_ndcg(x, labels, alpha=alpha), scores)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-9, atol=1e-11)
    # and the drop-in's value is allRank's (its loss is -mean NDCG)
    torch.testing.assert_close(ltr.approxNDCGLoss(scores, labels, alpha=alpha), -ref[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["naive", "cpp"])
def test_slates_without_relevant_items_count_zero_in_the_mean(backend):
    scores, labels = _slates(6, 11, seed=3)  # slate 1: labels all 0; slate 2: all padding
    per = ltr.approx_ndcg(scores, labels, reduction="none", backend=backend)
    assert per[1].item() == 0.0 and per[2].item() == 0.0  # 0/0: allRank's eps on IDCG makes it 0
    assert (per[[0, 3, 4, 5]] > 0).all()
    # allRank's torch.mean over every slate, the zero ones included
    torch.testing.assert_close(ltr.approx_ndcg(scores, labels, backend=backend), per.mean())
    torch.testing.assert_close(per.mean(), published_allrank_approx_ndcg(scores, labels), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ltr.approx_ndcg(scores, labels, reduction="sum", backend=backend), per.sum())
    # gradient: none reaches a slate without a relevant item, nor a padded entry
    _, g = _value_and_grad(lambda x: ltr.approx_ndcg(x, labels, backend=backend), scores)
    assert (g[1] == 0).all() and (g[2] == 0).all() and (g[labels == -1] == 0).all()


def test_allrank_eps_floor_is_the_only_difference():
    # a steep alpha: many alpha * (s_j - s_k) > 23, where allRank floors sigmoid at eps = 1e-10;
    # each such pair adds < eps to a rank, so |NDCG difference| <= slate^2 * eps
    scores, labels = _slates(7, 19, seed=4, scale=3.0)
    ours = ltr.approx_ndcg(scores, labels, alpha=10.0, reduction="none")
    theirs = torch.stack([published_allrank_approx_ndcg(scores[i:i + 1], labels[i:i + 1], alpha=10.0)
                          for i in range(7)])
    diff = (ours - theirs).abs().max().item()
    assert diff <= 19 * 19 * 1e-10
    # the floor makes allRank's ranks larger, so its NDCG is never above ours
    assert (theirs <= ours + 1e-15).all()
    # without the floor (eps = 0 in both), the two agree to rounding on the slates with a relevant
    # item (allRank's eps = 0 gives 0/0 = NaN for slates 1 and 2, ours 0)
    keep = [0, 3, 4, 5, 6]
    torch.testing.assert_close(ltr.approx_ndcg(scores[keep], labels[keep], alpha=10.0, eps=0.0),
                               published_allrank_approx_ndcg(scores[keep], labels[keep], alpha=10.0, eps=0.0),
                               rtol=1e-10, atol=1e-12)
    assert (ltr.approx_ndcg(scores, labels, alpha=10.0, eps=0.0, reduction="none")[[1, 2]] == 0).all()


def test_tiny_ideal_dcg_is_divided_by_eps_as_allrank_does():
    scores = torch.tensor([[0.3, -0.2, 0.1], [0.5, 0.4, -1.0]], dtype=torch.float64)
    labels = torch.tensor([[1e-11, 0.0, 0.0], [2.0, 1.0, 0.0]], dtype=torch.float64)  # IDCG ~ 7e-12 < eps
    got = ltr.approx_ndcg(scores, labels, reduction="none")
    ref = torch.stack([published_allrank_approx_ndcg(scores[i:i + 1], labels[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-15)
    assert got[0].item() < 0.1  # not 1: the eps bound is applied
    assert ltr.approx_ndcg(scores, labels, eps=0.0, reduction="none")[0].item() > 0.5


# --------------------------------------------------------------------------- TF-Ranking


def test_tf_ranking_documented_examples():
    # the values in TF-Ranking's ApproxMRRLoss docstring (temperature 0.1 = alpha 10), float32;
    # the ragged example written as padding
    one = ltr.approx_mrr(torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0]]))
    assert one.item() == pytest.approx(0.53168947, abs=1e-6)
    two = ltr.approx_mrr(torch.tensor([[0.6, 0.8, 0.0], [0.5, 0.8, 0.4]]),
                         torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]))
    assert two.item() == pytest.approx(0.73514676, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_approx_mrr_equals_tf_ranking(backend):
    b, s = (4, 5) if backend == "triton" else (8, 17)
    scores, labels = _slates(b, s, seed=6)
    labels[0] = torch.where(labels[0] >= 0, (labels[0] == 4).double(), -1.0)  # binary labels too
    got = _value_and_grad(lambda x: ltr.approx_mrr(x, labels, reduction="none", backend=backend).sum(), scores)
    per = ltr.approx_mrr(scores, labels, reduction="none", backend=backend)

    def theirs(x):
        mrr, w = published_tfr_approx_mrr(labels, x)
        return torch.where(w > 0, mrr, torch.zeros_like(mrr))

    ref = _value_and_grad(lambda x: theirs(x).sum(), scores)
    mrr, w = published_tfr_approx_mrr(labels, scores)
    keep = w > 0
    torch.testing.assert_close(per[keep], mrr[keep], rtol=1e-10, atol=1e-12)
    assert (per[~keep] == 0).all()
    torch.testing.assert_close(got[1], ref[1], rtol=1e-9, atol=1e-11)
    # TF-Ranking's reduction (weight 0 for a slate without a relevant item) from reduction="none"
    torch.testing.assert_close(per[keep].mean(), (mrr * w).sum() / w.sum(), rtol=1e-10, atol=1e-12)


def test_single_relevant_item_is_its_reciprocal_rank():
    scores = torch.tensor([[0.2, 0.9, -0.4, 0.5]], dtype=torch.float64)
    labels = torch.tensor([[0, 0, 1, 0]])
    rank = 1 + torch.sigmoid(10 * (scores[0, [0, 1, 3]] - scores[0, 2])).sum()
    assert ltr.approx_mrr(scores, labels).item() == pytest.approx(1 / rank.item(), rel=1e-12)


@pytest.mark.parametrize("backend", ["naive", "torch", "cpp"])
def test_approx_ndcg_equals_tf_ranking_on_slates_with_a_relevant_item(backend):
    scores, labels = _slates(7, 13, seed=8)
    ours = ltr.approx_ndcg(scores, labels, alpha=10.0, reduction="none", backend=backend)
    theirs, w = published_tfr_approx_ndcg(labels, scores, alpha=10.0)
    keep = w > 0
    assert keep.sum() >= 4 and (~keep).sum() == 2
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-10, atol=1e-12)


def test_equals_fastrank_ndcg_with_the_sigmoid_step():
    scores, labels = _slates(5, 12, seed=9)
    got = ltr.approx_ndcg(scores, labels, alpha=4.0, reduction="none")
    ref = fastrank.ndcg(scores, labels.clamp(min=0), step="sigmoid", tau=0.25, ignore=labels == -1,
                        reduction="none")
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


# --------------------------------------------------------------------------- odd input


@pytest.mark.parametrize("backend", ["naive", "torch", "cpp"])
def test_slate_of_one_ties_and_integer_labels(backend):
    one = ltr.approx_ndcg(torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[2]]), backend=backend)
    assert one.item() == 1.0
    assert ltr.approx_mrr(torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[2]]), backend=backend).item() == 1
    # exact ties: sigmoid(0) = 1/2 per tied competitor, as in both references
    scores = torch.zeros(2, 4, dtype=torch.float64)
    labels = torch.tensor([[3, 0, 1, -1], [1, 1, 0, 0]])
    torch.testing.assert_close(ltr.approx_ndcg(scores, labels, backend=backend),
                               published_allrank_approx_ndcg(scores, labels.double()), rtol=1e-12, atol=1e-14)
    mrr, _ = published_tfr_approx_mrr(labels.double(), scores)
    torch.testing.assert_close(ltr.approx_mrr(scores, labels, reduction="none", backend=backend), mrr,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["naive", "torch", "cpp"])
def test_nan_in_nan_out_padding_excluded(backend):
    scores, labels = _slates(5, 9, seed=10)
    scores = scores.clone()
    scores[labels == -1] = float("nan")  # padded NaN: left out
    for fn in (ltr.approx_ndcg, ltr.approx_mrr):
        assert torch.isfinite(fn(scores, labels, reduction="none", backend=backend)).all()
    scores[1, 0] = float("nan")  # slate 1 has no relevant item: still NaN
    scores[3, 1] = float("nan")
    for fn in (ltr.approx_ndcg, ltr.approx_mrr):
        per = fn(scores, labels, reduction="none", backend=backend)
        assert torch.isnan(per[[1, 3]]).all() and torch.isfinite(per[[0, 2, 4]]).all()
        assert torch.isnan(fn(scores, labels, backend=backend))


def test_half_precision_ranks_in_float32():
    scores, labels = _slates(4, 10, seed=11, dtype=torch.float32)
    half = scores.half()
    for fn in (ltr.approx_ndcg, ltr.approx_mrr):
        got = fn(half, labels)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, fn(half.float(), labels), rtol=1e-6, atol=1e-7)


def test_custom_padding_value():
    scores, labels = _slates(4, 8, seed=12)
    other = torch.where(labels == -1, -7.0, labels)
    torch.testing.assert_close(ltr.approx_ndcg(scores, other, padded_value_indicator=-7),
                               ltr.approx_ndcg(scores, labels))


def test_bad_arguments_are_named():
    scores, labels = _slates(3, 5, seed=0)
    fn = "fastrank.ltr.approx_ndcg"
    with pytest.raises(ValueError, match=f"{fn}: `labels` must have the shape of `scores`"):
        ltr.approx_ndcg(scores, labels[:, :4])
    with pytest.raises(TypeError, match=f"{fn}: `labels` must be a floating or integer tensor"):
        ltr.approx_ndcg(scores, labels > 0)
    with pytest.raises(TypeError, match=f"{fn}: `labels` must be a"):
        ltr.approx_ndcg(scores, [[0, 1]])
    bad = labels.clone()
    bad[0, 0] = -2
    with pytest.raises(ValueError, match=r"`labels` must be >= 0 or the padding value -1, got -2"):
        ltr.approx_ndcg(scores, bad)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="`labels` must be finite"):
        ltr.approx_mrr(scores, bad)
    for alpha in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="`alpha` must be a finite number > 0"):
            ltr.approx_mrr(scores, labels, alpha=alpha)
    with pytest.raises(ValueError, match=r"`alpha` must lie in .* for torch.float32 scores"):
        ltr.approx_ndcg(scores.float(), labels, alpha=1e39)
    with pytest.raises(ValueError, match="`eps` must be a finite number >= 0"):
        ltr.approx_ndcg(scores, labels, eps=-1e-10)
    with pytest.raises(ValueError, match="`reduction`"):
        ltr.approx_ndcg(scores, labels, reduction="batchmean")
    with pytest.raises(ValueError, match="`scores` must be 2-D"):
        ltr.approx_ndcg(scores[0], labels[0])
    with pytest.raises(TypeError, match="`padded_value_indicator` must be a real number"):
        ltr.approx_ndcg(scores, labels, padded_value_indicator="pad")
