"""Bad input raises ValueError/TypeError naming the argument, on every backend it reaches."""
import pytest
import torch

import fastrank

from .conftest import CPU_BACKENDS

Q, N = 4, 6
S = torch.rand(Q, N)
LAB = (torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1, 2, 2]))

BAD = [
    # (kwargs overriding the good call, exception, text the message must contain)
    (dict(scores=[[0.1, 0.2]]), TypeError, "`scores` must be a torch.Tensor"),
    (dict(scores=torch.rand(N)), ValueError, "`scores` must be 2-D"),
    (dict(scores=torch.rand(2, 3, 4)), ValueError, "`scores` must be 2-D"),
    (dict(scores=torch.ones(Q, N, dtype=torch.int64)), TypeError, "`scores` must be a floating tensor"),
    (dict(scores=torch.rand(0, N), target=torch.zeros(0, N)), ValueError, "`scores` must be non-empty"),
    (dict(scores=torch.rand(Q, 0), target=torch.zeros(Q, 0)), ValueError, "`scores` must be non-empty"),
    (dict(target=torch.zeros(Q, N + 1)), ValueError, "`target` must have the shape of scores"),
    (dict(target="labels"), TypeError, "`target` must be a (Q, N) relevance tensor"),
    (dict(target=(LAB[0],)), ValueError, "pair (query_labels, gallery_labels)"),
    (dict(target=(LAB[0].float(), LAB[1])), TypeError, "query_labels must be an integer tensor"),
    (dict(target=(LAB[0], LAB[1][:5])), ValueError, "gallery_labels must have shape (6,)"),
    (dict(target=(LAB[0][:3], LAB[1])), ValueError, "query_labels must have shape (4,)"),
    (dict(target=(LAB[0], [0, 1, 0, 1, 2, 2])), TypeError, "gallery_labels must be a 1-D integer tensor"),
    (dict(target=torch.full((Q, N), float("nan"))), ValueError, "contains NaN"),
    (dict(target=torch.zeros(Q, N, dtype=torch.complex64)), TypeError, "`target` must be bool, integer or floating"),
    (dict(ignore=torch.tensor([0, 1, 2])), ValueError, "`ignore` as an index must have shape (4,)"),
    (dict(ignore=torch.tensor([0, 1, 2, 6])), ValueError, "`ignore` indices must lie in [-1, 5]"),
    (dict(ignore=torch.tensor([0, 1, 2, -2])), ValueError, "`ignore` indices must lie in [-1, 5]"),
    (dict(ignore=torch.zeros(Q, N + 1, dtype=torch.bool)), ValueError, "`ignore` as a bool mask must have shape"),
    (dict(ignore=torch.zeros(Q, dtype=torch.float32)), TypeError, "`ignore` must be an integer index"),
    (dict(ignore=[0, 1, 2, 3]), TypeError, "`ignore` must be None"),
    (dict(tau=0.0), ValueError, "`tau` must be a finite number > 0"),
    (dict(tau=-0.01), ValueError, "`tau` must be a finite number > 0"),
    (dict(tau=float("inf")), ValueError, "`tau` must be a finite number > 0"),
    (dict(tau=float("nan")), ValueError, "`tau` must be a finite number > 0"),
    (dict(tau="0.01"), TypeError, "`tau` must be a real number"),
    (dict(reduction="avg"), ValueError, "`reduction` must be one of"),
    (dict(backend="gpu"), ValueError, "`backend` must be None or one of"),
]

SUPAP_BAD = [
    (dict(rho=-1.0), ValueError, "`rho` must be a finite number >= 0"),
    (dict(delta=-0.1), ValueError, "`delta` must be a finite number >= 0"),
    (dict(start=float("nan")), ValueError, "`start` must be finite"),
    (dict(offset=float("inf")), ValueError, "`offset` must be finite"),
]


def _call(fn, default_backend, **over):
    kw = dict(scores=S, target=LAB)
    if fn is not fastrank.calibration_loss:
        kw["backend"] = default_backend
    kw.update(over)
    scores, target = kw.pop("scores"), kw.pop("target")
    return fn(scores, target, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("over,exc,text", BAD, ids=[b[2][:40] for b in BAD])
@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap])
def test_bad_arguments_ap(fn, backend, over, exc, text):
    with pytest.raises(exc) as info:
        _call(fn, backend, **over)
    assert text in str(info.value)
    assert fn.__name__ in str(info.value)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("over,exc,text", SUPAP_BAD, ids=[b[2][:40] for b in SUPAP_BAD])
def test_bad_suprank_parameters(backend, over, exc, text):
    with pytest.raises(exc) as info:
        _call(fastrank.sup_ap, backend, **over)
    assert text in str(info.value)
    with pytest.raises(exc) as info:
        _call(fastrank.rank_sums, backend, step="suprank", **over)
    assert text in str(info.value)


@pytest.mark.parametrize("over,exc,text", [b for b in BAD if "tau" not in b[2] and "reduction" not in b[2]
                                           and "backend" not in b[2]])
def test_bad_arguments_calibration(over, exc, text):
    with pytest.raises(exc) as info:
        _call(fastrank.calibration_loss, None, **over)
    assert text in str(info.value)


def test_bad_step_and_margins():
    with pytest.raises(ValueError, match="`step` must be one of 'sigmoid', 'suprank'"):
        fastrank.rank_sums(S, LAB, step="heaviside")
    with pytest.raises(ValueError, match="`pos_margin` must be finite"):
        fastrank.calibration_loss(S, LAB, pos_margin=float("nan"))
    with pytest.raises(TypeError, match="`neg_margin` must be a real number"):
        fastrank.calibration_loss(S, LAB, neg_margin=None)


def test_env_backend_is_validated(monkeypatch):
    monkeypatch.setenv("FASTRANK_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FASTRANK_BACKEND must be one of"):
        fastrank.sup_ap(S, LAB)


# --------------------------------------------------------------------------- hostile input: storage, ks, env, dtypes


def _layouts():
    out = [("sparse_coo", lambda t: t.to_sparse()), ("sparse_csr", lambda t: t.to_sparse_csr())]
    if torch.backends.mkldnn.is_available():
        out.append(("mkldnn", lambda t: t.to_mkldnn()))
    return out


STORAGE_FNS = [
    ("smooth_ap", lambda s, t, **kw: fastrank.smooth_ap(s, t, **kw)),
    ("sup_ap", lambda s, t, **kw: fastrank.sup_ap(s, t, **kw)),
    ("recall_at_k", lambda s, t, **kw: fastrank.recall_at_k(s, t, **kw)),
    ("histogram_ap", lambda s, t, **kw: fastrank.histogram_ap(s, t, **kw)),
    ("rank_sums", lambda s, t, **kw: fastrank.rank_sums(s, t, **kw)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout,convert", _layouts(), ids=[name for name, _ in _layouts()])
@pytest.mark.parametrize("name,fn", STORAGE_FNS, ids=[n for n, _ in STORAGE_FNS])
def test_non_strided_scores_are_rejected(name, fn, layout, convert, backend):
    with pytest.raises(TypeError, match=r"`scores` must be a dense \(strided\) tensor, got layout"):
        fn(convert(S), LAB, backend=backend)
    with pytest.raises(TypeError, match=r"`scores` must be a dense \(strided\) tensor"):
        fastrank.calibration_loss(convert(S), LAB)
    with pytest.raises(TypeError, match=r"`scores` must be a dense \(strided\) tensor"):
        fastrank.h_ap(convert(S), torch.ones(Q, N), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,fn", STORAGE_FNS, ids=[n for n, _ in STORAGE_FNS])
def test_meta_scores_are_rejected(name, fn, backend):
    meta = S.to("meta")
    for target in ((LAB[0].to("meta"), LAB[1].to("meta")), torch.ones(Q, N, device="meta")):
        with pytest.raises(ValueError, match=f"fastrank.{name}: `scores` is on the meta device"):
            fn(meta, target, backend=backend)
    with pytest.raises(ValueError, match="`scores` is on the meta device"):
        fastrank.calibration_loss(meta, (LAB[0].to("meta"), LAB[1].to("meta")))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_strided_target_and_ignore_are_rejected(backend):
    dense = (LAB[0][:, None] == LAB[1][None, :]).float()
    with pytest.raises(TypeError, match=r"`target` must be a dense \(strided\) tensor"):
        fastrank.smooth_ap(S, dense.to_sparse(), backend=backend)
    with pytest.raises(TypeError, match=r"`target` gallery_labels must be a dense \(strided\) tensor"):
        fastrank.smooth_ap(S, (LAB[0], LAB[1].to_sparse()), backend=backend)
    with pytest.raises(TypeError, match=r"`ignore` must be a dense \(strided\) tensor"):
        fastrank.smooth_ap(S, LAB, ignore=torch.zeros(Q, N, dtype=torch.bool).to_sparse(), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ks_beyond_int64_is_a_value_error(backend):
    for ks in ((1 << 63,), (1, 1 << 70)):
        with pytest.raises(ValueError, match=r"fastrank.recall_at_k: every k in `ks` must be <= 2\*\*63 - 1"):
            fastrank.recall_at_k(S, LAB, ks=ks, backend=backend)
    # the largest int64 k is valid: every positive is inside it, as for any k far beyond N
    torch.testing.assert_close(fastrank.recall_at_k(S.double(), LAB, ks=((1 << 63) - 1,), backend=backend),
                               fastrank.recall_at_k(S.double(), LAB, ks=(10**6,), backend="naive"))


@pytest.mark.parametrize("raw", ["abc", "", "0", "-4", "1.5", "1e6"])
def test_torch_chunk_environment_variable_is_validated(raw, monkeypatch):
    # only the torch backend reads FASTRANK_TORCH_CHUNK (rank sums and histograms)
    monkeypatch.setenv("FASTRANK_TORCH_CHUNK", raw)
    for fn in (fastrank.sup_ap, fastrank.histogram_ap):
        with pytest.raises(ValueError, match="environment variable FASTRANK_TORCH_CHUNK must be a positive integer"):
            fn(S, LAB, backend="torch")


def test_torch_chunk_environment_variable_accepts_padded_integers(monkeypatch):
    ref = fastrank.sup_ap(S.double(), LAB, backend="naive")
    monkeypatch.setenv("FASTRANK_TORCH_CHUNK", " 7 ")
    torch.testing.assert_close(fastrank.sup_ap(S.double(), LAB, backend="torch"), ref)


WIDE_UNSIGNED = [torch.uint16, torch.uint32, torch.uint64]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", WIDE_UNSIGNED, ids=str)
def test_wide_unsigned_labels_are_accepted(dtype, backend):
    s = S.double().requires_grad_()
    q_lab, g_lab = LAB
    for target in ((q_lab.to(dtype), g_lab.to(dtype)), (q_lab.to(dtype), g_lab)):
        for fn in (fastrank.smooth_ap, fastrank.sup_ap, fastrank.recall_at_k, fastrank.histogram_ap):
            got = fn(s, target, backend=backend)
            ref = fn(s, LAB, backend="naive")
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
            g1, = torch.autograd.grad(got, s)
            g2, = torch.autograd.grad(ref, s)
            torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fastrank.calibration_loss(s, target), fastrank.calibration_loss(s, LAB))


def test_wide_unsigned_labels_wrap_but_stay_distinct():
    # uint64 labels past int64 are compared as int64: the wrap is a bijection, so classes stay apart
    big = torch.tensor([(1 << 64) - 1, (1 << 63), 5, (1 << 64) - 1], dtype=torch.uint64)
    gal = torch.tensor([(1 << 63), 5, (1 << 64) - 1, 7, 5, (1 << 63)], dtype=torch.uint64)
    small = (torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 3, 2, 1]))
    torch.testing.assert_close(fastrank.sup_ap(S, (big, gal)), fastrank.sup_ap(S, small))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", WIDE_UNSIGNED, ids=str)
def test_wide_unsigned_relevance_and_ignore_say_what_is_supported(dtype, backend):
    dense = (LAB[0][:, None] == LAB[1][None, :]).to(dtype)
    with pytest.raises(TypeError, match=r"`target` must be bool, integer or floating "
                                        r"\(as relevance, integer means int8/.*uint8\)"):
        fastrank.smooth_ap(S, dense, backend=backend)
    with pytest.raises(TypeError, match=r"`ignore` must be an integer index \(Q,\) \(int8/.*uint8\)"):
        fastrank.smooth_ap(S, LAB, ignore=torch.zeros(Q, dtype=dtype), backend=backend)


# --------------------------------------------------------------------------- hostile input: flags


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_flag_is_a_bool(backend):
    import numpy as np

    for bad in (1, 0, 1.0, "yes", None):
        with pytest.raises(TypeError, match="fastrank.rank_sums: `packed` must be a bool"):
            fastrank.rank_sums(S, LAB, packed=bad, backend=backend)
    for flag, expect in ((np.bool_(True), True), (np.bool_(False), False)):
        got = fastrank.rank_sums(S, LAB, packed=flag, backend=backend)
        ref = fastrank.rank_sums(S, LAB, packed=expect, backend=backend)
        assert (got.index is None) == (ref.index is None)
        torch.testing.assert_close(got.rank_all, ref.rank_all)
