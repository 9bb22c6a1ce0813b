"""torch.autograd.gradcheck (fp64) of the rank-sums family through every fused backend, both steps.
(Graded: tests/test_graded.py; histograms: tests/test_histogram.py.)"""
import pytest
import torch

import fastrank

from .cases import backend_device, backend_params, spread_scores
from .conftest import TRITON_ON_GPU

BACKENDS = backend_params()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", ["sigmoid", "suprank"])
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_gradcheck_rank_sums(backend, step, ignore_kind):
    q, n = 4, 7
    device = backend_device(backend)
    scores = spread_scores(q, n, seed=1, device=device)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2], device=device)
    ignore = {"none": None, "index": torch.tensor([0, -1, 3, 6]), "mask": torch.rand(q, n) < 0.2}[ignore_kind]
    ignore = None if ignore is None else ignore.to(device)

    def f(s):
        r = fastrank.rank_sums(s, (labels[:q], labels), step=step, tau=0.05, ignore=ignore, backend=backend)
        return r.rank_all, r.rank_pos

    # interpreted Triton: the full Jacobian once per step; the ignore variants with gradcheck's fast
    # mode (random projections), which costs a handful of interpreted launches instead of ~100
    fast = backend == "triton" and not TRITON_ON_GPU and ignore_kind != "none"
    assert torch.autograd.gradcheck(f, (scores.requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap], ids=["smooth_ap", "sup_ap"])
def test_gradcheck_ap(backend, fn):
    device = backend_device(backend)
    scores = spread_scores(5, 9, seed=2, device=device)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2, 1], device=device)

    def f(s):
        return fn(s, (labels[:5], labels), tau=0.05, backend=backend, reduction="none")

    assert torch.autograd.gradcheck(f, (scores.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_linear_branch_of_suprank(backend):
    # negatives far above positives: many pairs on the rho * (d - delta) branch
    scores = spread_scores(3, 8, seed=3, device=backend_device(backend))
    target = scores < scores.median()

    def f(s):
        return fastrank.sup_ap(s, target, tau=0.05, backend=backend, reduction="none")

    assert torch.autograd.gradcheck(f, (scores.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)
