"""Relevance builders: relevance_from_hierarchy's explicit column order (coarsest first, or finest
first as in HAPPIER's label files) and relevance_from_multilabel (multi-hot labels) used by
h_ap / ndcg and, binarised, by the AP losses, on every CPU backend and Triton in the interpreter."""
import itertools

import pytest
import torch

import fastrank
from fastrank import relevance_from_hierarchy, relevance_from_multilabel

from .conftest import requires
from .published import published_sup_ap

BACKENDS = [pytest.param(b, marks=requires(b)) for b in ("naive", "torch", "cpp", "triton")]


# --------------------------------------------------------------------------- hierarchy: column order


def _prefix_by_hand(q_levels, g_levels):
    """Shared levels from the coarsest, stopping at the first disagreement; levels coarsest first."""
    out = []
    for a in q_levels:
        row = []
        for b in g_levels:
            n = 0
            for x, y in zip(a, b):
                if x != y:
                    break
                n += 1
            row.append(n)
        out.append(row)
    return out


def test_both_orders_on_happier_style_labels():
    # HAPPIER's SOP labels are [class, super_class]: finest first
    happier = torch.tensor([[10, 1], [11, 1], [20, 2], [10, 1]])
    rel = relevance_from_hierarchy(happier, happier, order="finest_first")
    # same class 2, same super-class only 1, else 0
    assert rel.tolist() == [[2, 1, 0, 2], [1, 2, 0, 1], [0, 0, 2, 0], [2, 1, 0, 2]]
    # the same hierarchy stored coarsest first gives the same relevance
    assert relevance_from_hierarchy(happier.flip(1), happier.flip(1), order="coarsest_first").tolist() == rel.tolist()
    # reading HAPPIER's columns as coarsest first is wrong: same super-class, other class counts 0
    wrong = relevance_from_hierarchy(happier, happier, order="coarsest_first")
    assert wrong[0, 1].item() == 0 and rel[0, 1].item() == 1


@pytest.mark.parametrize("levels", [2, 3, 4])
def test_orders_against_the_definition(levels):
    g = torch.Generator().manual_seed(levels)
    coarse_first = torch.randint(0, 2, (13, levels), generator=g)
    q = coarse_first[:5]
    expect = _prefix_by_hand(q.tolist(), coarse_first.tolist())
    assert relevance_from_hierarchy(q, coarse_first, order="coarsest_first").tolist() == expect
    assert relevance_from_hierarchy(q.flip(1), coarse_first.flip(1), order="finest_first").tolist() == expect
    # shared_levels does not depend on the order (and does not need it)
    any_level = relevance_from_hierarchy(q, coarse_first, "shared_levels")
    for order in ("coarsest_first", "finest_first"):
        assert relevance_from_hierarchy(q, coarse_first, "shared_levels", order=order).tolist() == any_level.tolist()


def test_order_is_required_where_it_matters():
    h = torch.tensor([[0, 1], [0, 2]])
    with pytest.raises(ValueError, match=r"fastrank.relevance_from_hierarchy: `order` is required for "
                                         r"mode='shared_prefix' with 2 levels: order='coarsest_first'"):
        relevance_from_hierarchy(h, h)
    with pytest.raises(ValueError, match="`order` must be one of 'coarsest_first', 'finest_first'"):
        relevance_from_hierarchy(h, h, order="happier")
    with pytest.raises(ValueError, match="`order` must be one of"):
        relevance_from_hierarchy(h[:, :1], h[:, :1], order="coarse")
    # one level, or levels counted anywhere: the order changes nothing, so none is needed
    one = torch.tensor([[3], [4], [3]])
    assert relevance_from_hierarchy(one, one).tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    assert relevance_from_hierarchy(h, h, "shared_levels").tolist() == [[2, 1], [1, 2]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_h_ap_on_finest_first_labels(backend):
    g = torch.Generator().manual_seed(1)
    n = 7 if backend == "triton" else 20
    cls = torch.randint(0, 6, (n,), generator=g)
    happier = torch.stack([cls, cls // 3], 1)  # [class, super_class]
    scores = torch.randn(n, n, generator=g, dtype=torch.float64) * 0.1
    got = fastrank.h_ap(scores, relevance_from_hierarchy(happier, happier, order="finest_first"), backend=backend)
    ref = fastrank.h_ap(scores, relevance_from_hierarchy(happier.flip(1), happier.flip(1), order="coarsest_first"),
                        backend="naive")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- multi-label


def _multi_hot(n, c, seed, p=0.3):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, c, generator=g) < p).to(torch.int64)


def _shared_by_hand(q, g):
    return [[sum(1 for a, b in zip(x, y) if a and b) for y in g] for x in q]


def test_multilabel_hand_example_and_definition():
    q = torch.tensor([[1, 1, 0]])
    g = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 1], [0, 0, 0]])
    assert relevance_from_multilabel(q, g).tolist() == [[2, 1, 0, 0]]
    assert relevance_from_multilabel(q, g, binary=True).tolist() == [[1, 1, 0, 0]]
    for c, seed in itertools.product((1, 5, 17), (0, 1)):
        qm, gm = _multi_hot(6, c, seed), _multi_hot(11, c, seed + 10)
        expect = _shared_by_hand(qm.tolist(), gm.tolist())
        for form in (qm, qm.bool(), qm.float(), qm.to(torch.uint8)):
            rel = relevance_from_multilabel(form, gm.bool())
            assert rel.dtype == torch.float32 and rel.tolist() == expect
        assert relevance_from_multilabel(qm, gm, binary=True).tolist() == [[float(v > 0) for v in r] for r in expect]
    assert relevance_from_multilabel(q, g, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_binarised_multilabel_target_gives_published_sup_ap(backend):
    # an item is a positive when it shares a label with the query: ROADMAP's SupAP on that target
    n = 7 if backend == "triton" else 23
    labels = _multi_hot(n, 4, seed=3, p=0.35)
    labels[n // 2] = 0  # an item without labels: its own only positive, and nobody else's
    emb = torch.nn.functional.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(4),
                                                    dtype=torch.float64), dim=1)
    scores = emb @ emb.T
    target = relevance_from_multilabel(labels, labels, binary=True, dtype=torch.float64)
    # the published code counts the query as its own positive (diagonal 1)
    target_self = target.clone().fill_diagonal_(1.0)
    got = fastrank.sup_ap(scores, target_self, backend=backend)
    torch.testing.assert_close(got, published_sup_ap(scores, target_self), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", [fastrank.h_ap, fastrank.ndcg], ids=["h_ap", "ndcg"])
def test_graded_multilabel_on_every_backend(backend, fn):
    n = 6 if backend == "triton" else 19
    labels = _multi_hot(n, 5, seed=5, p=0.4)
    rel = relevance_from_multilabel(labels, labels, dtype=torch.float64)
    assert rel.max() >= 2  # graded: some pairs share two labels or more
    scores = torch.randn(n, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 0.05

    def value_and_grad(b):
        s = scores.clone().requires_grad_()
        v = fn(s, rel, ignore=torch.arange(n), backend=b)
        (g,) = torch.autograd.grad(v, s)
        return v.detach(), g

    got, ref = value_and_grad(backend), value_and_grad("naive")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-9, atol=1e-11)


def test_binary_multilabel_h_ap_is_sup_ap():
    # relevance in {0, 1} makes H-AP exactly SupAP (and so ROADMAP's published formula)
    labels = _multi_hot(15, 3, seed=7, p=0.4)
    labels[:, 1] = 1 - labels[:, 0]  # every item has a label: every query has a positive
    emb = torch.nn.functional.normalize(torch.randn(15, 6, generator=torch.Generator().manual_seed(8),
                                                    dtype=torch.float64), dim=1)
    scores = emb @ emb.T
    rel = relevance_from_multilabel(labels, labels, binary=True, dtype=torch.float64)
    torch.testing.assert_close(fastrank.h_ap(scores, rel), published_sup_ap(scores, rel), rtol=1e-10, atol=1e-12)


def test_multilabel_validation():
    q = torch.tensor([[1, 0, 1]])
    g = torch.tensor([[1, 1, 0], [0, 0, 1]])
    fn = "fastrank.relevance_from_multilabel"
    with pytest.raises(ValueError, match=f"{fn}: `query_labels` must hold only 0 and 1"):
        relevance_from_multilabel(q * 2, g)
    with pytest.raises(ValueError, match="`gallery_labels` must hold only 0 and 1.*NaN"):
        relevance_from_multilabel(q, torch.tensor([[1.0, float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="same number of labels"):
        relevance_from_multilabel(q, g[:, :2])
    with pytest.raises(ValueError, match="`query_labels` must be 2-D"):
        relevance_from_multilabel(q[0], g)
    with pytest.raises(TypeError, match="`gallery_labels` must be a 2-D multi-hot tensor"):
        relevance_from_multilabel(q, [[1, 0, 1]])
    with pytest.raises(TypeError, match="`binary` must be a bool"):
        relevance_from_multilabel(q, g, binary=1)
    with pytest.raises(TypeError, match="`dtype` must be a floating"):
        relevance_from_multilabel(q, g, dtype=torch.int64)
    with pytest.raises(TypeError, match="bool, integer or floating"):
        relevance_from_multilabel(q.to(torch.complex64), g)
