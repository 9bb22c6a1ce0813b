"""NaN in -> NaN out, per query: the problem and the check every loss's tests share.

A query whose valid (not ignored) items hold a NaN score is NaN in reduction="none" -- with or
without positives -- and makes the "mean" and "sum" NaN; where it has positives, its gradient row
holds NaN too. A NaN at an ignored item changes nothing: that query matches the naive backend.
"""
from __future__ import annotations

import torch

from .conftest import AVAILABLE, CPU_BACKENDS, TRITON_ON_GPU

#: every backend that runs on CPU tensors here, Triton in the interpreter included
NAN_BACKENDS = CPU_BACKENDS + (["triton"] if "triton" in AVAILABLE and not TRITON_ON_GPU else [])

NAN = float("nan")
QUERY_LABELS = torch.tensor([0, 5, 1, 1, 0])  # label 5 is not in the gallery: query 1 has no positive
GALLERY_LABELS = torch.tensor([0, 1, 0, 1, 2, 1, 0])
#: queries 0 (with positives) and 1 (without) hold a valid NaN; 2 holds an ignored one (with
#: ignore), 3 and 4 none
POISONED = torch.tensor([True, True, False, False, False])


def nan_problem(ignore_kind: str, seed: int = 0):
    """(scores (5, 7) float64, label target, ignore) with the NaN layout of POISONED."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(5, 7, generator=g, dtype=torch.float64) * 2 - 1
    s[0, 4] = NAN  # a negative competitor of a query with positives
    s[1, 3] = NAN  # any item of the query without positives
    ignore = None
    if ignore_kind == "index":
        ignore = torch.tensor([-1, 0, 5, 2, -1])
        s[2, 5] = NAN
    elif ignore_kind == "mask":
        ignore = torch.rand(5, 7, generator=g) < 0.2
        ignore[0, 4] = ignore[1, 3] = False
        ignore[2, 5] = True
        s[2, 5] = NAN
    return s, (QUERY_LABELS, GALLERY_LABELS), ignore


def nan_relevance() -> torch.Tensor:
    """Graded relevance of the same problem (query 1 has no relevant item)."""
    rel = 2.0 * (QUERY_LABELS.unsqueeze(1) == GALLERY_LABELS.unsqueeze(0)).double()
    rel[0, 1] = rel[2, 4] = rel[3, 0] = 1.0
    return rel


def check_nan_rows(fn, backend: str, ignore_kind: str, target=None) -> None:
    """fn(scores, target, ignore=..., backend=..., reduction=...) -> per-query score."""
    s, labels, ignore = nan_problem(ignore_kind)
    target = labels if target is None else target
    x = s.clone().requires_grad_()
    per_query = fn(x, target, ignore=ignore, backend=backend, reduction="none")
    assert torch.equal(torch.isnan(per_query), POISONED), per_query
    ref = fn(s, target, ignore=ignore, backend="naive", reduction="none")
    torch.testing.assert_close(per_query.detach()[~POISONED], ref[~POISONED], rtol=1e-7, atol=1e-9)
    per_query.sum().backward()
    # query 0's value depends on its NaN: so does its gradient. Query 1's value is a constant
    # (no positive), its gradient row 0 or NaN, both honest.
    assert torch.isnan(x.grad[0]).any(), x.grad
    assert torch.isfinite(x.grad[~POISONED]).all(), x.grad
    # only the query without positives is NaN: the reduced loss is NaN all the same
    only = s.clone()
    only[0, 4] = 0.25
    for reduction in ("mean", "sum"):
        got = fn(only, target, ignore=ignore, backend=backend, reduction=reduction)
        assert torch.isnan(got), (reduction, got)
