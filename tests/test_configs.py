"""Published configurations from the modules: the step parameters of every module and PML drop-in
against the transcriptions in tests/published.py; Patel's Recall@k with the query out of its
positives; the PML drop-ins' output dtypes (PML's, computing in float32); CrossBatchMemory's
supported_losses(); the README's configuration table constructs."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastrank
from fastrank import ltr
from fastrank.losses import HAPLoss, NDCGLoss, RecallAtKLoss, ROADMAPLoss, SupAPLoss

from .published import published_patel_recall, published_smooth_ap, published_sup_ap

CONFIGS = [dict(offset=1.44), dict(offset=1.0, start=0.0), dict(offset=1.44, rho=50.0, delta=0.02)]


def _batch(n=16, dim=6, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    return emb, labels


def _cos(emb):
    e = F.normalize(emb, dim=1)
    return e @ e.T


def _differs(a, b):
    assert abs(float(a) - float(b)) > 1e-6, "the parameter changed nothing: the test could not fail"


# --------------------------------------------------------------------------- step parameters of the modules


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("backend", ["naive", "torch", "cpp"])
def test_roadmap_and_supap_modules_reproduce_published_configs(cfg, backend):
    emb, labels = _batch(seed=1)
    s = _cos(emb)
    target = (labels[:, None] == labels[None, :]).double()
    published = 1 - published_sup_ap(s, target, **cfg)
    _differs(published, 1 - published_sup_ap(s, target))
    torch.testing.assert_close(SupAPLoss(backend=backend, **cfg)(emb, labels), published, rtol=1e-10, atol=1e-12)
    cal = fastrank.calibration_loss(s, (labels, labels), ignore=torch.arange(len(labels)))
    torch.testing.assert_close(ROADMAPLoss(backend=backend, **cfg)(emb, labels), published + cal,
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ROADMAPLoss(0.9, 0.1, backend=backend, **cfg)(emb, labels), 0.9 * published + 0.1 * cal,
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=["offset", "offset+start"])
def test_pml_supap_reproduces_published_configs(cfg):
    pytest.importorskip("pytorch_metric_learning")
    from fastrank.integrations import pml as P

    emb, labels = _batch(seed=2)
    target = (labels[:, None] == labels[None, :]).double()
    published = 1 - published_sup_ap(_cos(emb), target, **cfg)
    torch.testing.assert_close(P.SupAPLoss(**cfg)(emb, labels), published, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("backend", ["naive", "torch", "cpp"])
def test_graded_modules_take_the_step_parameters(cfg, backend):
    emb, labels = _batch(seed=3)
    s = _cos(emb)
    # binary relevance: H-AP is SupAP, so the published formula applies as it is
    binary = (labels[:, None] == labels[None, :]).double()
    torch.testing.assert_close(HAPLoss(backend=backend, **cfg)(emb, binary), 1 - published_sup_ap(s, binary, **cfg),
                               rtol=1e-10, atol=1e-12)
    hier = torch.stack([labels, labels // 2], 1)  # finest first
    rel = fastrank.relevance_from_hierarchy(hier, hier, order="finest_first", dtype=torch.float64)
    for module, fn in ((HAPLoss, fastrank.h_ap), (NDCGLoss, fastrank.ndcg)):
        expect = 1 - fn(s, rel, backend="naive", **cfg)
        _differs(expect, 1 - fn(s, rel, backend="naive"))
        torch.testing.assert_close(module(backend=backend, **cfg)(emb, rel), expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["naive", "torch", "cpp"])
def test_recall_modules_take_the_step_parameters(backend):
    pytest.importorskip("pytorch_metric_learning")
    from fastrank.integrations import pml as P

    emb, labels = _batch(seed=4)
    s = _cos(emb)
    for cfg in CONFIGS:
        expect = 1 - fastrank.recall_at_k(s, (labels, labels), backend="naive", ks=(1, 2, 4), **cfg)
        _differs(expect, 1 - fastrank.recall_at_k(s, (labels, labels), backend="naive", ks=(1, 2, 4)))
        torch.testing.assert_close(RecallAtKLoss(ks=(1, 2, 4), backend=backend, **cfg)(emb, labels), expect,
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(P.RecallAtKLoss(ks=(1, 2, 4), backend=backend, **cfg)(emb, labels), expect,
                                   rtol=1e-10, atol=1e-12)
    # the step can be chosen too (PML's drop-in took none)
    expect = 1 - fastrank.recall_at_k(s, (labels, labels), step="sigmoid", backend="naive")
    torch.testing.assert_close(P.RecallAtKLoss(step="sigmoid")(emb, labels), expect, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- Patel et al.: query not a positive


@pytest.mark.parametrize("backend", ["naive", "torch", "cpp"])
def test_patel_recall_leaves_the_query_out_of_its_positives(backend):
    pytest.importorskip("pytorch_metric_learning")
    from fastrank.integrations import pml as P

    emb, labels = _batch(n=18, seed=5, classes=5)
    labels[0] = 99  # a query whose only "positive" would be itself: dropped, as in Patel's code
    published = 1 - published_patel_recall(_cos(emb), labels)
    for loss in (RecallAtKLoss(variant="patel", backend=backend), P.RecallAtKLoss(variant="patel", backend=backend)):
        assert loss.include_self == "competitor"
        torch.testing.assert_close(loss(emb, labels), published, rtol=1e-10, atol=1e-12)
    # counting the query as its own positive is a different loss
    _differs(P.RecallAtKLoss(variant="patel", include_self=True, backend=backend)(emb, labels), published)
    # and left out entirely, it is neither a positive nor a competitor
    out = P.RecallAtKLoss(variant="patel", include_self=False, backend=backend)(emb, labels)
    expect = 1 - fastrank.recall_at_k(_cos(emb), (labels, labels), variant="patel", ignore=torch.arange(18),
                                      backend="naive")
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-12)


def test_pml_recall_include_self_is_checked():
    pytest.importorskip("pytorch_metric_learning")
    from fastrank.integrations import pml as P

    assert P.RecallAtKLoss().include_self is True
    with pytest.raises(ValueError, match="RecallAtKLoss: `include_self` must be True, False or 'competitor'"):
        P.RecallAtKLoss(include_self="query")
    with pytest.raises(TypeError, match="RecallAtKLoss: `include_self`"):
        P.RecallAtKLoss(include_self=1)
    with pytest.raises(ValueError, match="RecallAtKLoss: `variant`"):
        P.RecallAtKLoss(variant="patel2022")


# --------------------------------------------------------------------------- PML drop-in dtypes


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pml_drop_ins_return_pmls_dtype(dtype):
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as L

    from fastrank.integrations import pml as P

    emb, labels = _batch(n=16, seed=6)
    labels = torch.arange(4).repeat_interleave(4)  # 4 x 4: PML's SmoothAP grouping is right here
    x = emb.to(dtype)
    # FastAP: PML returns the embeddings' dtype; so do ours, and the losses PML lacks (PML's
    # LpDistance, FastAP's, has no bfloat16 cdist on the CPU)
    fastap = dtype != torch.bfloat16
    if fastap:
        assert L.FastAPLoss()(x, labels).dtype == dtype
    for cls in (P.FastAPLoss,) * fastap + (P.SupAPLoss, P.RecallAtKLoss, P.SoftBinAPLoss):
        e = x.clone().requires_grad_()
        loss = cls()(e, labels)
        assert loss.dtype == dtype, cls.__name__
        loss.backward()
        assert e.grad.dtype == dtype and torch.isfinite(e.grad).all()
    # SmoothAP: PML accumulates in a default-dtype buffer (float32); float64 keeps its precision here
    expect = torch.float64 if dtype == torch.float64 else torch.float32
    assert P.SmoothAPLoss()(x, labels).dtype == expect
    if dtype != torch.float64:
        assert L.SmoothAPLoss()(x, labels).dtype == expect


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_pml_parity_in_half_precision_as_pmls_own_tests_compare(dtype):
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as L

    from fastrank.integrations import pml as P

    g = torch.Generator().manual_seed(7)
    emb = torch.randn(24, 16, generator=g).to(dtype)
    labels = torch.arange(4).repeat_interleave(6)
    rtol = 1e-2 if dtype == torch.float16 else 1e-5  # PML's FastAP test tolerances
    # SmoothAP on 4 classes x 4: where PML's grouping computes the published loss
    for theirs, ours, n in ((L.FastAPLoss(5), P.FastAPLoss(5), 24), (L.SmoothAPLoss(), P.SmoothAPLoss(), 16)):
        lab = labels if n == 24 else torch.arange(4).repeat_interleave(4)
        a, b = theirs(emb[:n], lab), ours(emb[:n], lab)
        # torch.isclose needs equal dtypes: PML's tests compare exactly this way
        assert torch.isclose(a, b, rtol=rtol), (type(ours).__name__, a, b)
    # SmoothAP: the published formula on the same (half-precision) similarities, in float64
    s = F.normalize(emb, dim=1)
    ref = 1 - published_smooth_ap(s.double(), 4)
    labels4 = torch.arange(4).repeat_interleave(6)
    rel = 5e-3 if dtype == torch.float16 else 1e-5
    assert P.SmoothAPLoss()(emb, labels4).item() == pytest.approx(ref.item(), rel=rel)


def test_half_precision_is_ranked_in_float32():
    pytest.importorskip("pytorch_metric_learning")
    from fastrank.integrations import pml as P

    emb, labels = _batch(n=20, seed=8)
    half = emb.half()
    loss = P.SupAPLoss()(half, labels)
    # the per-query losses computed in float32 from the float16 similarities, then stored in float16
    s = P.SupAPLoss().distance(half, half)
    per = 1 - fastrank.sup_ap(s, (labels, labels), reduction="none")
    assert per.dtype == torch.float32
    torch.testing.assert_close(loss, per.half().mean(), rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- CrossBatchMemory.supported_losses


def test_supported_losses_is_pmls_list_then_ours():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as L

    from fastrank.integrations import pml as P

    theirs = L.CrossBatchMemory.supported_losses()
    ours = P.CrossBatchMemory.supported_losses()
    assert isinstance(ours, list) and all(isinstance(n, str) for n in ours)
    assert ours[:len(theirs)] == theirs  # PML's list unchanged and in its order
    assert len(set(ours)) == len(ours)  # no duplicates
    assert set(ours) - set(theirs) == {"SmoothAPLoss", "FastAPLoss", "SupAPLoss", "RecallAtKLoss", "SoftBinAPLoss"}
    assert L.CrossBatchMemory.supported_losses() == theirs  # PML's class is not modified


def test_every_supported_name_builds_and_runs_under_patch():
    pml = pytest.importorskip("pytorch_metric_learning")
    from fastrank.integrations import pml as P

    emb, labels = _batch(n=12, seed=9, classes=3)
    P.patch()
    try:
        losses = pml.losses
        fused = {"SmoothAPLoss", "FastAPLoss", "SupAPLoss", "RecallAtKLoss", "SoftBinAPLoss"}
        for name in losses.CrossBatchMemory.supported_losses():
            cls = getattr(losses, name)  # every listed name is a class of pml.losses
            xbm = losses.CrossBatchMemory(cls(), embedding_size=6, memory_size=24)
            for dtype in (torch.float16, torch.float32, torch.float64):
                out = xbm(emb.to(dtype), labels)
                # PML's own losses only have to run (TupletMarginLoss overflows in float16); ours are finite
                assert isinstance(out, torch.Tensor) and (name not in fused or torch.isfinite(out)), (name, dtype)
    finally:
        P.unpatch()


def test_pmls_own_classes_with_our_names_are_refused():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as L

    from fastrank.integrations import pml as P

    for cls in (L.SmoothAPLoss, L.FastAPLoss):  # refuse a separate gallery: would fail on the first batch
        with pytest.raises(Exception, match=f"CrossBatchMemory not supported for .*{cls.__name__}; use "
                                            f"fastrank.integrations.pml.{cls.__name__}"):
            P.CrossBatchMemory(cls(), embedding_size=8)
    P.CrossBatchMemory(L.ContrastiveLoss(), embedding_size=8)  # PML's supported losses still are
    with pytest.raises(Exception, match="not supported"):
        P.CrossBatchMemory(L.ArcFaceLoss(num_classes=3, embedding_size=8), embedding_size=8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_pml_sanity_check_pattern(dtype):
    # PML's own CrossBatchMemory test: with memory_size == batch size the wrapper equals the inner
    # loss (the memory holds exact copies of the batch); for the losses that count the query in
    # its own gallery that holds for ours too, compared with torch.isclose as PML does
    pytest.importorskip("pytorch_metric_learning")
    from fastrank.integrations import pml as P

    for cls in (P.SmoothAPLoss, P.SupAPLoss, P.RecallAtKLoss):
        for size in (12, 17):
            inner = cls()
            xbm = P.CrossBatchMemory(inner, embedding_size=6, memory_size=size)
            for step in range(3):
                emb, labels = _batch(n=size, seed=10 + step, classes=4)
                emb = emb.to(dtype)
                assert torch.isclose(inner(emb, labels), xbm(emb, labels), rtol=1e-3 if dtype == torch.float16
                                     else 1e-5), (cls.__name__, size, step)


# --------------------------------------------------------------------------- the README's table


def _readme_config_cells():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- configs:.*?-->(.*?)<!-- /configs -->", text, re.S)
    assert block, "README.md: the configuration table markers are missing"
    rows = [r for r in block.group(1).strip().splitlines()[2:] if r.startswith("|")]
    cells = []
    for row in rows:
        for col in row.strip("|").split("|")[1:]:
            cells += re.findall(r"`([^`]+)`", col)
    return cells


def test_readme_configuration_table_constructs():
    pytest.importorskip("pytorch_metric_learning")
    from fastrank import losses
    from fastrank.integrations import pml as fr_pml

    cells = _readme_config_cells()
    assert len(cells) >= 12
    text = " ".join(cells)
    for value in ("offset=1.44", "offset=1.0, start=0.0", 'variant="patel"', 'order="finest_first"', "alpha=10.0"):
        assert value in text
    emb, labels = _batch(n=8, seed=11)
    g = torch.Generator().manual_seed(0)
    slate_labels = torch.randint(-1, 3, (3, 5), generator=g).float()
    ns = dict(vars(losses), fr_pml=fr_pml, ltr=ltr, relevance_from_hierarchy=fastrank.relevance_from_hierarchy,
              hier=torch.stack([labels, labels // 2], 1), y_pred=torch.randn(3, 5, generator=g), y_true=slate_labels,
              scores=torch.randn(3, 5, generator=g), labels=slate_labels, emb=emb)
    # a row may name its inputs (`levels = ...`) and call the module it builds as `loss(...)`
    assignments = [c for c in cells if re.match(r"^[A-Za-z_]\w* = ", c)]
    for cell in assignments:
        exec(cell, ns)  # noqa: S102  (the README's own table)
    called = 0
    for cell in cells:
        if cell in assignments:
            continue
        obj = eval(cell, ns)  # noqa: S307  (the README's own table)
        if isinstance(obj, torch.nn.Module):
            ns["loss"] = obj
        if isinstance(obj, torch.nn.Module) and "HAPLoss" not in cell and "NDCGLoss" not in cell:
            assert torch.isfinite(obj(emb, labels)), cell
        elif isinstance(obj, torch.Tensor):
            called += cell.startswith("loss(")
            assert torch.isfinite(obj).all(), cell
    assert assignments and called, "the HAPPIER row's `levels = ...` and `loss(...)` cells were not run"
    # the offsets the table names are the ones the modules hold
    assert eval("ROADMAPLoss(offset=1.44)", ns).sup_ap.offset == 1.44
    m = eval("ROADMAPLoss(offset=1.0, start=0.0)", ns).sup_ap
    assert (m.offset, m.start) == (1.0, 0.0)
    assert eval("HAPLoss(offset=1.44)", ns).kw["offset"] == 1.44
