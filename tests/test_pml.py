"""pytorch-metric-learning drop-ins: parity with PML where PML computes the published loss,
the published definition where it does not, miners, reducers, CrossBatchMemory, patching."""
import pytest
import torch

pml = pytest.importorskip("pytorch_metric_learning")

from pytorch_metric_learning import losses as L  # noqa: E402
from pytorch_metric_learning import miners, reducers  # noqa: E402

import fastrank  # noqa: E402
from fastrank.integrations import pml as P  # noqa: E402


def _batch(classes, per, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(classes * per, dim, generator=g, dtype=torch.float64)
    return emb, torch.arange(classes).repeat_interleave(per)


def _value_and_grad(loss_fn, emb, labels, **kw):
    e = emb.clone().requires_grad_()
    loss = loss_fn(e, labels, **kw)
    (g,) = torch.autograd.grad(loss, e)
    return loss.detach().double(), g


def _assert_parity(theirs, ours, emb, labels, rtol, atol, grad_rtol, grad_atol, **kw):
    """Our drop-in's loss and gradient against PML's on the same batch."""
    v0, g0 = _value_and_grad(theirs, emb, labels, **kw)
    v1, g1 = _value_and_grad(ours, emb, labels, **kw)
    torch.testing.assert_close(v1, v0, rtol=rtol, atol=atol)
    torch.testing.assert_close(g1, g0, rtol=grad_rtol, atol=grad_atol)


@pytest.mark.parametrize("classes,per", [(4, 4), (3, 3), (6, 6)])
def test_smooth_ap_parity_where_pml_is_published(classes, per):
    emb, labels = _batch(classes, per, seed=classes)
    # PML accumulates AP in a float32 buffer: agreement to float32 precision
    _assert_parity(L.SmoothAPLoss(), P.SmoothAPLoss(), emb, labels, 1e-6, 1e-7, 1e-5, 1e-7)


@pytest.mark.parametrize("classes,per", [(4, 3), (2, 5)])
def test_smooth_ap_published_where_pml_differs(classes, per):
    emb, labels = _batch(classes, per, seed=1)
    ours, _ = _value_and_grad(P.SmoothAPLoss(), emb, labels)
    theirs, _ = _value_and_grad(L.SmoothAPLoss(), emb, labels)
    e = torch.nn.functional.normalize(emb, dim=1)
    published = 1 - fastrank.smooth_ap(e @ e.T, (labels, labels), backend="naive")
    torch.testing.assert_close(ours, published, rtol=1e-12, atol=1e-12)
    assert abs(theirs.item() - published.item()) > 1e-3  # PML's grouping bug (documented)


def test_smooth_ap_unequal_unordered_classes():
    emb, _ = _batch(1, 11, seed=3)
    labels = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 2, 5, 5])
    with pytest.raises(ValueError):
        L.SmoothAPLoss()(emb, labels)
    ours = P.SmoothAPLoss()(emb, labels)
    e = torch.nn.functional.normalize(emb, dim=1)
    torch.testing.assert_close(ours, 1 - fastrank.smooth_ap(e @ e.T, (labels, labels), backend="naive"))


@pytest.mark.parametrize("classes,per", [(4, 4), (5, 3), (3, 7)])
def test_fastap_parity(classes, per):
    emb, labels = _batch(classes, per, seed=per)
    _assert_parity(L.FastAPLoss(), P.FastAPLoss(), emb, labels, 1e-10, 1e-12, 1e-8, 1e-12)


def test_fastap_parity_with_miner_and_reducer():
    emb, labels = _batch(4, 5, seed=9)
    miner = miners.MultiSimilarityMiner(epsilon=0.3)
    e = emb.clone()
    tuples = miner(e, labels)
    for reducer in (reducers.MeanReducer(), reducers.SumReducer()):
        _assert_parity(L.FastAPLoss(reducer=reducer), P.FastAPLoss(reducer=reducer), emb, labels,
                       1e-10, 1e-12, 1e-8, 1e-12, indices_tuple=tuples)


def test_ref_emb_is_supported():
    emb, labels = _batch(3, 4, seed=5)
    ref, ref_labels = _batch(3, 6, seed=6)
    for cls in (P.SmoothAPLoss, P.SupAPLoss, P.FastAPLoss, P.RecallAtKLoss, P.SoftBinAPLoss):
        loss = cls()(emb, labels, ref_emb=ref, ref_labels=ref_labels)
        assert torch.isfinite(loss) and 0 <= loss.item() <= 1
    e, r = torch.nn.functional.normalize(emb, dim=1), torch.nn.functional.normalize(ref, dim=1)
    expect = 1 - fastrank.sup_ap(e @ r.T, (labels, ref_labels), backend="naive")
    torch.testing.assert_close(P.SupAPLoss()(emb, labels, ref_emb=ref, ref_labels=ref_labels), expect)


def test_cross_batch_memory_wrapper():
    torch.manual_seed(0)
    with pytest.raises(Exception, match="not supported"):
        L.CrossBatchMemory(P.SmoothAPLoss(), embedding_size=16)  # PML's own wrapper has a fixed list
    xbm = P.CrossBatchMemory(P.SmoothAPLoss(), embedding_size=16, memory_size=24)
    for step in range(4):
        emb, labels = _batch(3, 4, seed=step)
        e = emb.float().requires_grad_()
        loss = xbm(e, labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(e.grad).all()
    # the last call ranked the batch against the whole (full) memory, which holds the batch itself
    mem_e = torch.nn.functional.normalize(xbm.embedding_memory, dim=1)
    q = torch.nn.functional.normalize(emb.float(), dim=1)
    expect = 1 - fastrank.smooth_ap(q @ mem_e.T, (labels, xbm.label_memory), backend="naive")
    torch.testing.assert_close(loss.detach(), expect, rtol=1e-5, atol=1e-6)


def test_no_positive_queries_are_left_out():
    emb, _ = _batch(1, 5, seed=2)
    labels = torch.tensor([0, 0, 1, 2, 3])  # for FastAP (self excluded) only queries 0 and 1 have positives
    loss = P.FastAPLoss()(emb, labels)
    e = torch.nn.functional.normalize(emb, dim=1)
    per_query = fastrank.histogram_ap(e @ e.T, (labels, labels), ignore=torch.arange(5), reduction="none")
    torch.testing.assert_close(loss, 1 - per_query[:2].mean())


@pytest.mark.parametrize("cls", [P.SmoothAPLoss, P.SupAPLoss, P.FastAPLoss, P.RecallAtKLoss, P.SoftBinAPLoss])
def test_nan_query_without_positives_gives_nan(cls):
    # NaN in -> NaN out: a query whose row holds a NaN is kept even when it has no positive
    emb, labels = _batch(3, 4, seed=5)
    ref, ref_labels = _batch(3, 6, seed=6)
    labels = labels.clone()
    labels[0] = 99  # no positive in the gallery
    assert torch.isfinite(cls()(emb, labels, ref_emb=ref, ref_labels=ref_labels))  # query 0 is left out
    emb = emb.clone()
    emb[0, 0] = float("nan")  # only query 0's row is NaN
    assert torch.isnan(cls()(emb, labels, ref_emb=ref, ref_labels=ref_labels))


def test_patch_round_trip():
    original_smooth, original_fast, original_cbm = L.SmoothAPLoss, L.FastAPLoss, L.CrossBatchMemory
    assert not hasattr(L, "SupAPLoss")
    P.patch()
    try:
        assert L.SmoothAPLoss is P.SmoothAPLoss and L.FastAPLoss is P.FastAPLoss and L.SupAPLoss is P.SupAPLoss
        assert L.CrossBatchMemory is P.CrossBatchMemory
        L.CrossBatchMemory(L.SmoothAPLoss(), embedding_size=8)  # builds by name, fused loss accepted
        P.patch()  # idempotent
        loss = getattr(pml.losses, "SmoothAPLoss")()
        assert isinstance(loss, P.SmoothAPLoss)
    finally:
        P.unpatch()
    assert L.SmoothAPLoss is original_smooth and L.FastAPLoss is original_fast
    assert L.CrossBatchMemory is original_cbm
    assert not hasattr(L, "SupAPLoss")


# --------------------------------------------------------------------------- hostile input: arguments


def test_recall_drop_in_accepts_one_k_and_names_bad_ks():
    import numpy as np

    emb, labels = _batch(3, 4)
    torch.testing.assert_close(P.RecallAtKLoss(ks=4)(emb, labels), P.RecallAtKLoss(ks=(4,))(emb, labels))
    assert P.RecallAtKLoss(ks=np.int64(2)).ks == (2,)
    with pytest.raises(ValueError, match=r"RecallAtKLoss: every k in `ks` must be <= 2\*\*63 - 1"):
        P.RecallAtKLoss(ks=1 << 63)
    with pytest.raises(TypeError, match="RecallAtKLoss: `ks` must contain integers"):
        P.RecallAtKLoss(ks=(1, "2"))


@pytest.mark.parametrize("cls,default", [(P.FastAPLoss, 10), (P.SoftBinAPLoss, 25)], ids=["FastAP", "SoftBin"])
def test_num_bins_is_not_truncated(cls, default):
    import numpy as np

    # int(10.7) == 10 silently ran a different loss
    for bad in (10.7, 10.0, "10", True):
        with pytest.raises(TypeError, match=f"{cls.__name__}: `num_bins` must be an integer >= 2"):
            cls(num_bins=bad)
    with pytest.raises(ValueError, match=f"{cls.__name__}: `num_bins` must be >= 2"):
        cls(num_bins=1)
    emb, labels = _batch(3, 4)
    torch.testing.assert_close(cls(num_bins=np.int64(default))(emb, labels), cls()(emb, labels))


def test_value_range_must_be_a_pair():
    for bad, exc in ((1.0, TypeError), ((0.0, 0.5, 1.0), TypeError), ((1.0, 0.0), ValueError),
                     ((0.0, float("inf")), ValueError)):
        with pytest.raises(exc, match="SoftBinAPLoss: `value_range"):
            P.SoftBinAPLoss(value_range=bad)
