"""torch.autograd.gradcheck (fp64) through the fused backends, both steps."""
import pytest
import torch

import fastrank

from .conftest import FUSED_CPU


def _spread_scores(q, n, seed):
    # distinct scores on a 0.013 grid: every difference is a multiple of 0.013, so no pair sits
    # within gradcheck's step of the kinks of H^- at d = 0 and d = delta = 0.05
    g = torch.Generator().manual_seed(seed)
    vals = torch.randperm(q * n, generator=g).to(torch.float64) * 0.013 - 0.5
    return vals.view(q, n)


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("step", ["sigmoid", "suprank"])
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_gradcheck_rank_sums(backend, step, ignore_kind):
    q, n = 4, 7
    scores = _spread_scores(q, n, seed=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    ignore = {"none": None, "index": torch.tensor([0, -1, 3, 6]), "mask": torch.rand(q, n) < 0.2}[ignore_kind]

    def f(s):
        r = fastrank.rank_sums(s, (labels[:q], labels), step=step, tau=0.05, ignore=ignore, backend=backend)
        return r.rank_all, r.rank_pos

    assert torch.autograd.gradcheck(f, (scores.requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap])
def test_gradcheck_ap(backend, fn):
    scores = _spread_scores(5, 9, seed=2)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2, 1])

    def f(s):
        return fn(s, (labels[:5], labels), tau=0.05, backend=backend, reduction="none")

    assert torch.autograd.gradcheck(f, (scores.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_gradcheck_linear_branch_of_suprank(backend):
    # negatives far above positives: many pairs on the rho * (d - delta) branch
    scores = _spread_scores(3, 8, seed=3)
    target = scores < scores.median()

    def f(s):
        return fastrank.sup_ap(s, target, tau=0.05, backend=backend, reduction="none")

    assert torch.autograd.gradcheck(f, (scores.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)
