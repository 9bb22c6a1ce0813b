"""The fused CPU loss ops keep their last large gradient-rows block for the next call
(csrc/cpu/grad_rows.cpp): reused only when nothing holds it, never changing a result, and
returned to the system by fastrank.empty_cache() or never kept with FASTRANK_CACHE_GRAD_ROWS=0."""
import os
import subprocess
import sys

import pytest
import torch

import fastrank
from fastrank.core.extension import cached_bytes

from .conftest import requires

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (Q, N) float32 rows of 16 MiB, above the 4 MiB the cache starts at; 400 classes keep the
# positives per row few (about 10)
Q, N = 1024, 4000


def _problem(seed=0, q=Q, n=N, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(q, n, generator=g, dtype=dtype)
    glab = torch.randint(0, 400, (n,), generator=g)
    qlab = glab[:q].clone()
    return scores, (qlab, glab)


def _grad(fn, scores, target, **kw):
    s = scores.clone().requires_grad_()
    (1 - fn(s, target, backend="cpp", **kw)).backward()
    return s.grad


@requires("cpp")
def test_a_dead_gradient_is_reused_and_empty_cache_returns_it():
    fastrank.empty_cache()
    scores, target = _problem()
    g1 = _grad(fastrank.sup_ap, scores, target)
    ptr = g1.data_ptr()
    assert cached_bytes() == 0  # alive: not in the cache
    del g1
    kept = cached_bytes()
    assert kept >= Q * N * 4  # a whole block (2 MiB pages)
    g2 = _grad(fastrank.sup_ap, scores, target)
    assert g2.data_ptr() == ptr and cached_bytes() == 0
    del g2
    assert fastrank.empty_cache() == kept
    assert cached_bytes() == 0 and fastrank.empty_cache() == 0


@requires("cpp")
def test_a_live_gradient_is_never_handed_out_again():
    fastrank.empty_cache()
    scores, target = _problem()
    g1 = _grad(fastrank.smooth_ap, scores, target)
    g2 = _grad(fastrank.smooth_ap, scores, target)
    assert g1.data_ptr() != g2.data_ptr()
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@requires("cpp")
@pytest.mark.parametrize("loss", ["sup_ap", "smooth_ap", "recall_at_k", "fastap", "h_ap"])
def test_a_reused_block_gives_the_result_of_a_fresh_one(loss):
    """The stale values of a reused block never show: every row is written, including the rows
    without positives (0) and a row made NaN; the gradient equals a fresh allocation's exactly."""
    scores, target = _problem(seed=1)
    qlab, glab = target
    qlab = qlab.clone()
    qlab[:7] = 10_000  # queries without positives
    scores[9, 3] = float("nan")  # a NaN row
    if loss == "h_ap":
        target = (qlab[:, None] == glab[None, :]).to(scores.dtype) * 2 + (qlab[:, None] % 7 == glab[None, :] % 7)
        target[:7] = 0
    else:
        target = (qlab, glab)
    fn = {"sup_ap": fastrank.sup_ap, "smooth_ap": fastrank.smooth_ap, "fastap": fastrank.histogram_ap,
          "h_ap": fastrank.h_ap, "recall_at_k": lambda s, t, **kw: fastrank.recall_at_k(s, t, ks=(1, 4), **kw)}[loss]
    fastrank.empty_cache()
    fresh = _grad(fn, scores, target)
    # poison a block of the same size, then free it into the cache
    junk = _grad(fn, torch.rand_like(scores), target)
    junk.fill_(123.0)
    ptr = junk.data_ptr()
    del junk
    again = _grad(fn, scores, target)
    assert again.data_ptr() == ptr
    torch.testing.assert_close(again, fresh, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(again[9]).any() and (again[:7] == 0).all()


@requires("cpp")
def test_small_and_much_smaller_requests_do_not_take_the_block():
    fastrank.empty_cache()
    scores, target = _problem()
    g = _grad(fastrank.sup_ap, scores, target)
    del g
    kept = cached_bytes()
    small_scores, small_target = _problem(q=64, n=64)
    _grad(fastrank.sup_ap, small_scores, small_target)  # below 4 MiB: the default allocator
    assert cached_bytes() == kept
    # a request under half the block does not pin it: a fresh block, the old one stays cached
    half_scores, half_target = _problem(q=300, n=N)  # 4.8 MB: a 6 MiB block against 16 MiB
    h = _grad(fastrank.sup_ap, half_scores, half_target)
    assert cached_bytes() == kept
    del h  # the last freed block replaces the cached one (one block at most)
    assert 0 < cached_bytes() < kept
    fastrank.empty_cache()


@requires("cpp")
def test_the_cache_can_be_turned_off():
    code = (
        "import torch, fastrank\n"
        "from fastrank.core.extension import cached_bytes\n"
        "s = torch.rand(1024, 4000).requires_grad_()\n"
        "lab = torch.arange(4000) % 400\n"
        "(1 - fastrank.sup_ap(s, (lab[:1024], lab), backend='cpp')).backward()\n"
        "s.grad = None\n"
        "print(cached_bytes())\n"
    )
    for flag, cached in (("0", False), ("1", True)):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                             env={**os.environ, "FASTRANK_CACHE_GRAD_ROWS": flag}, timeout=300)
        assert (int(out.stdout.strip().splitlines()[-1]) > 0) == cached, (flag, out.stdout)


def test_empty_cache_without_work_is_zero():
    fastrank.empty_cache()
    assert fastrank.empty_cache() == 0


@requires("cpp")
@pytest.mark.parametrize("loss", ["sup_ap", "smooth_ap", "h_ap", "fastap"])
def test_kept_row_scratch_carries_nothing_between_calls(loss):
    """Small calls reuse the last call's per-thread row scratch (parallel.h ScratchPool): a call
    after one on other data (positives everywhere, a NaN, ties) gives what a first call gives."""
    fn = {"sup_ap": fastrank.sup_ap, "smooth_ap": fastrank.smooth_ap, "h_ap": fastrank.h_ap,
          "fastap": fastrank.histogram_ap}[loss]

    def target_of(qlab, glab, dtype):
        if loss == "h_ap":
            return (qlab[:, None] == glab[None, :]).to(dtype) * 2 + (qlab[:, None] % 3 == glab[None, :] % 3)
        return (qlab, glab)

    a_scores, (aq, ag) = _problem(seed=3, q=40, n=300)
    a_scores[5, 7] = float("nan")
    a_scores[6, :] = 0.5  # ties everywhere
    aq = torch.zeros_like(aq)
    ag = torch.zeros_like(ag)  # every item a positive
    b_scores, (bq, bg) = _problem(seed=4, q=40, n=300)
    bq = bq.clone()
    bq[:3] = 10_000  # rows without positives
    b_target = target_of(bq, bg, b_scores.dtype)
    fastrank.empty_cache()  # drops the kept scratch too: the first call below builds its own
    first = _grad(fn, b_scores, b_target)
    _grad(fn, a_scores, target_of(aq, ag, a_scores.dtype))
    again = _grad(fn, b_scores, b_target)
    torch.testing.assert_close(again, first, rtol=0, atol=0, equal_nan=True)


@requires("cpp")
def test_concurrent_calls_share_neither_block_nor_scratch():
    import threading

    problems = [_problem(seed=10 + i, q=64, n=500) for i in range(4)]
    expected = [_grad(fastrank.sup_ap, s, t) for s, t in problems]
    errors = []

    def work(i):
        try:
            for _ in range(20):
                s, t = problems[i]
                torch.testing.assert_close(_grad(fastrank.sup_ap, s, t), expected[i], rtol=0, atol=0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
