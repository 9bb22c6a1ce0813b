"""Property-based fuzzing (hypothesis): every available backend agrees with the fp64 naive reference.

Seeds are derandomized (reproducible in CI); `make fuzz` runs many more examples
(FASTRANK_FUZZ_EXAMPLES). Triton runs under the interpreter in CI, on the same small shapes.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrank

from .conftest import FUSED_CPU

EXAMPLES = int(os.environ.get("FASTRANK_FUZZ_EXAMPLES", "100"))
# the Triton interpreter is ~100x slower per call: fewer examples, still a few hundred per backend
TRITON_EXAMPLES = int(os.environ.get("FASTRANK_FUZZ_TRITON_EXAMPLES", str(max(1, EXAMPLES // 2))))
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=_HEALTH)
FUZZ_TRITON = settings(max_examples=TRITON_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=_HEALTH)
TRITON = [b for b in ("triton",) if fastrank.backends()[b].available]

SIZES = st.sampled_from([1, 2, 3, 5, 7, 11, 13, 16, 17, 31])


@st.composite
def problems(draw):
    q, n = draw(SIZES), draw(SIZES)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    classes = draw(st.integers(1, 6))
    grid = draw(st.sampled_from([None, 0.1, 0.05]))  # coarse grids make ties
    scores = torch.rand(q, n, generator=g, dtype=torch.float64) * 2 - 1
    if grid:
        scores = (scores / grid).round() * grid
    glab = torch.randint(classes, (n,), generator=g)
    qlab = torch.randint(classes + 1, (q,), generator=g)
    form = draw(st.sampled_from(["labels", "bool", "graded"]))
    if form == "labels":
        target = (qlab, glab)
    else:
        dense = qlab[:, None] == glab[None, :]
        target = dense if form == "bool" else dense * torch.rand(q, n, generator=g, dtype=torch.float64)
    ig = draw(st.sampled_from(["none", "index", "mask"]))
    ignore = {"none": None, "index": torch.randint(-1, n, (q,), generator=g),
              "mask": torch.rand(q, n, generator=g) < 0.25}[ig]
    return scores, target, ignore


def _value_grad(fn, scores, target, ignore, backend, **kw):
    s = scores.clone().requires_grad_()
    v = fn(s, target, ignore=ignore, backend=backend, reduction="none", **kw)
    (g,) = torch.autograd.grad(v.sum(), s)
    return v.detach(), g


OPS = {
    "smooth_ap": (fastrank.smooth_ap, dict(tau=0.05)),
    "sup_ap": (fastrank.sup_ap, dict(tau=0.05)),
    "sup_ap_sharp": (fastrank.sup_ap, dict(tau=1e-3, rho=10.0, delta=0.02)),
    "recall": (fastrank.recall_at_k, dict(ks=(1, 3))),
    "fastap": (fastrank.histogram_ap, dict(bins=5)),
    "softbin": (fastrank.histogram_ap, dict(kind="softbin", bins=7, range=(-1.0, 1.0))),
}


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("op", sorted(OPS))
@FUZZ
@given(problem=problems())
def test_fuzz_backend_matches_naive(backend, op, problem):
    fn, kw = OPS[op]
    _assert_matches_naive(fn, kw, backend, *problem)


def _assert_matches_naive(fn, kw, backend, scores, target, ignore):
    v0, g0 = _value_grad(fn, scores, target, ignore, "naive", **kw)
    v1, g1 = _value_grad(fn, scores, target, ignore, backend, **kw)
    torch.testing.assert_close(v1, v0, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(g1, g0, rtol=1e-7, atol=1e-9)
    assert torch.isfinite(v1).all() and torch.isfinite(g1).all()


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("op", sorted(OPS))
@FUZZ_TRITON
@given(problem=problems())
def test_fuzz_triton_matches_naive(backend, op, problem):
    test_fuzz_backend_matches_naive.hypothesis.inner_test(backend, op, problem)


# ---- graded relevance (issue 9)


@st.composite
def graded_problems(draw):
    q, n = draw(SIZES), draw(SIZES)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    grid = draw(st.sampled_from([None, 0.1, 0.05]))
    scores = torch.rand(q, n, generator=g, dtype=torch.float64) * 2 - 1
    if grid:
        scores = (scores / grid).round() * grid
    levels = draw(st.integers(1, 4))
    rel = torch.randint(0, levels + 1, (q, n), generator=g).to(torch.float64)
    if draw(st.booleans()):  # real-valued grades, some shared
        rel = rel * torch.tensor([0.5, 1.25], dtype=torch.float64)[torch.randint(2, (q, n), generator=g)]
    ig = draw(st.sampled_from(["none", "index", "mask"]))
    ignore = {"none": None, "index": torch.randint(-1, n, (q,), generator=g),
              "mask": torch.rand(q, n, generator=g) < 0.25}[ig]
    return scores, rel, ignore


GRADED_OPS = {
    "h_ap": (fastrank.h_ap, dict(tau=0.05)),
    "h_ap_sigmoid": (fastrank.h_ap, dict(step="sigmoid", tau=0.05)),
    "ndcg": (fastrank.ndcg, dict(tau=0.05)),
}


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("op", sorted(GRADED_OPS))
@FUZZ
@given(problem=graded_problems())
def test_fuzz_graded_backend_matches_naive(backend, op, problem):
    fn, kw = GRADED_OPS[op]
    _assert_matches_naive(fn, kw, backend, *problem)  # problem: (scores, relevance, ignore)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("op", sorted(GRADED_OPS))
@FUZZ_TRITON
@given(problem=graded_problems())
def test_fuzz_graded_triton_matches_naive(backend, op, problem):
    test_fuzz_graded_backend_matches_naive.hypothesis.inner_test(backend, op, problem)
