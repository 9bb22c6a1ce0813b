"""First calls from several threads at once: the extension, the ops' fake kernels and their
autograd formulas are registered lazily on the first public call, so that registration must be
complete before any thread runs an op. Each test runs in a fresh interpreter (in this one the
registration has long happened) where N threads make their first call together."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import requires

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: how both scripts end: n_threads threads run first_call(i), which waits on a barrier, together
_RUN_THREADS = r"""threads = [threading.Thread(target=first_call, args=(i,)) for i in range(n_threads)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""

SCRIPT = r"""
import json, sys, threading
import torch
import fastrank

backend = None if sys.argv[1] == "auto" else sys.argv[1]
n_threads = int(sys.argv[2])
labels = torch.arange(12) // 3
relevance = (labels.unsqueeze(1) == labels.unsqueeze(0)).double() + (labels.unsqueeze(1) // 2 == labels // 2).double()
OPS = {
    "sup_ap": lambda x, b: fastrank.sup_ap(x, (labels, labels), backend=b),
    "fastap": lambda x, b: fastrank.histogram_ap(x, (labels, labels), backend=b),
    "h_ap": lambda x, b: fastrank.h_ap(x, relevance, backend=b),
}
names = sorted(OPS)
inputs = [torch.rand(12, 12, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(n_threads)]
barrier = threading.Barrier(n_threads)
got = [None] * n_threads

def first_call(i):
    x = inputs[i].clone().requires_grad_()
    barrier.wait()  # every thread's first call starts together
    try:
        OPS[names[i % len(names)]](x, backend).backward()
        got[i] = x.grad
    except Exception as e:  # reported, not raised: the parent asserts on every thread
        got[i] = f"{type(e).__name__}: {e}"

""" + _RUN_THREADS + r"""report = []
for i in range(n_threads):
    x = inputs[i].clone().requires_grad_()
    OPS[names[i % len(names)]](x, "naive").backward()
    g = got[i]
    if g is None:
        report.append("no gradient (x.grad is None)")
    elif isinstance(g, str):
        report.append(g)
    elif not torch.allclose(g, x.grad, rtol=1e-9, atol=1e-12):
        report.append(f"gradient differs from naive by {float((g - x.grad).abs().max()):.3g}")
    else:
        report.append("ok")
print(json.dumps(report))
"""


def _first_calls(backend, n_threads):
    env = {k: v for k, v in os.environ.items() if k != "FASTRANK_BACKEND"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, backend, str(n_threads)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@requires("cpp")
@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_simultaneous_first_calls_all_get_correct_gradients(backend):
    report = _first_calls(backend, 12)
    assert report == ["ok"] * len(report), report


SCRIPT_LOAD = r"""
import json, threading
import torch
from fastrank.core.backend import _load_extension

n_threads = 16
barrier = threading.Barrier(n_threads)
got = [None] * n_threads

def first_call(i):
    barrier.wait()
    # None means "loaded" (what backends() and resolve() ask): the ops must then exist
    error = _load_extension()
    try:
        for op in ("rank_sums_fwd", "rank_sums_bwd", "histogram_fwd", "graded_rank_sums_fwd"):
            getattr(torch.ops.fastrank, op)
        got[i] = "ok" if error is None else error
    except Exception as e:
        got[i] = f"{type(e).__name__}: {e}"

""" + _RUN_THREADS + r"""print(json.dumps(got))
"""


@requires("cpp")
def test_simultaneous_first_loads_see_the_ops():
    for _ in range(3):  # the window is a few microseconds wide: several fresh interpreters
        out = subprocess.run([sys.executable, "-c", SCRIPT_LOAD], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        report = json.loads(out.stdout.strip().splitlines()[-1])
        assert report == ["ok"] * len(report), report
