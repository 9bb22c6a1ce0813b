"""What the tests share: random rank-sums problems (odd sizes, unequal and non-contiguous classes,
queries without positives, ties, every target and ignore form), graded and histogram problems, the
backends with their devices, and the value-and-gradient runs every backend is compared with."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import fastrank

from .conftest import TRITON_DEVICE, TRITON_ON_GPU, requires


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


# --------------------------------------------------------------------------- backends and devices

#: every fused backend; the family tests run each one against backend="naive"
FUSED = ("torch", "cpp", "triton", "cuda")


def backend_device(backend: str) -> torch.device:
    """Where a backend's inputs live: Triton on the GPU where it is compiled, else interpreted on CPU tensors."""
    return {"triton": TRITON_DEVICE, "cuda": torch.device("cuda")}.get(backend, torch.device("cpu"))


def to_device(case: Case, device, dtype=None) -> Case:
    """The case with every tensor on `device` (scores also cast to `dtype` when given)."""

    def mv(t):
        return None if t is None else t.to(device)

    target = tuple(mv(t) for t in case.target) if isinstance(case.target, tuple) else mv(case.target)
    scores = case.scores.to(device=device, dtype=dtype or case.scores.dtype)
    return Case(case.name, scores, target, mv(case.ignore))


def backend_params(backends=FUSED):
    """pytest params of the backends, each marked to skip with its reason where it cannot run."""
    return [pytest.param(b, marks=requires(b)) for b in backends]


def _param_id(value) -> str:
    if isinstance(value, str):
        return value
    return getattr(value, "__name__", None) or repr(value)


def over_backends(entries, backends=FUSED, interpreted=None):
    """pytest params (backend, *entry) for every backend and entry, each backend marked to skip with
    its reason where it cannot run. Triton in the interpreter is ~100x slower per call than the CPU
    backends: where `interpreted` is given (entries of `entries`, the same objects), it runs only
    those (compiled on a GPU, all of them)."""
    params = []
    for backend in backends:
        for entry in entries:
            if backend == "triton" and interpreted is not None and not TRITON_ON_GPU:
                if not any(entry is e for e in interpreted):  # the same objects: cases hold tensors
                    continue
            entry = entry if isinstance(entry, tuple) else (entry,)
            params.append(pytest.param(backend, *entry, marks=requires(backend),
                                       id="-".join(_param_id(v) for v in (backend, *entry))))
    return params


# --------------------------------------------------------------------------- values and gradients


def outputs_and_grad(fn, scores: torch.Tensor, seed: Optional[int] = 123):
    """fn(scores) -> a tensor or a tuple of tensors. Returns the outputs, detached, followed by the
    gradient w.r.t. scores of a random linear functional of all of them (fp64 normal weights, one
    tensor per output in order, cast to its dtype and device); seed=None: their plain sum."""
    s = scores.clone().requires_grad_()
    outs = fn(s)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(o for o in outs if o is not None)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    total = 0
    for o in outs:
        if g is None:
            total = total + o.sum()
        else:
            w = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)
            total = total + (o * w).sum()
    (grad,) = torch.autograd.grad(total, s)
    return tuple(o.detach() for o in outs) + (grad,)


def assert_all_close(got, ref, rtol, atol, grad_rtol=None, grad_atol=None):
    """Outputs and gradient (the last entry) of outputs_and_grad against the reference's."""
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        last = i == len(got) - 1
        torch.testing.assert_close(a, b, rtol=grad_rtol if last and grad_rtol is not None else rtol,
                                   atol=grad_atol if last and grad_atol is not None else atol)


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item()


def assert_within_naive_error(got, naive, ref, slack, factor=2.0):
    """docs/design.md §3: the error vs the fp64 reference at most `factor` x the error of the naive
    computation in the same dtype, plus an absolute `slack`."""
    err, err_naive = max_err(got, ref), max_err(naive, ref)
    assert err <= factor * err_naive + slack, (err, err_naive)


def rank_sums_and_grad(case: Case, backend: str, step: str, **kw):
    """(rank_all, rank_pos, gradient) of fastrank.rank_sums on the case, dense (Q, N)."""
    return outputs_and_grad(
        lambda s: fastrank.rank_sums(s, case.target, step=step, ignore=case.ignore, backend=backend, **kw)[:2],
        case.scores)


def assert_rank_sums_close(got, ref):
    """The fp64 tolerances of rank_sums_and_grad's outputs against the naive cube's."""
    assert_all_close(got, ref, rtol=1e-10, atol=1e-9, grad_rtol=1e-9, grad_atol=1e-8)


#: step parameters away from the defaults: custom, degenerate (rho = delta = start = 0), a wide sigmoid
NON_DEFAULT_STEPS = [
    dict(step="suprank", tau=0.05, rho=7.0, delta=0.2, start=0.25, offset=1.5),
    dict(step="suprank", tau=0.02, rho=0.0, delta=0.0, start=0.0),
    dict(step="sigmoid", tau=0.3),
]
NON_DEFAULT_STEP_IDS = ["suprank-custom", "suprank-degenerate", "sigmoid-tau"]


def spread_scores(q: int, n: int, seed: int, device="cpu") -> torch.Tensor:
    """Distinct fp64 scores on a 0.013 grid: every difference is a multiple of 0.013, so no pair sits
    within gradcheck's step of the kinks of H^- at d = 0 and d = delta = 0.05."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(q * n, generator=g).to(torch.float64) * 0.013 - 0.5).view(q, n).to(device)


# --------------------------------------------------------------------------- graded relevance


def graded_ignore(kind: str, q: int, n: int, seed: int = 5):
    """None, a (Q,) index (-1 = none) or a (Q, N) mask (True = left out)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "index":
        return torch.randint(-1, n, (q,), generator=g)
    return torch.rand(q, n, generator=g) < 0.2


def tied_relevance_problem(q: int = 5, n: int = 11, seed: int = 0):
    """Scores on a 0.025 grid (ties at d = 0 and d = delta = 0.05), relevance in {0..3} with ties."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-8, 9, (q, n), generator=g).to(torch.float64) * 0.025
    rel = torch.randint(0, 4, (q, n), generator=g).to(torch.float64)
    rel[0] = torch.tensor([3.0, 0, 1, 1, 2, 2, 0, 1, 3, 0, 2])[:n]
    return scores, rel


# --------------------------------------------------------------------------- histograms

#: (kind, bins, range): both published defaults, ROADMAP's SoftBin copy, a coarse FastAP
HIST_CONFIGS = {
    "fastap": ("fastap", None, (0.0, 1.0)),
    "softbin": ("softbin", None, (0.0, 1.0)),
    "softbin-20-roadmap": ("softbin", 20, (-1.0, 1.0)),
    "fastap-3": ("fastap", 3, (0.0, 1.0)),
}


def histogram_ap_and_grad(case: Case, config: str, backend: str, seed: int = 123):
    """(AP per query, gradient of a random weighting of it) of fastrank.histogram_ap on the case."""
    kind, bins, rng = HIST_CONFIGS[config]
    return outputs_and_grad(
        lambda s: fastrank.histogram_ap(s, case.target, kind=kind, bins=bins, range=rng, ignore=case.ignore,
                                        backend=backend, reduction="none"),
        case.scores, seed)


def assert_histogram_ap_close(got, ref):
    """The fp64 tolerances of histogram_ap_and_grad's outputs against the naive (Q, N, L) tensor's."""
    assert_all_close(got, ref, rtol=1e-10, atol=1e-12, grad_rtol=1e-9, grad_atol=1e-10)


def histogram_params(config: str):
    """The HistParams of a HIST_CONFIGS entry (bins None: the kind's published default)."""
    from fastrank.histogram import histogram_params as make

    kind, bins, rng = HIST_CONFIGS[config]
    return make(kind, bins or {"fastap": 10, "softbin": 25}[kind], rng)


def bin_kinks_case(config: str) -> Case:
    """Scores whose bin coordinate is exactly an integer (a kink: derivative 0, as torch's relu/abs
    give) and exactly on the open ends; binary fractions keep v = scale * s + shift exact."""
    prm = histogram_params(config)
    ks = torch.arange(-1, prm.bins + 1, dtype=torch.float64)
    s_int = (ks - prm.shift) / prm.scale  # v = k exactly (or within an ulp)
    s = torch.cat([s_int, s_int + 0.25 / abs(prm.scale)]).view(2, -1)
    labels = torch.arange(s.shape[1]) % 3
    return Case(f"kinks-{config}", s, (labels[:2], labels), None)


# --------------------------------------------------------------------------- degenerate batches


def assert_zero_without_positives(fn, scores: torch.Tensor, target) -> None:
    """fn(scores, target) -> mean loss: no positive anywhere gives 0, still differentiable, zero gradient."""
    x = scores.clone().requires_grad_()
    loss = fn(x, target)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def nan_label_batch(q: int, at) -> tuple:
    """(scores (q, 6) float64 in [0, 1) with a NaN at `at`, labels target with positives everywhere)."""
    s = torch.rand(q, 6, dtype=torch.float64)
    s[at] = float("nan")
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    return s, (labels[:q], labels)


def poisoned_rows_case(q: int, n: int, ignore_kind: str, device) -> Case:
    """A "bool" case whose row 0 holds a valid NaN (at column 5: the row is poisoned) and row 1 an
    ignored one (at column 3: the row is unaffected; 0.25 there without `ignore`), both with positives."""
    case = to_device(make_case(q, n, 2, "bool", ignore_kind, seed=4), device)
    case.target[:2, :3] = True
    s = case.scores
    s[0, 5] = float("nan")
    s[1, 3] = float("nan")
    if ignore_kind == "mask":
        case.ignore[1, 3] = True
        case.ignore[0, 5] = False
    elif ignore_kind == "index":
        case.ignore[1] = 3
        case.ignore[0] = -1
    else:
        s[1, 3] = 0.25
    return case
