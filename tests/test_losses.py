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
