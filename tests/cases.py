"""Random rank-sums problems shared by the tests: odd sizes, unequal and non-contiguous
classes, queries without positives, ties, every target and ignore form."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Case:
    name: str
    scores: torch.Tensor
    target: object
    ignore: Optional[torch.Tensor]

    def __repr__(self) -> str:  # pytest ids
        return self.name


def make_case(
    q: int,
    n: int,
    classes: int,
    target_kind: str = "labels",
    ignore_kind: str = "none",
    ties: bool = False,
    seed: int = 0,
    dtype=torch.float64,
) -> Case:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(q, n, generator=g, dtype=torch.float64) * 2 - 1
    if ties:
        scores = (scores * 10).round() / 10  # many exact ties, d = 0 for positives and negatives
    scores = scores.to(dtype)
    glab = torch.randint(classes, (n,), generator=g)
    qlab = torch.randint(classes + 1, (q,), generator=g)  # label `classes` never occurs: no positive
    if target_kind == "labels":
        target = (qlab, glab)
    else:
        dense = qlab.unsqueeze(1) == glab.unsqueeze(0)
        if target_kind == "bool":
            target = dense
        elif target_kind == "int":
            target = dense.to(torch.int32) * torch.randint(1, 4, (q, n), generator=g, dtype=torch.int32)
        elif target_kind == "float":
            # graded values, negatives below zero: only > 0 counts as positive
            target = torch.where(dense, torch.rand(q, n, generator=g) + 0.1, -torch.rand(q, n, generator=g))
        else:
            raise ValueError(target_kind)
    if ignore_kind == "none":
        ignore = None
    elif ignore_kind == "index":
        ignore = torch.randint(-1, n, (q,), generator=g)
    elif ignore_kind == "self":
        ignore = torch.arange(q) if q <= n else torch.where(torch.arange(q) < n, torch.arange(q), -1)
    elif ignore_kind == "mask":
        ignore = torch.rand(q, n, generator=g) < 0.2
    else:
        raise ValueError(ignore_kind)
    name = f"q{q}-n{n}-c{classes}-{target_kind}-{ignore_kind}{'-ties' if ties else ''}-s{seed}"
    return Case(name, scores, target, ignore)


SHAPES = [(1, 1, 1), (1, 7, 2), (5, 1, 1), (7, 13, 3), (13, 13, 4), (16, 33, 5), (31, 17, 2), (40, 64, 9)]


def all_cases():
    cases = []
    kinds = ["labels", "bool", "int", "float"]
    ignores = ["none", "index", "self", "mask"]
    for i, (q, n, c) in enumerate(SHAPES):
        for j, tk in enumerate(kinds):
            ik = ignores[(i + j) % len(ignores)]
            cases.append(make_case(q, n, c, tk, ik, ties=(i + j) % 3 == 0, seed=10 * i + j))
    return cases
