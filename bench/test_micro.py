"""pytest-benchmark micro-benchmarks of the core ops: forward+backward of ``1 - op(...)``.

Run them with ``make bench-micro`` (``pytest bench/test_micro.py --benchmark-only``).
They live outside ``tests/`` so that ``make test`` does not collect them; the harness
tests (tests/test_bench.py) run this file once with ``--benchmark-disable`` (each
benchmark body executes a single time, as a smoke test), the way CI runs them.

Each op runs on the `batch` workload at B = 512 on the fused backends and at
B = 128 on `naive` (its (B, B, B) cube costs ~10 s per call at 512 on 2 cores).
The same op dispatch as the sweep (bench.measure.OP_DEFS) is used, so the micro and
sweep numbers measure the same calls.
"""
from __future__ import annotations

import pytest
import torch

import fastrank
from bench.measure import OP_DEFS, OPS
from bench.workloads import build

_AVAILABLE = {name for name, info in fastrank.backends().items() if info.available}
_CASES = [(op, b, 128 if b == "naive" else 512) for op in OPS for b in ("naive", "torch", "cpp")]


@pytest.mark.parametrize("op,backend,B", _CASES, ids=[f"{o}-{b}-B{n}" for o, b, n in _CASES])
def test_fwd_bwd(benchmark, op, backend, B):
    if backend not in _AVAILABLE:
        pytest.skip(f"{backend}: {fastrank.backends()[backend].reason}")
    benchmark.group = f"{op} fwd+bwd (batch)"
    w = build("batch", B)
    x = w.scores.requires_grad_(True)
    call = OP_DEFS[op].call

    def step():
        x.grad = None
        loss = 1 - call(x, w, backend)
        loss.backward()
        return loss

    loss = benchmark(step)
    assert torch.isfinite(loss).all() and x.grad is not None
