"""Backward passes are bitwise reproducible, independent of the thread count and of concurrent callers."""
import threading

import pytest
import torch

import fastrank

from .cases import make_case
from .conftest import FUSED_CPU


def _grad(case, fn, backend):
    s = case.scores.clone().requires_grad_()
    fn(s, case.target, ignore=case.ignore, backend=backend).backward()
    return s.grad


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_is_bitwise_reproducible(backend, fn, dtype):
    case = make_case(64, 301, 7, "labels", "self", seed=9, dtype=dtype)
    g1 = _grad(case, fn, backend)
    g2 = _grad(case, fn, backend)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_result_does_not_depend_on_thread_count(backend):
    case = make_case(97, 203, 5, "labels", "mask", seed=4, dtype=torch.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        g1 = _grad(case, fastrank.sup_ap, backend)
        torch.set_num_threads(max(2, old))
        g2 = _grad(case, fastrank.sup_ap, backend)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_concurrent_calls_match_sequential(backend):
    cases = [make_case(40, 120, 4, "labels", "index", seed=s, dtype=torch.float32) for s in range(6)]
    expect = [_grad(c, fastrank.smooth_ap, backend) for c in cases]
    got = [None] * len(cases)
    errors = []

    def work(i):
        try:
            for _ in range(3):
                got[i] = _grad(cases[i], fastrank.smooth_ap, backend)
        except Exception as e:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for g, e in zip(got, expect):
        assert torch.equal(g, e)
