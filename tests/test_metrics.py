"""fastrank.metrics against a straightforward per-query loop and a hand-computed example.

The reference below does not sort: it counts, for each positive j of a query, how many
gallery items are ranked before it under the documented pessimistic tie rule
(strictly higher score, or an equal score and a negative; tied positives in index order).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from fastrank.metrics import (
    mean_average_precision,
    map_at_r,
    per_query_metrics,
    recall_at_k,
    retrieval_metrics,
)

KS = (1, 2, 4, 8)


def _reference(q, ql, g=None, gl=None, ks=KS, exclude_self=True, similarity="cosine"):
    """Per-query metrics with explicit loops, in float64 numpy. Returns (dict of per-query lists, used mask)."""
    q = np.asarray(q, dtype=np.float64)
    ql = np.asarray(ql)
    self_search = g is None
    if self_search:
        g, gl = q, ql
    g = np.asarray(g, dtype=np.float64)
    gl = np.asarray(gl)
    if similarity == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    out = {key: [] for key in [f"R@{k}" for k in ks] + ["mAP@R", "R-precision", "mAP"]}
    used = []
    for i in range(len(q)):
        items = [j for j in range(len(g)) if not (self_search and exclude_self and j == i)]
        if similarity == "euclidean":
            s = {j: -math.sqrt(sum((a - b) ** 2 for a, b in zip(q[i], g[j]))) for j in items}
        else:
            s = {j: float(np.dot(q[i], g[j])) for j in items}
        pos = [j for j in items if gl[j] == ql[i]]
        used.append(len(pos) > 0)
        if not pos:
            continue
        rank, hits = {}, {}
        for j in pos:
            before = [k for k in items if k != j and (s[k] > s[j] or (s[k] == s[j] and (gl[k] != ql[i] or k < j)))]
            rank[j] = 1 + len(before)
            hits[j] = 1 + sum(1 for k in before if gl[k] == ql[i])
        p = len(pos)
        out["mAP"].append(sum(hits[j] / rank[j] for j in pos) / p)
        out["mAP@R"].append(sum(hits[j] / rank[j] for j in pos if rank[j] <= p) / p)
        out["R-precision"].append(sum(1 for j in pos if rank[j] <= p) / p)
        for k in ks:
            out[f"R@{k}"].append(float(min(rank.values()) <= k))
    return out, np.array(used)


def _check_against_reference(got, ref):
    for key, values in ref.items():
        expected = float(np.mean(values)) if values else math.nan
        if math.isnan(expected):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(expected, abs=1e-12), key


def _tied_data(q=37, d=3, classes=9, seed=0, levels=3):
    """Small-integer embeddings (many exactly tied dot products) and labels with singleton classes
    (queries without positives)."""
    rng = np.random.default_rng(seed)
    emb = rng.integers(-levels, levels + 1, size=(q, d)).astype(np.float32)
    labels = rng.integers(0, classes, size=q)
    labels[:3] = [100, 101, 102]  # three queries whose class appears once: no positive once self is excluded
    return emb, labels


@pytest.mark.parametrize("chunk", [1, 5, 8, 36, 37, 1024])
def test_self_search_with_ties_matches_loop(chunk):
    emb, labels = _tied_data()
    ref, used = _reference(emb, labels, similarity="dot")
    got = retrieval_metrics(torch.from_numpy(emb), torch.from_numpy(labels), chunk=chunk, similarity="dot")
    _check_against_reference(got, ref)
    assert got["num_queries"] == used.sum() and got["num_skipped"] == (~used).sum() >= 3


@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean"])
def test_random_continuous_matches_loop(similarity):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((41, 5))
    labels = rng.integers(0, 6, size=41)
    ref, _ = _reference(emb, labels, similarity=similarity)
    got = retrieval_metrics(torch.from_numpy(emb), torch.from_numpy(labels), ks=(1, 3, 10), chunk=6,
                            similarity=similarity)
    ref, _ = _reference(emb, labels, ks=(1, 3, 10), similarity=similarity)
    _check_against_reference(got, ref)


@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
def test_separate_gallery_matches_loop(chunk):
    rng = np.random.default_rng(2)
    q = rng.integers(-2, 3, size=(23, 4)).astype(np.float64)
    g = rng.integers(-2, 3, size=(31, 4)).astype(np.float64)
    ql = rng.integers(0, 8, size=23)
    gl = rng.integers(0, 6, size=31)  # query classes 6, 7 have no positive in the gallery
    # dot products of small integers: exact ties whatever the summation order (gemv for chunk=1, gemm otherwise)
    ref, used = _reference(q, ql, g, gl, ks=(1, 2, 5, 50), similarity="dot")
    got = retrieval_metrics(q, ql, g, gl, ks=(1, 2, 5, 50), chunk=chunk, similarity="dot")  # numpy in, k > N clamped
    _check_against_reference(got, ref)
    assert got["num_queries"] == used.sum() < 23


def test_exclude_self_false_counts_the_query():
    emb, labels = _tied_data(seed=3)
    ref, used = _reference(emb, labels, exclude_self=False, similarity="dot")
    got = retrieval_metrics(emb, labels, exclude_self=False, chunk=10, similarity="dot")
    _check_against_reference(got, ref)
    assert got["num_skipped"] == 0 == (~used).sum()


def test_per_query_matches_loop_and_marks_skipped():
    emb, labels = _tied_data(seed=4)
    ref, used = _reference(emb, labels, similarity="dot")
    pq = per_query_metrics(emb, labels, chunk=4, similarity="dot")
    assert torch.equal(pq["num_pos"] > 0, torch.from_numpy(used))
    np.testing.assert_allclose(pq["AP"][torch.from_numpy(used)].numpy(), ref["mAP"], atol=1e-6)
    np.testing.assert_allclose(pq["AP@R"][torch.from_numpy(used)].numpy(), ref["mAP@R"], atol=1e-6)
    np.testing.assert_allclose(pq["R@1"][torch.from_numpy(used)].numpy(), ref["R@1"])


def test_hand_computed_example():
    # 1-D embeddings, dot product: query 0 (label 0) sees scores .9 .8 .7 .6 .5 .4 for labels 0 1 0 1 2 0,
    # i.e. ranking + - + - - +  ->  AP = (1/1 + 2/3 + 3/6)/3 = 13/18, AP@R (R=3) = (1 + 2/3)/3 = 5/9,
    # R-precision = 2/3, R@1 = 1.
    # Query 1 (label 1) sees the reverse: - - + - + -  ->  AP = (1/3 + 2/5)/2 = 11/30, AP@R = 0, R@4 = 1.
    # Query 2 (label 7) has no positive: skipped.
    # Query 3 (label 2, zero vector): all six tied; pessimistic rule puts its single positive last:
    #   AP = 1/6, AP@R = 0, R@k = 0 for k < 6, R@8 = 1.
    gallery = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4]])
    gallery_labels = torch.tensor([0, 1, 0, 1, 2, 0])
    queries = torch.tensor([[1.0], [-1.0], [1.0], [0.0]])
    query_labels = torch.tensor([0, 1, 7, 2])
    m = retrieval_metrics(queries, query_labels, gallery, gallery_labels, similarity="dot", chunk=3)
    exact = {
        "R@1": Fraction(1, 3), "R@2": Fraction(1, 3), "R@4": Fraction(2, 3), "R@8": Fraction(1),
        "mAP": (Fraction(13, 18) + Fraction(11, 30) + Fraction(1, 6)) / 3,  # = 113/270
        "mAP@R": Fraction(5, 9) / 3, "R-precision": Fraction(2, 3) / 3,
    }
    for key, value in exact.items():
        assert m[key] == pytest.approx(float(value), abs=1e-7), key
    assert m["num_queries"] == 3 and m["num_skipped"] == 1
    r4 = recall_at_k(queries, query_labels, gallery, gallery_labels, ks=4, similarity="dot")
    assert r4 == {4: pytest.approx(2 / 3)}
    assert map_at_r(queries, query_labels, gallery, gallery_labels, similarity="dot") == pytest.approx(5 / 27)
    assert mean_average_precision(queries, query_labels, gallery, gallery_labels, similarity="dot") == \
        pytest.approx(113 / 270)


def test_constant_embeddings_are_worst_case():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3])
    m = retrieval_metrics(torch.ones(10, 4), labels)
    assert m["R@1"] == 0.0 and m["mAP@R"] == 0.0
    # every positive is ranked after every negative of its 9-item gallery (pessimistic ties)
    ref, _ = _reference(np.ones((10, 4)), labels.numpy())
    _check_against_reference(m, ref)


def test_perfect_embeddings_score_one():
    labels = torch.arange(60) % 6
    emb = torch.nn.functional.one_hot(labels, 6).float() + 0.01 * torch.randn(60, 6)
    m = retrieval_metrics(emb, labels)
    assert all(m[key] == 1.0 for key in ("R@1", "R@8", "mAP@R", "R-precision", "mAP"))


def test_no_query_with_positives_gives_nan():
    m = retrieval_metrics(torch.randn(5, 3), torch.arange(5))
    assert m["num_queries"] == 0 and m["num_skipped"] == 5
    assert math.isnan(m["R@1"]) and math.isnan(m["mAP"])


def test_dtypes_and_inputs_agree():
    emb, labels = _tied_data(seed=5)
    base = retrieval_metrics(emb, labels, similarity="dot")
    for e in (torch.from_numpy(emb).double(), torch.from_numpy(emb).half(), torch.from_numpy(emb)):
        assert retrieval_metrics(e, torch.from_numpy(labels).int(), similarity="dot") == base
    assert retrieval_metrics(emb, labels, ks=np.array(KS), similarity="dot") == base
    assert retrieval_metrics(emb, labels, ks=torch.tensor(KS), similarity="dot") == base


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(query_emb=[[1.0]]), TypeError, "torch.Tensor or numpy.ndarray"),
    (dict(query_emb=torch.ones(4, 2, dtype=torch.long)), TypeError, "floating-point"),
    (dict(query_emb=torch.ones(4)), ValueError, "2-D"),
    (dict(query_emb=torch.ones(0, 2), query_labels=torch.ones(0, dtype=torch.long)), ValueError, "non-empty"),
    (dict(query_emb=torch.tensor([[1.0], [math.nan], [0.0], [1.0]])), ValueError, "NaN"),
    (dict(query_labels=torch.ones(4)), TypeError, "integer"),
    (dict(query_labels=torch.ones(3, dtype=torch.long)), ValueError, r"shape \(4,\)"),
    (dict(gallery_emb=torch.ones(3, 2)), ValueError, "together"),
    (dict(gallery_emb=torch.ones(3, 5), gallery_labels=torch.ones(3, dtype=torch.long)), ValueError, "same dim"),
    (dict(gallery_emb=torch.ones(3, 2), gallery_labels=torch.ones(2, dtype=torch.long)), ValueError, r"shape \(3,\)"),
    (dict(ks=()), TypeError, "non-empty"),
    (dict(ks=(1, 0)), ValueError, ">= 1"),
    (dict(ks=(1.5,)), TypeError, "integer"),
    (dict(chunk=0), ValueError, "chunk"),
    (dict(chunk=2.0), TypeError, "chunk"),
    (dict(exclude_self="yes"), TypeError, "exclude_self"),
    (dict(similarity="l2"), ValueError, "similarity"),
])
def test_bad_input_raises(kwargs, exc, match):
    args = dict(query_emb=torch.randn(4, 2), query_labels=torch.tensor([0, 0, 1, 1]))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        retrieval_metrics(**args)


# --------------------------------------------------------------------------- hostile input: magnitudes

SIMS = ("cosine", "dot", "euclidean")


def _random_data(q=41, d=5, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, d, generator=g), torch.randint(0, classes, (q,), generator=g)


@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("dtype,exponent", [(torch.float32, 67), (torch.float32, -100),
                                            (torch.float64, 600), (torch.float64, -600)],
                         ids=["f32-2^67", "f32-2^-100", "f64-2^600", "f64-2^-600"])
def test_huge_and_tiny_embeddings_rank_as_unscaled(similarity, dtype, exponent):
    # 1e20 embeddings overflowed the dot products / squared distances, 1e-30 ones underflowed the
    # norm: every similarity became the same and every metric the all-ties value. Scaling by a
    # power of two changes no ranking, so the metrics must be identical.
    for emb, labels in (_random_data(), tuple(map(torch.from_numpy, _tied_data(seed=3)))):
        emb = emb.to(dtype)
        scale = 2.0 ** exponent
        base = retrieval_metrics(emb, labels, similarity=similarity)
        assert retrieval_metrics(emb * scale, labels, similarity=similarity) == base
        g_emb, g_labels = emb[::2].clone(), labels[::2].clone()
        sep = retrieval_metrics(emb, labels, g_emb, g_labels, similarity=similarity, chunk=7)
        assert retrieval_metrics(emb * scale, labels, g_emb * scale, g_labels, similarity=similarity, chunk=7) == sep
        got = per_query_metrics(emb * scale, labels, similarity=similarity)
        ref = per_query_metrics(emb, labels, similarity=similarity)
        for key in ref:
            assert torch.equal(got[key], ref[key]), key


def test_dot_ranking_is_per_query_scale_free():
    # dot ranks each query's gallery: scaling one query must not change its row, however large
    emb, labels = _random_data(seed=2)
    base = per_query_metrics(emb, labels, similarity="dot")
    row_scale = torch.exp2(torch.randint(-120, 120, (emb.shape[0], 1)).float())
    got = per_query_metrics(emb * row_scale, labels, emb, labels, similarity="dot", exclude_self=False)
    ref = per_query_metrics(emb, labels, emb, labels, similarity="dot", exclude_self=False)
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    assert torch.equal(per_query_metrics(emb, labels, similarity="dot")["AP"], base["AP"])


@pytest.mark.parametrize("similarity", ("dot", "euclidean"))
def test_float32_gallery_spanning_a_wide_range_is_exact(similarity):
    # rows 2**100 and 2**-100 apart fit float32 but not one common scale in float32: ranked in float64
    emb, labels = _random_data(seed=4)
    gal, gal_labels = _random_data(q=30, seed=5)
    gal = gal * torch.exp2(torch.tensor([100.0, -100.0]).repeat(15)).unsqueeze(1)
    got = retrieval_metrics(emb, labels, gal, gal_labels, similarity=similarity)
    ref, _ = _reference(emb.numpy(), labels.numpy(), gal.numpy(), gal_labels.numpy(), similarity=similarity)
    _check_against_reference(got, ref)


def test_float64_gallery_beyond_float64_range_is_refused():
    emb, labels = _random_data(seed=4)
    gal = torch.randn(6, 5, dtype=torch.float64)
    gal[:3] *= 2.0 ** 1000
    gal[3:] *= 2.0 ** -1000
    with pytest.raises(ValueError, match="retrieval_metrics: `gallery_emb` spans more magnitudes than float64"):
        retrieval_metrics(emb.double(), labels, gal, torch.arange(6) % 2, similarity="dot")
    # cosine normalises each row on its own: the same gallery is fine
    retrieval_metrics(emb.double(), labels, gal, torch.arange(6) % 2)


def test_exclude_self_accepts_numpy_bool_only():
    emb, labels = _random_data()
    assert retrieval_metrics(emb, labels, exclude_self=np.bool_(False)) == retrieval_metrics(emb, labels,
                                                                                             exclude_self=False)
    for bad in (1, 0, 1.0):
        with pytest.raises(TypeError, match="retrieval_metrics: `exclude_self` must be a bool"):
            retrieval_metrics(emb, labels, exclude_self=bad)


def test_ks_beyond_int64_is_a_value_error_in_metrics():
    emb, labels = _random_data()
    with pytest.raises(ValueError, match=r"retrieval_metrics: every k in `ks` must be <= 2\*\*63 - 1"):
        retrieval_metrics(emb, labels, ks=(1, 1 << 64))
    assert recall_at_k(emb, labels, ks=4) == {4: retrieval_metrics(emb, labels, ks=(4,))["R@4"]}


def test_metrics_is_imported_with_the_package():
    import subprocess
    import sys

    code = "import fastrank; print(fastrank.metrics.retrieval_metrics.__name__, 'metrics' in fastrank.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["retrieval_metrics", "True"]
