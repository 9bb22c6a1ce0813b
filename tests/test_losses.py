"""Loss modules: equal to the functional API, include_self conventions, cross-batch memory, autocast."""
import pytest
import torch
import torch.nn.functional as F

import fastrank
from fastrank.losses import (
    CalibrationLoss,
    FastAPLoss,
    RecallAtKLoss,
    ROADMAPLoss,
    SmoothAPLoss,
    SoftBinAPLoss,
    SupAPLoss,
)
from fastrank.memory import CrossBatchMemory


def _batch(n=14, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 3, 1, 2, 0, 4, 4])[:n]
    return emb, labels


def _scores(emb, ref=None):
    e = F.normalize(emb, dim=1)
    r = e if ref is None else F.normalize(ref, dim=1)
    return e @ r.T


CASES = [
    (SmoothAPLoss(), lambda s, t, ig: fastrank.smooth_ap(s, t, ignore=ig), True),
    (SupAPLoss(), lambda s, t, ig: fastrank.sup_ap(s, t, ignore=ig), True),
    (RecallAtKLoss(), lambda s, t, ig: fastrank.recall_at_k(s, t, ignore=ig), True),
    (FastAPLoss(), lambda s, t, ig: fastrank.histogram_ap(s, t, ignore=ig), False),
    (SoftBinAPLoss(), lambda s, t, ig: fastrank.histogram_ap(s, t, kind="softbin", ignore=ig), False),
]


@pytest.mark.parametrize("module,fn,self_default", CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_module_equals_functional_with_paper_self_convention(module, fn, self_default):
    emb, labels = _batch()
    ignore = None if self_default else torch.arange(len(labels))
    expect = 1 - fn(_scores(emb), (labels, labels), ignore)
    torch.testing.assert_close(module(emb, labels), expect)
    assert module.include_self is self_default


def test_include_self_modes():
    emb, labels = _batch()
    s = _scores(emb)
    q = len(labels)
    torch.testing.assert_close(SupAPLoss(include_self=False)(emb, labels),
                               1 - fastrank.sup_ap(s, (labels, labels), ignore=torch.arange(q)))
    # competitor: the query competes but is not a positive of itself (Patel et al.)
    target = (labels[:, None] == labels[None, :]) & ~torch.eye(q, dtype=torch.bool)
    torch.testing.assert_close(SmoothAPLoss(include_self="competitor")(emb, labels),
                               1 - fastrank.smooth_ap(s, target))
    assert RecallAtKLoss(variant="patel").include_self == "competitor"
    with pytest.raises(ValueError, match="`include_self` must be True, False or 'competitor'"):
        SupAPLoss(include_self="yes")


def test_roadmap_and_calibration():
    emb, labels = _batch()
    s = _scores(emb)
    q = len(labels)
    cal = fastrank.calibration_loss(s, (labels, labels), ignore=torch.arange(q))
    torch.testing.assert_close(CalibrationLoss()(emb, labels), cal)
    sup = 1 - fastrank.sup_ap(s, (labels, labels))
    torch.testing.assert_close(ROADMAPLoss()(emb, labels), sup + cal)
    torch.testing.assert_close(ROADMAPLoss(w_ap=0.9, w_calibration=0.1)(emb, labels), 0.9 * sup + 0.1 * cal)


def test_rectangular_gallery_and_similarity_options():
    emb, labels = _batch()
    ref, ref_labels = _batch(12, seed=3)
    torch.testing.assert_close(SupAPLoss()(emb, labels, ref, ref_labels),
                               1 - fastrank.sup_ap(_scores(emb, ref), (labels, ref_labels)))
    torch.testing.assert_close(SupAPLoss(similarity="dot")(emb, labels, ref, ref_labels),
                               1 - fastrank.sup_ap(emb @ ref.T, (labels, ref_labels)))
    custom = SupAPLoss(similarity=lambda a, b: -torch.cdist(a, b))
    torch.testing.assert_close(custom(emb, labels, ref, ref_labels),
                               1 - fastrank.sup_ap(-torch.cdist(emb, ref), (labels, ref_labels)))
    with pytest.raises(ValueError, match="pass `ref_embeddings` and `ref_labels` together"):
        SupAPLoss()(emb, labels, ref)
    with pytest.raises(ValueError, match="`labels` must be a 1-D tensor of length 14"):
        SupAPLoss()(emb, labels[:3])
    with pytest.raises(ValueError, match="`similarity` must be one of"):
        SupAPLoss(similarity="l2")


def test_cross_batch_memory_ring_buffer_and_self_index():
    mem = CrossBatchMemory(size=10, dim=8, dtype=torch.float64)
    seen = []
    for step in range(3):
        emb, labels = _batch(4, seed=step)
        slots = mem.enqueue(emb, labels)
        seen.append(slots)
        m_emb, m_labels = mem.get()
        torch.testing.assert_close(m_emb[slots], emb)
        assert torch.equal(m_labels[slots], labels)
    assert len(mem) == 10 and torch.equal(seen[2], torch.tensor([8, 9, 0, 1]))
    # ranking the batch against the memory: FastAP leaves each query's own slot out
    emb, labels = _batch(4, seed=2)
    m_emb, m_labels = mem.get()
    got = FastAPLoss()(emb, labels, m_emb, m_labels, self_index=seen[2])
    expect = 1 - fastrank.histogram_ap(_scores(emb, m_emb), (labels, m_labels), ignore=seen[2])
    torch.testing.assert_close(got, expect)
    # a batch larger than the memory keeps its tail
    big, big_labels = _batch(14, seed=5)
    slots = mem.enqueue(big, big_labels)
    assert (slots[:4] == -1).all() and (slots[4:] >= 0).all()
    with pytest.raises(ValueError, match="must be \\(B, 8\\)"):
        mem.enqueue(torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("module", [SmoothAPLoss(), SupAPLoss(), FastAPLoss(), RecallAtKLoss()],
                         ids=lambda m: type(m).__name__)
def test_autocast_bf16_computes_in_fp32_and_returns_input_dtype_grads(module):
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(32, 16, dtype=torch.bfloat16)
    labels = torch.arange(32) // 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(net(x), labels)
    assert loss.dtype == torch.float32
    loss.backward()
    assert net.weight.grad.dtype == torch.bfloat16 and torch.isfinite(net.weight.grad.float()).all()
    # the same step in fp32 on the bf16-rounded parameters: close (bf16 matmul error only)
    net32 = torch.nn.Linear(16, 8)
    with torch.no_grad():
        net32.weight.copy_(net.weight.float())
        net32.bias.copy_(net.bias.float())
    ref = module(net32(x.float()), labels)
    assert abs(loss.item() - ref.item()) < 0.05


# --------------------------------------------------------------------------- hostile input: flags

import numpy as np  # noqa: E402

from fastrank.losses import HAPLoss, NDCGLoss  # noqa: E402

from .conftest import CPU_BACKENDS  # noqa: E402

RANKING_MODULES = [SmoothAPLoss, SupAPLoss, RecallAtKLoss, FastAPLoss, SoftBinAPLoss, CalibrationLoss]
GRADED_MODULES = [HAPLoss, NDCGLoss]


@pytest.mark.parametrize("cls", RANKING_MODULES + GRADED_MODULES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("flag", [1, 0, 1.0, 0.0, np.int64(1), torch.tensor(True)], ids=repr)
def test_include_self_numbers_are_refused(cls, flag):
    # 1 == True passed the old membership test and then failed `is True`: a silent mode change
    with pytest.raises(TypeError, match=f"{cls.__name__}: `include_self` must be True"):
        cls(include_self=flag)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", RANKING_MODULES, ids=lambda c: c.__name__)
def test_include_self_numpy_bool_is_the_bool(cls, backend):
    emb, labels = _batch()
    ref, ref_labels = emb[:10], labels[:10]
    self_index = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, -1, -1, -1, -1])
    kw = {} if cls is CalibrationLoss else dict(backend=backend)
    for flag in (True, False):
        got_mod, ref_mod = cls(include_self=np.bool_(flag), **kw), cls(include_self=flag, **kw)
        assert ref_mod.include_self is flag and got_mod.include_self is flag
        torch.testing.assert_close(got_mod(emb, labels), ref_mod(emb, labels), rtol=0, atol=0)
        torch.testing.assert_close(got_mod(emb, labels, ref, ref_labels, self_index),
                                   ref_mod(emb, labels, ref, ref_labels, self_index), rtol=0, atol=0)
    # the mode is what the name says, not whatever `is True` fails on: False leaves the query out
    s = _scores(emb)
    if cls is SupAPLoss:
        torch.testing.assert_close(cls(include_self=np.bool_(False), **kw)(emb, labels),
                                   1 - fastrank.sup_ap(s, (labels, labels), ignore=torch.arange(len(labels)),
                                                       backend="naive"))


@pytest.mark.parametrize("cls", GRADED_MODULES, ids=lambda c: c.__name__)
def test_graded_include_self_numpy_bool_and_no_competitor(cls):
    emb, labels = _batch()
    hier = torch.stack([labels // 2, labels], 1)
    rel = fastrank.relevance_from_hierarchy(hier, hier, order="coarsest_first")
    for flag in (True, False):
        torch.testing.assert_close(cls(include_self=np.bool_(flag))(emb, rel), cls(include_self=flag)(emb, rel))
    with pytest.raises(ValueError, match=f"{cls.__name__}: `include_self` must be True or False"):
        cls(include_self="competitor")


def test_include_self_attribute_set_later_is_checked_too():
    emb, labels = _batch()
    loss = SupAPLoss()
    loss.include_self = 0
    with pytest.raises(TypeError, match="SupAPLoss: `include_self` must be True"):
        loss(emb, labels)


# --------------------------------------------------------------------------- hostile input: module arguments


def test_recall_module_accepts_one_k_like_the_functional():
    emb, labels = _batch()
    torch.testing.assert_close(RecallAtKLoss(ks=4)(emb, labels), RecallAtKLoss(ks=(4,))(emb, labels))
    torch.testing.assert_close(RecallAtKLoss(ks=4)(emb, labels),
                               1 - fastrank.recall_at_k(_scores(emb), (labels, labels), ks=4))
    assert RecallAtKLoss(ks=np.int64(4)).ks == (4,)
    with pytest.raises(ValueError, match=r"RecallAtKLoss: every k in `ks` must be <= 2\*\*63 - 1"):
        RecallAtKLoss(ks=(1, 1 << 64))
    with pytest.raises(ValueError, match="RecallAtKLoss: every k in `ks` must be >= 1"):
        RecallAtKLoss(ks=0)
    with pytest.raises(TypeError, match="RecallAtKLoss: `ks` must contain integers"):
        RecallAtKLoss(ks=(1, 2.5))
    with pytest.raises(ValueError, match="RecallAtKLoss: `variant` must be one of"):
        RecallAtKLoss(variant="patel_et_al")


def _bad_module_calls():
    emb, labels = _batch()
    ref, ref_labels = _batch(10, seed=4)
    good = torch.arange(14) % 10
    return [
        # (args, exception, message)
        ((emb.tolist(), labels), TypeError, "SupAPLoss: `embeddings` must be a 2-D floating tensor"),
        ((emb.long(), labels), TypeError, "SupAPLoss: `embeddings` must be a 2-D floating tensor"),
        ((emb[0], labels), ValueError, "SupAPLoss: `embeddings` must be 2-D"),
        ((emb.to_sparse(), labels), TypeError, r"SupAPLoss: `embeddings` must be a dense \(strided\) tensor"),
        ((emb.to("meta"), labels.to("meta")), ValueError, "SupAPLoss: `embeddings` is on the meta device"),
        ((emb, labels.float()), TypeError, "SupAPLoss: `labels` must be an integer tensor"),
        ((emb, labels.bool()), TypeError, "SupAPLoss: `labels` must be an integer tensor"),
        ((emb, labels.tolist()), TypeError, "SupAPLoss: `labels` must be a 1-D integer tensor"),
        ((emb, labels.to("meta")), ValueError, "SupAPLoss: `labels` is on the meta device"),
        ((emb, labels, ref, ref_labels.tolist()), TypeError, "SupAPLoss: `ref_labels` must be a 1-D integer tensor"),
        ((emb, labels, ref, ref_labels.float()), TypeError, "SupAPLoss: `ref_labels` must be an integer tensor"),
        ((emb, labels, ref, ref_labels[:3]), ValueError, r"SupAPLoss: `ref_labels` must be a 1-D tensor of length 10"),
        ((emb, labels, ref.tolist(), ref_labels), TypeError, "SupAPLoss: `ref_embeddings` must be a 2-D floating"),
        ((emb, labels, ref[:, :5], ref_labels), ValueError, r"SupAPLoss: `ref_embeddings` must be \(N, 8\)"),
        ((emb, labels, ref, ref_labels, good.tolist()), TypeError,
         "SupAPLoss: `self_index` must be None or a 1-D integer tensor"),
        ((emb, labels, ref, ref_labels, good.float()), TypeError, "SupAPLoss: `self_index` must be an integer"),
        ((emb, labels, ref, ref_labels, good[:3]), ValueError, r"SupAPLoss: `self_index` must have shape \(14,\)"),
        ((emb, labels, ref, ref_labels, torch.where(good == 3, 10, good)), ValueError,
         r"SupAPLoss: `self_index` values must lie in \[-1, 9\]"),
        ((emb, labels, ref, ref_labels, torch.where(good == 3, -2, good)), ValueError,
         r"SupAPLoss: `self_index` values must lie in \[-1, 9\]"),
    ]


@pytest.mark.parametrize("include_self", [True, False, "competitor"])
@pytest.mark.parametrize("case", range(len(_bad_module_calls())))
def test_module_arguments_are_named_as_the_module_names_them(case, include_self):
    args, exc, text = _bad_module_calls()[case]
    with pytest.raises(exc, match=text):
        SupAPLoss(include_self=include_self)(*args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_self_index_range_is_checked_before_use(backend):
    # "competitor" indexed the target with self_index (IndexError past N, a silent wrap below -1)
    emb, labels = _batch()
    ref, ref_labels = _batch(10, seed=4)
    for bad in (10, 25, -2, -11):
        idx = torch.full((14,), -1)
        idx[3] = bad
        for mode in (True, False, "competitor"):
            with pytest.raises(ValueError, match=r"`self_index` values must lie in \[-1, 9\] "
                                                 r"\(-1 = absent; the gallery has 10 items\)"):
                SmoothAPLoss(include_self=mode, backend=backend)(emb, labels, ref, ref_labels, idx)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.int32, torch.uint8], ids=str)
def test_module_labels_of_any_integer_dtype(dtype, backend):
    emb, labels = _batch()
    ref, ref_labels = _batch(10, seed=4)
    idx = torch.arange(14) % 10
    for mode in (True, False, "competitor"):
        loss = SupAPLoss(include_self=mode, backend=backend)
        torch.testing.assert_close(loss(emb, labels.to(dtype)), loss(emb, labels))
        torch.testing.assert_close(loss(emb, labels.to(dtype), ref, ref_labels.to(dtype), idx.to(dtype)),
                                   loss(emb, labels, ref, ref_labels, idx))
        # mixed dtypes: torch cannot promote uint16/32/64 against other integers
        torch.testing.assert_close(loss(emb, labels.to(dtype), ref, ref_labels, idx),
                                   loss(emb, labels, ref, ref_labels, idx))


def test_callable_similarity_output_is_checked():
    emb, labels = _batch()
    with pytest.raises(ValueError, match=r"SupAPLoss: `similarity` must return a \(14, 14\) tensor"):
        SupAPLoss(similarity=lambda a, b: a @ b.T[:, :3])(emb, labels)
    with pytest.raises(TypeError, match=r"SupAPLoss: `similarity` must return a \(14, 14\) tensor"):
        SupAPLoss(similarity=lambda a, b: (a @ b.T).tolist())(emb, labels)


def test_graded_module_embeddings_are_named():
    emb, labels = _batch()
    rel = fastrank.relevance_from_hierarchy(labels[:, None], labels[:, None])
    with pytest.raises(TypeError, match="HAPLoss: `embeddings` must be a 2-D floating tensor"):
        HAPLoss()(emb.long(), rel)
    with pytest.raises(ValueError, match=r"HAPLoss: `ref_embeddings` must be \(N, 8\)"):
        HAPLoss()(emb, rel, emb[:, :4])


# --------------------------------------------------------------------------- hostile input: cross-batch memory


def test_memory_refuses_meta_and_foreign_batches():
    mem = CrossBatchMemory(size=6, dim=8)
    with pytest.raises(ValueError, match="CrossBatchMemory.enqueue: `embeddings` is on the meta device"):
        mem.enqueue(torch.zeros(2, 8, device="meta"), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="CrossBatchMemory.enqueue: `labels` is on the meta device"):
        mem.enqueue(torch.zeros(2, 8), torch.zeros(2, dtype=torch.int64, device="meta"))
    assert len(mem) == 0 and mem.ptr == 0  # nothing stored, nothing counted
    with pytest.raises(TypeError, match="CrossBatchMemory.enqueue: `embeddings` must be a 2-D floating tensor"):
        mem.enqueue(torch.zeros(2, 8).tolist(), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="CrossBatchMemory.enqueue: `embeddings` must be a 2-D floating tensor"):
        mem.enqueue(torch.zeros(2, 8, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="CrossBatchMemory.enqueue: `labels` must be a 1-D integer tensor"):
        mem.enqueue(torch.zeros(2, 8), [0, 1])
    with pytest.raises(TypeError, match=r"CrossBatchMemory.enqueue: `embeddings` must be a dense \(strided\)"):
        mem.enqueue(torch.zeros(2, 8).to_sparse(), torch.zeros(2, dtype=torch.int64))
    assert len(mem) == 0
    # uint labels are stored as int64
    mem.enqueue(torch.ones(2, 8), torch.tensor([3, 4], dtype=torch.uint32))
    assert torch.equal(mem.get()[1], torch.tensor([3, 4]))


def test_memory_device_mismatch_is_refused(monkeypatch):
    # only meta is available besides the CPU here: a meta memory stands for "another device"
    mem = CrossBatchMemory(size=6, dim=8)
    mem.embeddings = mem.embeddings.to("meta")
    with pytest.raises(ValueError, match=r"CrossBatchMemory.enqueue: `embeddings` is on cpu but the memory is on meta"):
        mem.enqueue(torch.zeros(2, 8), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, "float32"], ids=str)
def test_memory_dtype_must_be_floating(dtype):
    with pytest.raises(TypeError, match="CrossBatchMemory: `dtype` must be a floating torch.dtype"):
        CrossBatchMemory(size=4, dim=3, dtype=dtype)


def test_memory_refuses_meta_device_and_bad_sizes():
    with pytest.raises(ValueError, match="CrossBatchMemory: `device` is the meta device"):
        CrossBatchMemory(size=4, dim=3, device="meta")
    with pytest.raises(TypeError, match="CrossBatchMemory: `size` must be an integer >= 1"):
        CrossBatchMemory(size=4.0, dim=3)
    with pytest.raises(ValueError, match="CrossBatchMemory: `dim` must be >= 1"):
        CrossBatchMemory(size=4, dim=0)
    assert CrossBatchMemory(size=np.int64(4), dim=3).size == 4


def test_histogram_modules_check_bins_and_range_when_built():
    # int(10.5)/tuple(1.0) used to truncate or raise "'float' object is not iterable"
    for cls in (FastAPLoss, SoftBinAPLoss):
        for bad, exc in ((10.5, TypeError), ("10", TypeError), (True, TypeError), (1, ValueError)):
            with pytest.raises(exc, match=f"{cls.__name__}: `bins` must be"):
                cls(bins=bad)
    for bad, exc in ((1.0, TypeError), ((0.0,), TypeError), ((1.0, 1.0), ValueError),
                     ((0.0, float("nan")), ValueError)):
        with pytest.raises(exc, match="SoftBinAPLoss: `range"):
            SoftBinAPLoss(range=bad)
    emb, labels = _batch()
    torch.testing.assert_close(SoftBinAPLoss(bins=np.int64(25), range=[0, 1])(emb, labels),
                               SoftBinAPLoss()(emb, labels))
