"""The C++ custom ops: opcheck (schema, fake kernel, autograd registration) and torch.compile."""
import pytest
import torch

import fastrank
from fastrank._problem import build_problem
from fastrank._step import StepParams
from fastrank.ops import _register_cpp_ops

from .conftest import requires

pytestmark = requires("cpp")


def _op_args(step, ignore_kind, dtype=torch.float64):
    q, n = 6, 11
    scores = torch.rand(q, n, dtype=dtype)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 3])
    ignore = {"none": None, "index": torch.arange(q), "mask": torch.rand(q, n) < 0.3}[ignore_kind]
    pb = build_problem((labels[:q], labels), ignore, q, n, scores.device)
    return (scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask) + StepParams(step=step).as_op_args()


@pytest.mark.parametrize("step", [0, 1])
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_forward(step, ignore_kind, dtype):
    _register_cpp_ops()
    args = list(_op_args(step, ignore_kind, dtype))
    args[0] = args[0].requires_grad_()
    torch.library.opcheck(torch.ops.fastrank.rank_sums_fwd.default, tuple(args))


@pytest.mark.parametrize("step", [0, 1])
def test_opcheck_backward(step):
    _register_cpp_ops()
    fwd = _op_args(step, "mask")
    p = fwd[1].shape
    args = (torch.randn(p, dtype=torch.float64), torch.randn(p, dtype=torch.float64)) + fwd
    torch.library.opcheck(torch.ops.fastrank.rank_sums_bwd.default, args)


def test_op_rejects_bad_index_with_clear_error():
    _register_cpp_ops()
    args = list(_op_args(0, "none"))
    bad = args[1].clone()
    bad[0, 0] = 999
    with pytest.raises(RuntimeError, match="pos_idx entries must lie in"):
        torch.ops.fastrank.rank_sums_fwd(args[0], bad, *args[2:])


@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap])
def test_torch_compile_forward_and_backward(fn):
    emb = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    labels = torch.arange(16) // 4

    def loss_fn(e):
        return 1 - fn(e @ e.T, (labels, labels), backend="cpp")

    compiled = torch.compile(loss_fn)  # inductor: the default users get
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    l1 = compiled(e1)
    l1.backward()
    l2 = loss_fn(e2)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(e1.grad, e2.grad)


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
    assert any("rank_sums_fwd" in str(t) for t in ops), ops
    for reason in explained.break_reasons:
        frames = [f.filename for f in reason.user_stack]
        assert not any(f.endswith(("fastrank/ops.py", "fastrank/reference.py")) for f in frames), reason.reason
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
    return (scores, rel, pb.pos_idx, pb.ignore_idx, pb.ignore_mask) + StepParams(step=step).as_op_args()


@pytest.mark.parametrize("step", [0, 1])
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_graded_forward(step, ignore_kind, dtype):
    _register_cpp_ops()
    args = list(_graded_op_args(step, ignore_kind, dtype))
    args[0] = args[0].requires_grad_()
    torch.library.opcheck(torch.ops.fastrank.graded_rank_sums_fwd.default, tuple(args))


@pytest.mark.parametrize("step", [0, 1])
def test_opcheck_graded_backward(step):
    _register_cpp_ops()
    fwd = _graded_op_args(step, "mask")
    p = fwd[2].shape
    args = (torch.randn(p, dtype=torch.float64), torch.randn(p, dtype=torch.float64)) + fwd
    torch.library.opcheck(torch.ops.fastrank.graded_rank_sums_bwd.default, args)


@pytest.mark.parametrize("fn", [fastrank.h_ap, fastrank.ndcg])
def test_torch_compile_graded(fn):
    emb = torch.nn.functional.normalize(torch.randn(16, 8, dtype=torch.float64), dim=1)
    labels = torch.stack([torch.arange(16) // 8, torch.arange(16) // 4, torch.arange(16) // 2], dim=1)
    rel = fastrank.relevance_from_hierarchy(labels, labels, dtype=torch.float64)

    def loss_fn(e):
        return 1 - fn(e @ e.T, rel, backend="cpp")

    compiled = torch.compile(loss_fn)
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    l1 = compiled(e1)
    l1.backward()
    l2 = loss_fn(e2)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(e1.grad, e2.grad)
