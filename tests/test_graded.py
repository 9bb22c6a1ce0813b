"""The graded family (issue 9: graded_rank_sums, h_ap, ndcg): every backend vs the fp64 naive cube,
binary reduction, H-AP / NDCG, validation. Triton runs in the interpreter on CPU tensors without a GPU
(tests/conftest.py); its kernel API (blocks, strides, dtypes, argument checks): tests/test_triton_graded.py."""
import math

import pytest
import torch

import fastrank
from fastrank.graded import graded_rank_sums, h_ap, ndcg, relevance_from_hierarchy

from .cases import (
    assert_all_close,
    backend_device,
    backend_params,
    graded_ignore,
    outputs_and_grad,
    over_backends,
    spread_scores,
    tied_relevance_problem,
)
from .conftest import AVAILABLE
from .nan_rows import NAN_BACKENDS, check_nan_rows, nan_relevance

#: every fused backend, each on its device (the family tests against the naive cube)
BACKENDS = backend_params()
#: the fused backends that run on CPU tensors here (Triton: in the interpreter)
FUSED = [b for b in NAN_BACKENDS if b != "naive"]

STEPS = ["sigmoid", "suprank"]
IGNORE_KINDS = ["none", "index", "mask"]


def _on(device, *tensors):
    return tuple(None if t is None else t.to(device) for t in tensors)


# --------------------------------------------------------------------------- every backend vs naive


def _rank_sums_and_grad(backend, scores, rel, step, ignore, tau=0.05, seed=1):
    """(rank_all, rank_pos, d/dscores of a random weighting of both), dense (Q, N)."""
    return outputs_and_grad(lambda s: graded_rank_sums(s, rel, step=step, tau=tau, ignore=ignore, backend=backend),
                            scores, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("ignore_kind", IGNORE_KINDS)
def test_fused_matches_naive(backend, step, ignore_kind):
    scores, rel = tied_relevance_problem()
    scores, rel, ignore = _on(backend_device(backend), scores, rel, graded_ignore(ignore_kind, *scores.shape))
    ref = _rank_sums_and_grad("naive", scores, rel, step, ignore)
    assert_all_close(_rank_sums_and_grad(backend, scores, rel, step, ignore), ref, rtol=1e-12, atol=1e-12)


_SIZES = [(1, 1), (3, 1), (2, 2), (4, 37), (3, 100)]


@pytest.mark.parametrize("step", STEPS)
# interpreter: the small sizes cover the Triton tails
@pytest.mark.parametrize("backend,q,n", over_backends(_SIZES, interpreted=_SIZES[:4]))
def test_fused_odd_sizes_and_real_valued_relevance(backend, step, q, n):
    """N = 1 (no competitor), N not a multiple of any vector width or block, relevance with
    non-integer values, ties in relevance and in scores, zeros, and a query without relevant items."""
    g = torch.Generator().manual_seed(q * 1000 + n)
    scores = torch.randn(q, n, generator=g, dtype=torch.float64) * 0.1
    scores[:, n // 2:] = scores[:, : n - n // 2].flip(1)  # score ties
    rel = (torch.rand(q, n, generator=g, dtype=torch.float64) * 3).round(decimals=1)
    rel[rel < 0.8] = 0
    if q > 1:
        rel[-1] = 0
    scores, rel = _on(backend_device(backend), scores, rel)
    ref = _rank_sums_and_grad("naive", scores, rel, step, None)
    assert_all_close(_rank_sums_and_grad(backend, scores, rel, step, None), ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("backend", backend_params(("cpp", "triton", "cuda")))
@pytest.mark.parametrize("step", STEPS)
def test_fused_float32_within_float32_error_of_torch(backend, step):
    """float32 kernels: error vs the fp64 naive no larger than a few times the error of the torch
    backend computing the same thing in float32 (the FlashAttention rule), plus an absolute floor."""
    g = torch.Generator().manual_seed(21)
    q, n = 6, 67
    scores = torch.randn(q, n, generator=g, dtype=torch.float64) * 0.2
    rel = torch.randint(0, 4, (q, n), generator=g).to(torch.float64)
    ref = _rank_sums_and_grad("naive", scores, rel, step, None)
    tor = _rank_sums_and_grad("torch", scores.float(), rel.float(), step, None)
    s32, r32 = _on(backend_device(backend), scores.float(), rel.float())
    out = tuple(t.cpu() for t in _rank_sums_and_grad(backend, s32, r32, step, None))
    for r, t, o in zip(ref, tor, out):
        assert o.dtype == torch.float32
        err_t = (t.double() - r).abs().max().item()
        err_o = (o.double() - r).abs().max().item()
        scale = r.abs().max().item()
        assert err_o <= 4 * err_t + 1e-6 * scale, (err_o, err_t, scale)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("chunk", ["7", "40"])
def test_torch_column_blocks_match_naive(step, chunk, monkeypatch):
    # chunks smaller than one row of pairs exercise the torch backend's column blocks
    monkeypatch.setenv("FASTRANK_TORCH_CHUNK", chunk)
    scores, rel = tied_relevance_problem()
    q, n = scores.shape
    ignore = graded_ignore("index", q, n)
    out = {backend: _rank_sums_and_grad(backend, scores, rel, step, ignore) for backend in ("naive", "torch")}
    assert_all_close(out["torch"], out["naive"], rtol=1e-12, atol=1e-12)
    ranked = rel > 0
    if ignore is not None:
        ranked &= fastrank.core.problem.dense_valid_mask(q, n, ignore if ignore.dtype != torch.bool else None,
                                                     ignore if ignore.dtype == torch.bool else None, "cpu")
    assert torch.equal(out["naive"][0] > 0, ranked)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", [h_ap, ndcg])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("ignore_kind", IGNORE_KINDS)
def test_losses_fused_match_naive(backend, fn, step, ignore_kind):
    scores, rel = tied_relevance_problem(seed=3)
    rel[1] = 0  # a query without relevant items
    scores, rel, ignore = _on(backend_device(backend), scores, rel, graded_ignore(ignore_kind, *scores.shape))
    res = {}
    for b in ("naive", backend):
        res[b] = outputs_and_grad(
            lambda s: fn(s, rel, step=step, tau=0.05, ignore=ignore, reduction="none", backend=b), scores, seed=None)
        assert torch.isfinite(res[b][1]).all()
        assert res[b][0][1] == 0
    assert_all_close(res[backend], res["naive"], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- binary reduction


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("ignore_kind", IGNORE_KINDS)
def test_binary_reduces_to_rank_sums(step, ignore_kind):
    scores, rel = tied_relevance_problem(seed=7)
    binary = (rel > 1).to(torch.float64)
    ignore = graded_ignore(ignore_kind, *scores.shape)
    ra, rp = graded_rank_sums(scores, binary, step=step, ignore=ignore, backend="naive")
    ref = fastrank.rank_sums(scores, binary, step=step, ignore=ignore, backend="naive")
    assert torch.equal(ra, ref.rank_all)
    assert torch.equal(rp, ref.rank_pos)
    # each graded fused backend agrees with its binary twin
    for backend in FUSED:
        ra_t, rp_t = graded_rank_sums(scores, binary, step=step, ignore=ignore, backend=backend)
        ref_t = fastrank.rank_sums(scores, binary, step=step, ignore=ignore, backend=backend)
        torch.testing.assert_close(ra_t, ref_t.rank_all, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(rp_t, ref_t.rank_pos, rtol=1e-13, atol=1e-13)


@pytest.mark.skipif("cpp" not in AVAILABLE, reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("step", STEPS)
def test_cpp_binary_is_bit_identical_to_binary_kernel(step, dtype):
    """The graded CPU kernel's runs are the binary kernel's runs in the same order (see
    csrc/cpu/graded_rank_sums.cpp), so values and gradients are bit-identical."""
    g = torch.Generator().manual_seed(13)
    scores = torch.randn(7, 53, generator=g, dtype=torch.float64).to(dtype)
    binary = (torch.rand(7, 53, generator=g) < 0.3).to(dtype)
    ga = torch.randn(7, 53, generator=g, dtype=torch.float64).to(dtype)
    gp = torch.randn(7, 53, generator=g, dtype=torch.float64).to(dtype)
    outs = []
    for graded in (True, False):
        s = scores.clone().requires_grad_()
        if graded:
            ra, rp = graded_rank_sums(s, binary, step=step, backend="cpp")
        else:
            ra, rp, _ = fastrank.rank_sums(s, binary, step=step, backend="cpp")
        ((ra * ga).sum() + (rp * gp).sum()).backward()
        outs.append((ra.detach(), rp.detach(), s.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_binary_rank_pos_counts_positives():
    scores, rel = tied_relevance_problem(seed=8)
    binary = (rel > 0).to(torch.float64)
    _, rp = graded_rank_sums(scores, binary, step="suprank", backend="torch")
    d = scores.unsqueeze(1) - scores.unsqueeze(2)  # [i, j, k] = s_ik - s_ij
    n = scores.shape[1]
    others = (binary.unsqueeze(1) > 0) & ~torch.eye(n, dtype=torch.bool)
    expect = torch.where(binary > 0, 1 + ((d >= 0) & others).sum(-1).to(torch.float64), 0)
    assert torch.equal(rp, expect)


@pytest.mark.parametrize("ignore_kind", IGNORE_KINDS)
@pytest.mark.parametrize("step,ref_fn", [("suprank", fastrank.sup_ap), ("sigmoid", fastrank.smooth_ap)])
def test_binary_h_ap_equals_ap(step, ref_fn, ignore_kind):
    scores, rel = tied_relevance_problem(seed=9)
    binary = (rel >= 2).to(torch.float64)
    binary[2] = 0
    ignore = graded_ignore(ignore_kind, *scores.shape)
    kw = dict(tau=0.05, ignore=ignore, backend="naive")
    for reduction in ("none", "mean", "sum"):
        s1 = scores.clone().requires_grad_()
        s2 = scores.clone().requires_grad_()
        a = h_ap(s1, binary, step=step, reduction=reduction, **kw)
        b = ref_fn(s2, binary, reduction=reduction, **kw)
        assert torch.equal(a, b)
        a.sum().backward()
        b.sum().backward()
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-12, atol=1e-12)
    # integer and bool relevance give the same
    assert torch.equal(h_ap(scores, binary.long(), step=step, **kw), h_ap(scores, binary.bool(), step=step, **kw))


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("ignore_kind", IGNORE_KINDS)
def test_gradcheck_fused_rank_sums(backend, step, ignore_kind):
    q, n = 4, 7
    scores = spread_scores(q, n, seed=1)
    rel = torch.tensor(
        [[2.0, 0, 1, 3, 1, 0, 2], [0, 1, 1, 1, 0, 2, 0], [3, 3, 0, 2, 1, 0, 0], [0.5, 0, 2.5, 0, 1, 1, 0]]
    )
    ignore = graded_ignore(ignore_kind, q, n)

    def f(s):
        return graded_rank_sums(s, rel, step=step, tau=0.05, ignore=ignore, backend=backend)

    assert torch.autograd.gradcheck(f, (scores.requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("fn", [h_ap, ndcg])
@pytest.mark.parametrize("step", STEPS)
def test_gradcheck_fused_losses(backend, fn, step):
    scores = spread_scores(5, 9, seed=2)
    rel = torch.randint(0, 4, (5, 9), generator=torch.Generator().manual_seed(4)).to(torch.float64)
    rel[3] = 0

    def f(s):
        return fn(s, rel, step=step, tau=0.05, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(f, (scores.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- hand examples


def test_relevance_from_hierarchy_hand_example():
    # levels: family, genus, species
    q = torch.tensor([[0, 0, 0], [1, 5, 7]])
    g = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [1, 5, 7], [2, 5, 7]])
    prefix = relevance_from_hierarchy(q, g, order="coarsest_first")
    levels = relevance_from_hierarchy(q, g, mode="shared_levels")
    assert prefix.dtype == torch.float32 and prefix.shape == (2, 6)
    assert prefix.tolist() == [[3, 2, 1, 0, 0, 0], [0, 0, 0, 1, 3, 0]]
    assert levels.tolist() == [[3, 2, 2, 2, 0, 0], [0, 0, 0, 1, 3, 2]]
    assert relevance_from_hierarchy(q.int(), g.int(), order="coarsest_first", dtype=torch.float64).dtype == torch.float64


def test_perfect_ordering_gives_one():
    scores = torch.tensor([[0.9, 0.6, 0.3, 0.0, -0.3], [0.0, 0.3, 0.6, 0.9, -0.5]], dtype=torch.float64)
    rel = torch.tensor([[3.0, 2, 1, 1, 0], [0, 1, 2, 3, 0]], dtype=torch.float64)
    for fn in (h_ap, ndcg):
        for backend in ["naive"] + FUSED:
            v = fn(scores, rel, step="suprank", tau=0.001, reduction="none", backend=backend)
            torch.testing.assert_close(v, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_h_ap_hand_computed():
    scores = torch.tensor([[0.9, 0.6, 0.3]], dtype=torch.float64)
    rel = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    # suprank: item 1 (rel 2) sees item 0 (rel 1 < 2) at d = 0.3 > delta on H^-'s linear branch:
    # rank_all = 1 + 100 * (0.3 - 0.05) + (sigma(0.05 / 0.001) + 0.5) = 27.5, rank_pos = 2 + min(2, 1) = 3
    ra, rp = graded_rank_sums(scores, rel, tau=0.001, backend="torch")
    torch.testing.assert_close(ra, torch.tensor([[1.0, 27.5, 0.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(rp, torch.tensor([[1.0, 3.0, 0.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    v = h_ap(scores, rel, tau=0.001, backend="torch")
    assert abs(float(v) - (1 + 3 / 27.5) / 3) < 1e-12
    # sigmoid: rank_all = 2, rank_pos = 3 for item 1
    v = h_ap(scores, rel, step="sigmoid", tau=0.001, backend="naive")
    assert abs(float(v) - (1 + 3 / 2) / 3) < 1e-12


def test_ndcg_hand_computed():
    scores = torch.tensor([[0.9, 0.6, 0.3]], dtype=torch.float64)
    rel = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    dcg = 1 / math.log2(2) + 3 / math.log2(3)  # ranks 1, 2 (sigmoid with a tiny tau is the exact rank)
    idcg = 3 / math.log2(2) + 1 / math.log2(3)
    v = ndcg(scores, rel, step="sigmoid", tau=0.001, backend="torch")
    assert abs(float(v) - dcg / idcg) < 1e-12
    # ignoring the rel-2 item leaves a perfect ordering
    v = ndcg(scores, rel, step="sigmoid", tau=0.001, ignore=torch.tensor([1]), backend="torch")
    assert abs(float(v) - 1.0) < 1e-12


def test_no_relevant_item_anywhere_is_zero_and_differentiable():
    scores = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    rel = torch.zeros(3, 5, dtype=torch.float64)
    for fn in (h_ap, ndcg):
        for backend in ["naive"] + FUSED:
            v = fn(scores, rel, backend=backend)
            assert float(v.detach()) == 0.0
            v.backward()
            assert torch.isfinite(scores.grad).all()
            scores.grad = None
            assert torch.equal(fn(scores, rel, reduction="none", backend=backend), torch.zeros(3, dtype=torch.float64))


def test_mean_leaves_out_queries_without_relevant_items():
    scores, rel = tied_relevance_problem(seed=11)
    rel[2] = 0
    for fn in (h_ap, ndcg):
        per = fn(scores, rel, reduction="none")
        assert per[2] == 0
        torch.testing.assert_close(fn(scores, rel), per.sum() / 4)
        torch.testing.assert_close(fn(scores, rel, reduction="sum"), per.sum())


def test_half_scores_computed_in_float32():
    scores, rel = tied_relevance_problem(seed=12)
    ra, _ = graded_rank_sums(scores.half(), rel, backend="torch")
    assert ra.dtype == torch.float32


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("fn", [graded_rank_sums, h_ap, ndcg])
def test_relevance_validation(fn):
    scores = torch.randn(2, 3)
    ok = torch.ones(2, 3)
    with pytest.raises(ValueError, match="relevance.*>= 0"):
        fn(scores, torch.tensor([[1.0, -1.0, 0.0], [0, 0, 1]]))
    with pytest.raises(ValueError, match="relevance.*finite"):
        fn(scores, torch.tensor([[1.0, float("nan"), 0.0], [0, 0, 1]]))
    with pytest.raises(ValueError, match="relevance.*finite"):
        fn(scores, torch.tensor([[1.0, float("inf"), 0.0], [0, 0, 1]]))
    with pytest.raises(ValueError, match="relevance.*-2"):
        fn(scores, torch.tensor([[1, -2, 0], [0, 0, 1]]))
    with pytest.raises(ValueError, match="relevance.*shape"):
        fn(scores, torch.ones(3, 2))
    with pytest.raises(TypeError, match="relevance"):
        fn(scores, [[1, 0, 0], [0, 1, 0]])
    with pytest.raises(TypeError, match="relevance"):
        fn(scores, torch.ones(2, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="scores"):
        fn(scores.long(), ok)
    with pytest.raises(ValueError, match="step"):
        fn(scores, ok, step="relu")
    with pytest.raises(ValueError, match="tau"):
        fn(scores, ok, tau=0.0)
    with pytest.raises(ValueError, match="ignore"):
        fn(scores, ok, ignore=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="backend"):
        fn(scores, ok, backend="fast")
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        fn(scores, ok, backend="cuda")  # CPU tensors (or no CUDA build): a clear refusal


@pytest.mark.skipif("cpp" not in AVAILABLE, reason="needs the C++ extension")
def test_cpp_op_checks_relevance():
    """A direct torch.ops call, bypassing the Python validation, still refuses bad relevance."""
    from fastrank.core.registry import register_cpp_ops

    register_cpp_ops()
    scores = torch.randn(2, 4, dtype=torch.float64)
    pos_idx = torch.tensor([[0, 1], [2, -1]])
    args = (None, None, 1, 0.05, 100.0, 0.05, 0.5, 0.6, False, 0.0, 0.0, 0.0)
    op = torch.ops.fastrank.graded_rank_sums_fwd
    with pytest.raises(ValueError, match="relevance must be >= 0"):
        op(scores, -torch.ones(2, 4, dtype=torch.float64), None, pos_idx, *args)
    with pytest.raises(ValueError, match="relevance must be finite"):
        op(scores, torch.full((2, 4), float("nan"), dtype=torch.float64), None, pos_idx, *args)
    with pytest.raises(TypeError, match="relevance must have the dtype of scores"):
        op(scores, torch.ones(2, 4), None, pos_idx, *args)
    with pytest.raises(ValueError, match="relevance must have the shape of scores"):
        op(scores, torch.ones(2, 3, dtype=torch.float64), None, pos_idx, *args)
    # the ordering key: shape, dtype, finite; the H-rank only with the suprank step
    rel = torch.ones(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="key must have the shape of scores"):
        op(scores, rel, torch.ones(2, 3, dtype=torch.float64), pos_idx, *args)
    with pytest.raises(TypeError, match="key must have the dtype of scores"):
        op(scores, rel, torch.ones(2, 4), pos_idx, *args)
    with pytest.raises(ValueError, match="`key` must be finite"):
        op(scores, rel, torch.full((2, 4), float("inf"), dtype=torch.float64), pos_idx, *args)
    hr = (None, None, 0, 0.05, 100.0, 0.05, 0.5, 0.6, True, 1.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="needs step 1"):
        op(scores, rel, None, pos_idx, *hr)
    with pytest.raises(ValueError, match="leak must be finite and >= 0"):
        op(scores, rel, None, pos_idx, *args[:8], True, 1.0, 0.5, -1.0)


def test_reduction_validation():
    with pytest.raises(ValueError, match="reduction"):
        h_ap(torch.randn(2, 3), torch.ones(2, 3), reduction="max")
    with pytest.raises(ValueError, match="reduction"):
        ndcg(torch.randn(2, 3), torch.ones(2, 3), reduction=None)


def test_hierarchy_validation():
    q = torch.zeros(2, 3, dtype=torch.long)
    g = torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="mode"):
        relevance_from_hierarchy(q, g, mode="prefix")
    with pytest.raises(ValueError, match="levels"):
        relevance_from_hierarchy(q, g[:, :2])
    with pytest.raises(ValueError, match="2-D"):
        relevance_from_hierarchy(q[:, 0], g)
    with pytest.raises(TypeError, match="integer"):
        relevance_from_hierarchy(q.float(), g)
    with pytest.raises(TypeError, match="gallery_labels"):
        relevance_from_hierarchy(q, [[0, 0, 0]])
    with pytest.raises(TypeError, match="dtype"):
        relevance_from_hierarchy(q, g, dtype=torch.int64)


def test_graded_loss_modules_equal_functions():
    import torch.nn.functional as F

    from fastrank.losses import HAPLoss, NDCGLoss

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(10, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (10, 3), generator=g)
    rel = fastrank.relevance_from_hierarchy(labels, labels, order="coarsest_first", dtype=torch.float64)
    e = F.normalize(emb, dim=1)
    torch.testing.assert_close(HAPLoss()(emb, rel), 1 - fastrank.h_ap(e @ e.T, rel))
    torch.testing.assert_close(NDCGLoss(step="sigmoid")(emb, rel), 1 - fastrank.ndcg(e @ e.T, rel, step="sigmoid"))
    torch.testing.assert_close(HAPLoss(include_self=False)(emb, rel),
                               1 - fastrank.h_ap(e @ e.T, rel, ignore=torch.arange(10)))
    x = emb.clone().requires_grad_()
    HAPLoss()(x, rel).backward()
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- NaN, determinism


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("step", STEPS)
def test_nan_score_gives_nan_for_its_query_only(backend, step):
    """A NaN score among a query's valid items makes its rank_all NaN at every ranked item, and
    its H-AP / NDCG and their gradient NaN; the other queries are untouched. (rank_pos may stay
    finite on the reference backends: an irrelevant NaN competitor enters it with weight 0.)"""
    scores, rel = tied_relevance_problem(seed=14)
    rel[0, :3] = torch.tensor([2.0, 1.0, 0.0])
    scores[0, 2] = float("nan")  # an irrelevant but valid competitor
    ra, _ = graded_rank_sums(scores, rel, step=step, backend=backend)
    ranked = rel > 0
    assert torch.isnan(ra[0][ranked[0]]).all()
    ref = graded_rank_sums(scores[1:], rel[1:], step=step, backend="naive")
    torch.testing.assert_close(ra[1:], ref[0], rtol=1e-12, atol=1e-12)
    for fn in (h_ap, ndcg):
        s = scores.clone().requires_grad_()
        v = fn(s, rel, step=step, reduction="none", backend=backend)
        assert torch.isnan(v[0]) and torch.isfinite(v[1:]).all()
        v.sum().backward()
        assert torch.isnan(s.grad[0]).any()
        torch.testing.assert_close(v[1:], fn(scores[1:], rel[1:], step=step, reduction="none", backend="naive"))


@pytest.mark.parametrize("backend", NAN_BACKENDS)
@pytest.mark.parametrize("fn", [h_ap, ndcg], ids=["h_ap", "ndcg"])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("ignore_kind", IGNORE_KINDS)
def test_nan_poisons_its_query_with_or_without_relevant_items(backend, fn, step, ignore_kind):
    def f(s, rel, **kw):
        return fn(s, rel, step=step, **kw)

    check_nan_rows(f, backend, ignore_kind, target=nan_relevance())


@pytest.mark.skipif("cpp" not in AVAILABLE, reason="needs the C++ extension")
@pytest.mark.parametrize("step", STEPS)
def test_cpp_deterministic_across_runs_and_thread_counts(step):
    g = torch.Generator().manual_seed(15)
    scores = torch.randn(33, 129, generator=g)
    rel = torch.randint(0, 5, (33, 129), generator=g).float()
    threads = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 2):
            torch.set_num_threads(nt)
            outs.append(_rank_sums_and_grad("cpp", scores, rel, step, None))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_ndcg_rejects_relevance_whose_gain_overflows():
    scores = torch.randn(2, 4)
    rel = torch.tensor([[1.0, 200.0, 0.0, 2.0], [0.0, 1.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="relevance.*overflows"):
        ndcg(scores, rel)
    # float64 has the range: finite value
    v = ndcg(scores.double(), rel.double())
    assert torch.isfinite(v)
    # h_ap has no exponential gain: fine in float32
    assert torch.isfinite(h_ap(scores, rel))


# --------------------------------------------------------------------------- extreme but accepted relevance


@pytest.mark.parametrize("fn", [graded_rank_sums, h_ap, ndcg])
@pytest.mark.parametrize("value,why", [(1e-50, "below"), (1e-40, "below"), (1e39, "beyond")])
def test_relevance_that_does_not_survive_the_cast_is_rejected(fn, value, why):
    # float64 relevance with float32 scores is computed in float32: 1e-50 became 0 (a ranked item
    # with relevance 0), 1e-40 a subnormal (flushed on GPUs), 1e39 inf; all were validated in float64
    scores = torch.randn(2, 4)
    rel = torch.tensor([[1.0, value, 0.0, 2.0], [0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"{fn.__name__}: `relevance`.*{why}.*float32"):
        fn(scores, rel)
    if fn is ndcg and why == "beyond":  # 2^1e39 overflows even float64: the gain check says so
        with pytest.raises(ValueError, match="relevance.*overflows the gain"):
            fn(scores.double(), rel)
        return
    out = fn(scores.double(), rel)  # float64 has the range
    assert all(torch.isfinite(t).all() for t in (out if isinstance(out, tuple) else (out,)))


@pytest.mark.parametrize("backend", ["naive", *FUSED])
def test_ndcg_tiny_relevance_keeps_its_gain(backend):
    # 2^rel - 1 rounds to 0 in float32 for rel < ~1e-7: every gain (and NDCG) was 0
    g = torch.Generator().manual_seed(30)
    s64 = torch.rand(3, 6, generator=g, dtype=torch.float64)
    rel = torch.randint(0, 3, (3, 6), generator=g).double() * 1e-10
    rel[:, 0] = 2e-10
    got = ndcg(s64.float(), rel.float(), step="sigmoid", tau=0.1, reduction="none", backend=backend)
    ref = ndcg(s64, rel, step="sigmoid", tau=0.1, reduction="none", backend="naive")
    assert (ref > 0.5).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ["naive", *FUSED])
def test_ndcg_gains_whose_sum_overflows_are_computed(backend):
    # each gain 2^127.5 - 1 fits float32, their sum in the DCG does not: NDCG is scale-free
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.3]], dtype=torch.float64)
    rel = torch.tensor([[127.5, 127.5, 0.0, 127.0]], dtype=torch.float64)
    got = ndcg(scores.float(), rel.float(), step="sigmoid", tau=0.1, backend=backend)
    ref = ndcg(scores, rel, step="sigmoid", tau=0.1, backend="naive")
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
