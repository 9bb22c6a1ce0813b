"""The float32 AVX-512 loops of the CPU kernels (csrc/cpu/loops.h) against the portable loops
(FASTRANK_CPU_PORTABLE=1) and the fp64 reference: same values and gradients to float32
rounding, tails of every length, NaN and inf rules kept. Each configuration runs in a fresh
process (the choice of loops is read once per process)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import requires

pytestmark = requires("cpp")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys, torch, fastrank
torch.manual_seed(0)
out = {}
for n in list(range(1, 40)) + [64, 255, 1000]:
    g = torch.Generator().manual_seed(n)
    s = torch.randn(5, n, generator=g) * 0.1
    s[0, : n // 3] = s[0, 0]  # ties
    labels = torch.randint(0, 3, (n,), generator=g)
    qlab = torch.randint(0, 3, (5,), generator=g)
    rel = torch.randint(0, 3, (5, n), generator=g).float()
    for name, fn, target in (("smooth", fastrank.smooth_ap, (qlab, labels)),
                             ("sup", fastrank.sup_ap, (qlab, labels)),
                             ("hap", fastrank.h_ap, rel)):
        x = s.clone().requires_grad_()
        v = fn(x, target, reduction="none", backend="cpp")
        v.sum().backward()
        out[f"{name}-{n}"] = [v.tolist(), x.grad.flatten().tolist()]
# NaN and inf rules
s = torch.tensor([[0.1, float("inf"), 0.3, -float("inf"), 0.2] * 4])
lab = torch.tensor([0, 1, 0, 1, 0] * 4)
for name, fn in (("smooth", fastrank.smooth_ap), ("sup", fastrank.sup_ap)):
    x = s.clone().requires_grad_()
    v = fn(x, (lab[:1], lab), reduction="none", backend="cpp")
    v.sum().backward()
    out[f"{name}-inf"] = [v.tolist(), x.grad.flatten().tolist()]
print(json.dumps(out))
"""


def _run(portable: bool):
    env = {**os.environ, "FASTRANK_CPU_PORTABLE": "1" if portable else "0"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_avx512_loops_match_portable_loops():
    fast, portable = _run(False), _run(True)
    assert fast.keys() == portable.keys()
    for key in fast:
        for a, b in zip(fast[key], portable[key]):
            ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
            assert torch.equal(ta.isnan(), tb.isnan()), key
            # float32 rounding of sums of up to ~1000 terms of size <= 1 (and gradients <= ~1/tau)
            torch.testing.assert_close(ta, tb, rtol=2e-5, atol=2e-5 * max(1.0, float(tb.nan_to_num().abs().max())),
                                       equal_nan=True, msg=key)
