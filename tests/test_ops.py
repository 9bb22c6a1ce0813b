"""The C++ custom ops: opcheck (schema, fake kernel, autograd registration) and torch.compile."""
import pytest
import torch

import fastrank
from fastrank.core.problem import build_problem
from fastrank.core.params import GradedParams, StepParams
from fastrank.core.registry import FAMILIES, register_cpp_ops
from fastrank.histogram import histogram_params

from .conftest import requires

pytestmark = requires("cpp")


def _op_args(step, ignore_kind, dtype=torch.float64):
    q, n = 6, 11
    scores = torch.rand(q, n, dtype=dtype)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 3])
    ignore = {"none": None, "index": torch.arange(q), "mask": torch.rand(q, n) < 0.3}[ignore_kind]
    pb = build_problem((labels[:q], labels), ignore, q, n, scores.device)
    return (scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask) + StepParams(step=step).as_op_args()


def test_op_rejects_bad_index_with_clear_error():
    register_cpp_ops()
    args = list(_op_args(0, "none"))
    bad = args[1].clone()
    bad[0, 0] = 999
    with pytest.raises(ValueError, match="pos_idx entries must lie in"):
        torch.ops.fastrank.rank_sums_fwd(args[0], bad, *args[2:])


def _assert_compiled_matches_eager(loss_fn, emb):
    compiled = torch.compile(loss_fn)  # inductor: the default users get
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    l1 = compiled(e1)
    l1.backward()
    l2 = loss_fn(e2)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(e1.grad, e2.grad)


@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap])
def test_torch_compile_forward_and_backward(fn):
    emb = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    labels = torch.arange(16) // 4

    def loss_fn(e):
        return 1 - fn(e @ e.T, (labels, labels), backend="cpp")

    _assert_compiled_matches_eager(loss_fn, emb)


def test_compiled_training_step_keeps_the_fused_op_in_the_graph():
    # Preparing the packed positives is data-dependent (the largest positive count sets a shape),
    # so Dynamo breaks the graph there; the fused op itself must trace as one node, never break.
    from fastrank.losses import SupAPLoss

    net = torch.nn.Linear(16, 8)
    loss_fn = SupAPLoss(backend="cpp")

    def step(x, labels):
        return loss_fn(net(x), labels)

    x, labels = torch.randn(32, 16), torch.arange(32) // 4
    explained = torch._dynamo.explain(step)(x, labels)
    ops = [n.target for g in explained.graphs for n in g.graph.nodes if "fastrank" in str(n.target)]
    # on cpp the loss is the fused op (ap_loss); FASTRANK_FUSED=0 would trace rank_sums_fwd instead
    assert any("ap_loss" in str(t) for t in ops), ops
    for reason in explained.break_reasons:
        frames = [f.filename for f in reason.user_stack]
        assert not any(f.endswith(("fastrank/core/registry.py", "fastrank/rank_sums/chunked.py")) for f in frames), \
            reason.reason
    compiled = torch.compile(step)
    loss = compiled(x, labels)
    loss.backward()
    ref = step(x, labels)
    torch.testing.assert_close(loss, ref)


# ---- graded relevance (issue 9): same contract plus a (Q, N) relevance after scores


def _graded_op_args(step, ignore_kind, dtype=torch.float64):
    q, n = 6, 11
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(q, n, generator=g, dtype=dtype)
    rel = torch.randint(0, 4, (q, n), generator=g).to(dtype)
    rel[2] = 0  # a query without ranked items
    ignore = {"none": None, "index": torch.arange(q), "mask": torch.rand(q, n, generator=g) < 0.3}[ignore_kind]
    pb = build_problem(rel, ignore, q, n, scores.device)
    # the ordering key (None: the relevance) after the relevance, the H-rank's scalars after the step's
    return (scores, rel, None, pb.pos_idx, pb.ignore_idx, pb.ignore_mask) + GradedParams(step=step).as_op_args()


def _histogram_op_args(kind, ignore_kind, dtype=torch.float64):
    q, n = 5, 9
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(q, n, generator=g, dtype=dtype)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1, 2])
    ignore = {"none": None, "index": torch.arange(q), "mask": torch.rand(q, n, generator=g) < 0.3}[ignore_kind]
    pb = build_problem((labels[:q], labels), ignore, q, n, scores.device)
    return (scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask) + histogram_params(kind, 6, (0.0, 1.0)).as_op_args()


# ---- opcheck of every op family of the registry (schema, fake kernel, autograd registration)

# per family: its forward arguments for a variant (step id or histogram kind) and an ignore form
_OP_ARGS = {"rank_sums": _op_args, "graded_rank_sums": _graded_op_args, "histogram": _histogram_op_args}
_VARIANTS = {"rank_sums": [0, 1], "graded_rank_sums": [0, 1], "histogram": ["fastap", "softbin"]}
_OPCHECK = [(f, v) for f in FAMILIES for v in _VARIANTS[f]]


def test_every_family_has_an_opcheck():
    assert set(_OP_ARGS) == set(_VARIANTS) == set(FAMILIES)


@pytest.mark.parametrize("family,variant", _OPCHECK)
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_forward(family, variant, ignore_kind, dtype):
    register_cpp_ops()
    args = list(_OP_ARGS[family](variant, ignore_kind, dtype))
    args[0] = args[0].requires_grad_()
    torch.library.opcheck(getattr(torch.ops.fastrank, FAMILIES[family].cpp_fwd).default, tuple(args))


@pytest.mark.parametrize("family,variant", _OPCHECK)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_backward(family, variant, dtype):
    register_cpp_ops()
    f = FAMILIES[family]
    fwd = _OP_ARGS[family](variant, "mask", dtype)
    shape = f.out_shape(fwd, f.pos_idx_at, fwd[len(f.tensors):])
    args = (torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)) + fwd
    torch.library.opcheck(getattr(torch.ops.fastrank, f.cpp_bwd).default, args)


@pytest.mark.parametrize("fn", [fastrank.h_ap, fastrank.ndcg])
def test_torch_compile_graded(fn):
    emb = torch.nn.functional.normalize(torch.randn(16, 8, dtype=torch.float64), dim=1)
    labels = torch.stack([torch.arange(16) // 8, torch.arange(16) // 4, torch.arange(16) // 2], dim=1)
    rel = fastrank.relevance_from_hierarchy(labels, labels, order="coarsest_first", dtype=torch.float64)

    def loss_fn(e):
        return 1 - fn(e @ e.T, rel, backend="cpp")

    _assert_compiled_matches_eager(loss_fn, emb)


# ---- the ops are public surface: a direct call gets the contract the Python layer guarantees


_BAD_STEP = [  # (index into the step scalars (step, tau, rho, delta, start, offset), value, message)
    (1, float("inf"), "tau must lie in"),
    (1, float("nan"), "tau must lie in"),
    (1, 1e-40, "tau must lie in"),  # float32: 1/tau overflows
    (2, float("nan"), "rho must be finite and >= 0"),
    (2, -1.0, "rho must be finite and >= 0"),
    (3, float("nan"), "delta must be finite and >= 0"),
    (4, float("inf"), "start must be finite"),
    (5, float("nan"), "offset must be finite"),
    (0, 7, "step must be 0"),
]


@pytest.mark.parametrize("graded", [False, True])
@pytest.mark.parametrize("slot,value,msg", _BAD_STEP)
def test_ops_reject_bad_step_parameters(graded, slot, value, msg):
    register_cpp_ops()
    args = list(_graded_op_args(1, "none", torch.float32) if graded else _op_args(1, "none", torch.float32))
    n_t = 6 if graded else 4
    args[n_t + slot] = value
    fwd = torch.ops.fastrank.graded_rank_sums_fwd if graded else torch.ops.fastrank.rank_sums_fwd
    bwd = torch.ops.fastrank.graded_rank_sums_bwd if graded else torch.ops.fastrank.rank_sums_bwd
    with pytest.raises(ValueError, match=msg):
        fwd(*args)
    p = args[n_t - 3].shape
    with pytest.raises(ValueError, match=msg):
        bwd(torch.ones(p), torch.ones(p), *args)


def test_float64_op_accepts_what_float64_holds():
    register_cpp_ops()
    args = list(_op_args(0, "none", torch.float64))
    args[5] = 1e-40  # tau: 1/tau = 1e40 is finite in float64
    ra, rp = torch.ops.fastrank.rank_sums_fwd(*args)
    assert torch.isfinite(ra).all() and torch.isfinite(rp).all()


def _hist_args(dtype=torch.float32):
    q, n = 4, 9
    scores = torch.rand(q, n, dtype=dtype)
    pb = build_problem(torch.rand(q, n) < 0.4, None, q, n, scores.device)
    return [scores, pb.pos_idx, None, None, 5, -4.0, 4.0, True]


@pytest.mark.parametrize("slot,value", [(5, float("nan")), (5, 0.0), (5, 1e39), (6, float("inf")), (6, -1e39),
                                        (4, 1)])
def test_histogram_ops_reject_bad_bin_map(slot, value):
    register_cpp_ops()
    args = _hist_args()
    args[slot] = value
    with pytest.raises(ValueError, match="scale must|shift must|bins must"):
        torch.ops.fastrank.histogram_fwd(*args)
    good = _hist_args()
    g = torch.ones(4, 5)
    args = [g, g] + args
    with pytest.raises(ValueError, match="scale must|shift must|bins must"):
        torch.ops.fastrank.histogram_bwd(*args)


def _contract_cases():
    """(name, args of rank_sums_fwd with a broken packed contract, message)."""
    base = list(_op_args(0, "none"))
    scores = base[0]
    q, n = scores.shape
    out = []
    dup = base[1].clone()
    dup[0, 1] = dup[0, 0]
    out.append(("duplicate", [scores, dup] + base[2:], "holds a column twice"))
    pos = base[1]
    ign_idx = torch.full((q,), -1, dtype=torch.int64)
    ign_idx[2] = pos[2, 0]
    out.append(("ignored index", [scores, pos, ign_idx, None] + base[4:], "ignore_idx leaves out"))
    mask = torch.zeros(q, n, dtype=torch.bool)
    mask[3, pos[3, 1]] = True
    out.append(("ignored mask", [scores, pos, None, mask] + base[4:], "ignore_mask leaves out"))
    return out


@pytest.mark.parametrize("case", _contract_cases(), ids=lambda c: c[0])
def test_ops_check_the_packed_contract(case):
    register_cpp_ops()
    _, args, msg = case
    with pytest.raises(ValueError, match=msg):
        torch.ops.fastrank.rank_sums_fwd(*args)
    p = args[1].shape
    with pytest.raises(ValueError, match=msg):
        torch.ops.fastrank.rank_sums_bwd(torch.ones(p, dtype=torch.float64), torch.ones(p, dtype=torch.float64), *args)
    # the histogram op takes the same packed problem
    with pytest.raises(ValueError, match=msg):
        torch.ops.fastrank.histogram_fwd(*args[:4], 5, -4.0, 4.0, True)


def test_graded_ops_check_ranked_relevance_in_both_passes():
    register_cpp_ops()
    args = list(_graded_op_args(1, "none"))
    rel, pos = args[1].clone(), args[3]
    rel[0, pos[0, 0]] = 0.0  # a ranked item of relevance 0
    args[1] = rel
    with pytest.raises(ValueError, match="ranks an item of relevance 0"):
        torch.ops.fastrank.graded_rank_sums_fwd(*args)
    g = torch.ones(pos.shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="ranks an item of relevance 0"):
        torch.ops.fastrank.graded_rank_sums_bwd(g, g, *args)
    # the backward checks the values too: a direct call need not pass what its forward checked
    args = list(_graded_op_args(1, "none"))
    bad = args[1].clone()
    bad[1, 0] = -1.0
    with pytest.raises(ValueError, match="relevance must be >= 0"):
        torch.ops.fastrank.graded_rank_sums_bwd(g, g, args[0], bad, *args[2:])
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="relevance must be finite"):
        torch.ops.fastrank.graded_rank_sums_bwd(g, g, args[0], bad, *args[2:])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int64, torch.int32])
@pytest.mark.parametrize("op", ["rank_sums", "graded", "histogram"])
def test_backward_ops_reject_non_floating_gradients(op, dtype):
    register_cpp_ops()
    if op == "rank_sums":
        args, bwd, shape = _op_args(1, "mask"), torch.ops.fastrank.rank_sums_bwd, None
        shape = args[1].shape
    elif op == "graded":
        args, bwd = _graded_op_args(1, "mask"), torch.ops.fastrank.graded_rank_sums_bwd
        shape = args[3].shape
    else:
        args, bwd = _hist_args(torch.float64), torch.ops.fastrank.histogram_bwd
        shape = (args[0].shape[0], args[4])
    bad = torch.ones(shape, dtype=dtype)
    good = torch.ones(shape, dtype=torch.float64)
    with pytest.raises(TypeError, match="must be a floating tensor"):
        bwd(bad, good, *args)
    with pytest.raises(TypeError, match="must be a floating tensor"):
        bwd(good, bad, *args)


def test_meta_tensor_mixed_with_cpu_is_refused():
    register_cpp_ops()
    args = list(_op_args(0, "none"))
    args[1] = args[1].to("meta")
    with pytest.raises(ValueError, match="every tensor argument must be on one device"):
        torch.ops.fastrank.rank_sums_fwd(*args)
    gargs = list(_graded_op_args(0, "none"))
    gargs[1] = gargs[1].to("meta")
    with pytest.raises(ValueError, match="every tensor argument must be on one device"):
        torch.ops.fastrank.graded_rank_sums_fwd(*gargs)
    hargs = _hist_args()
    hargs[0] = hargs[0].to("meta")
    with pytest.raises(ValueError, match="every tensor argument must be on one device"):
        torch.ops.fastrank.histogram_fwd(*hargs)
    # all on meta is the fake kernel's job (shape propagation), still fine
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in _op_args(0, "none")]
    ra, _ = torch.ops.fastrank.rank_sums_fwd(*meta)
    assert ra.device.type == "meta"


_OOM_CHILD = r"""
import resource, sys, torch
import fastrank
from fastrank.core.problem import build_problem
from fastrank.core.registry import register_cpp_ops
register_cpp_ops()
op = sys.argv[1]
n = 1 << 22  # 33 bytes of row scratch per column (rank-sums): 138 MB per thread
s = torch.rand(2, n)
t = torch.zeros(2, n, dtype=torch.bool)
t[:, :3] = True
pb = build_problem(t, None, 2, n, s.device)
g = torch.ones(pb.pos_idx.shape)
rel = t.float()
calls = {
    "fwd": lambda: torch.ops.fastrank.rank_sums_fwd(s, pb.pos_idx, None, None, 0, 0.01, 100., 0.05, 0.5, 1.0),
    "bwd": lambda: torch.ops.fastrank.rank_sums_bwd(g, g, s, pb.pos_idx, None, None, 1, 0.01, 100., 0.05, 0.5, 1.0),
    "graded": lambda: torch.ops.fastrank.graded_rank_sums_fwd(s, rel, None, pb.pos_idx, None, None, 1, 0.01, 100.,
                                                              0.05, 0.5, 1.0, False, 0., 0., 0.),
}
calls[op]  # everything but the kernel's scratch is allocated before the limit
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (48 << 20), vm + (48 << 20)))
try:
    calls[op]()
except torch.OutOfMemoryError as e:
    print("raised:", e)
    sys.exit(0)
print("no error")
sys.exit(3)
"""


@pytest.mark.parametrize("op", ["fwd", "bwd", "graded"])
def test_scratch_allocation_failure_raises_instead_of_aborting(op):
    # the O(N) per-thread row buffers used to be allocated inside the parallel region, where a
    # std::bad_alloc aborted the process (SIGABRT); now a Python exception naming the size
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", _OOM_CHILD, op], capture_output=True, text=True, timeout=300,
                         env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr[-2000:])
    assert "cannot allocate the per-thread row scratch" in res.stdout and "bytes" in res.stdout


# ---- torch.compile(fullgraph=True): a whole training step, every loss, no graph break


_LAB = torch.arange(24) // 4
_REL = fastrank.relevance_from_hierarchy(torch.stack([_LAB // 2, _LAB], 1), torch.stack([_LAB // 2, _LAB], 1),
                                         order="coarsest_first", dtype=torch.float64)
FULLGRAPH_LOSSES = {
    "sup_ap": lambda s: 1 - fastrank.sup_ap(s, (_LAB, _LAB)),
    "smooth_ap": lambda s: 1 - fastrank.smooth_ap(s, (_LAB, _LAB), ignore=torch.arange(24)),
    "sup_ap_dense_mask": lambda s: 1 - fastrank.sup_ap(s, _LAB[:, None] == _LAB[None, :],
                                                       ignore=torch.eye(24, dtype=torch.bool)),
    "recall_suprank": lambda s: 1 - fastrank.recall_at_k(s, (_LAB, _LAB), ks=(1, 4)),
    "recall_patel": lambda s: 1 - fastrank.recall_at_k(s, (_LAB, _LAB), ks=(1, 4), variant="patel"),
    "h_ap": lambda s: 1 - fastrank.h_ap(s, _REL),
    "ndcg": lambda s: 1 - fastrank.ndcg(s, _REL),
    "fastap": lambda s: 1 - fastrank.histogram_ap(s, (_LAB, _LAB)),
    "softbin": lambda s: 1 - fastrank.histogram_ap(s, (_LAB, _LAB), kind="softbin"),
}


@pytest.mark.parametrize("loss", FULLGRAPH_LOSSES)
def test_training_step_compiles_fullgraph(loss):
    # fullgraph=True raises at the first graph break: the whole step (embeddings -> scores ->
    # loss -> backward) is one graph, fastrank's validation included
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Linear(12, 8).double()
    x = torch.randn(24, 12, dtype=torch.float64)
    fn = FULLGRAPH_LOSSES[loss]

    def step(x):
        e = torch.nn.functional.normalize(net(x), dim=1)
        return fn(e @ e.T)

    def value_and_grads(f):
        net.zero_grad()
        value = f(x)
        value.backward()
        return value.detach(), [p.grad.clone() for p in net.parameters()]

    got = value_and_grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    ref = value_and_grads(step)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
