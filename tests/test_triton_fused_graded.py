"""The fused Triton graded loss kernels (triton_kernels/graded_loss.py): H-AP and NDCG in a fixed
number of launches without host synchronisation.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports the kernels, and
they run in Triton's interpreter on CPU tensors (numpy: float64 is exact arithmetic in the same
order as on a GPU, so fp64 results are held to the naive cube at 1e-10). With a GPU the same tests
run compiled. The cases are those of tests/test_fused_graded.py (ties in scores and relevance,
odd sizes, rows without relevant items, every ignore form).
"""

import pytest

pytest.importorskip("triton", reason="Triton is not importable: the Triton backend cannot be tested here")

import torch  # noqa: E402

import fastrank  # noqa: E402
from fastrank.core.params import StepParams  # noqa: E402
from fastrank.graded import h_ap, ndcg  # noqa: E402

from .cases import Case, assert_all_close, graded_ignore, max_err, outputs_and_grad, to_device  # noqa: E402
from .conftest import TRITON_DEVICE as DEVICE  # noqa: E402
from .conftest import TRITON_ON_GPU as ON_GPU  # noqa: E402
from .conftest import compile_ahead_of_time, requires  # noqa: E402
from .nan_rows import POISONED, nan_problem, nan_relevance  # noqa: E402
from .test_fused_graded import graded_cases  # noqa: E402
from .test_triton_fused import _CountingKernel  # noqa: E402

pytestmark = requires("triton")

gl = pytest.importorskip("fastrank.triton_kernels.graded_loss")
tk = pytest.importorskip("fastrank.triton_kernels.loss")

FNS = {"h_ap": h_ap, "ndcg": ndcg}
STEPS = ["sigmoid", "suprank"]

#: ranked items and competitors at +-inf: equal infinities tie (the C++ op's tied loops)
_INFINITE = Case("infinite", torch.tensor(
    [[0.3, float("inf"), 0.1, float("inf"), -0.2, float("-inf")],
     [float("-inf"), 0.2, 0.5, float("-inf"), 0.1, 0.0]], dtype=torch.float64),
    torch.tensor([[2.0, 1.0, 0.0, 2.0, 1.0, 1.0], [1.0, 0.0, 2.0, 3.0, 0.0, 1.0]], dtype=torch.float64), None)

#: the interpreter is slow on small CPUs: every fifth graded case (every target kind), N = 1 and the
#: infinite scores; compiled on a GPU, all of them
CASES = (graded_cases() if ON_GPU else graded_cases()[::5] + graded_cases()[6:8]) + [_INFINITE]


def _to(case, dtype=None):
    return to_device(case, DEVICE, dtype)


def _value_and_grad(fn, case, backend, reduction="none", **kw):
    kw = {"tau": 0.05, **kw}
    return outputs_and_grad(
        lambda s: fn(s, case.target, ignore=case.ignore, backend=backend, reduction=reduction, **kw), case.scores)


def _assert_fp64_close(got, ref):
    assert_all_close(got, ref, rtol=1e-10, atol=1e-12, grad_rtol=1e-10, grad_atol=1e-11)


@pytest.fixture
def small_blocks(monkeypatch):
    """Interpreter: tiny blocks (loss.py's caps, which graded_loss.py uses), so small shapes run the
    multi-tile loops (GPU: its own blocks)."""
    monkeypatch.setattr(tk, "INTERPRETER_MAX_BLOCK_P", 2)
    monkeypatch.setattr(tk, "INTERPRETER_MAX_BLOCK_K", 4)


def _graded_case(q, n, ignore_kind, dense, seed):
    """Relevance 1..3 and 1.37 with ties (dense: every item ranked; sparse: ~1 in 5), score ties,
    the last row without relevant items."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(q, n, generator=g, dtype=torch.float64) * 20).round() / 10 - 1
    rel = torch.randint(1, 4, (q, n), generator=g).double()
    if not dense:
        rel = torch.where(torch.rand(q, n, generator=g) < 0.2, rel, torch.zeros_like(rel))
    rel[:, 3] = 1.37
    rel[-1] = 0
    return Case(f"q{q}-n{n}-{ignore_kind}-{'dense' if dense else 'sparse'}", s, rel,
                graded_ignore(ignore_kind, q, n, seed))


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fused_triton_equals_naive(name, step, case):
    case = _to(case)
    fn = FNS[name]
    _assert_fp64_close(_value_and_grad(fn, case, "triton", step=step), _value_and_grad(fn, case, "naive", step=step))


@pytest.mark.parametrize("name,step,ignore_kind", [("h_ap", "sigmoid", "index"), ("h_ap", "suprank", "mask"),
                                                   ("ndcg", "sigmoid", "mask"), ("ndcg", "suprank", "none")])
def test_multi_tile_rows_and_both_split_modes(small_blocks, monkeypatch, name, step, ignore_kind):
    # BLOCK_P = 2, BLOCK_K = 4: N = 15 is four column tiles. With split = 3 a row with fewer than 3 tiles
    # of ranked items has its columns split in chunks (partial sums, the ideal place among them, reduced
    # in kernel 3), a row with more deals its tiles round-robin: sparse rows hold ~4, dense ones ~14
    monkeypatch.setattr(tk, "SPLIT", 3)
    fn = FNS[name]
    for dense in (False, True):
        case = _to(_graded_case(5, 15, ignore_kind, dense, seed=7 + dense))
        _assert_fp64_close(_value_and_grad(fn, case, "triton", step=step),
                           _value_and_grad(fn, case, "naive", step=step))


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_equals_the_two_pass_triton_path(name, reduction, monkeypatch):
    case = _to(CASES[2])
    fused = _value_and_grad(FNS[name], case, "triton", reduction, step="sigmoid")
    monkeypatch.setenv("FASTRANK_FUSED", "0")
    two_pass = _value_and_grad(FNS[name], case, "triton", reduction, step="sigmoid")
    _assert_fp64_close(fused, two_pass)


def test_the_switch_selects_the_path(monkeypatch):
    # the fused path never packs the problem on the host; FASTRANK_FUSED=0 does (build_problem)
    import fastrank.graded as graded_mod

    calls = []
    real = graded_mod.build_problem
    monkeypatch.setattr(graded_mod, "build_problem", lambda *a: calls.append(1) or real(*a))
    case = _to(CASES[1])
    ndcg(case.scores, case.target, ignore=case.ignore, backend="triton")
    assert calls == []
    monkeypatch.setenv("FASTRANK_FUSED", "0")
    ndcg(case.scores, case.target, ignore=case.ignore, backend="triton")
    assert calls == [1]


def test_no_relevant_item_anywhere_gives_zero():
    s = torch.rand(4, 6, dtype=torch.float64, device=DEVICE)
    rel = torch.zeros(4, 6, dtype=torch.float64, device=DEVICE)
    for fn in FNS.values():
        x = s.clone().requires_grad_()
        v = fn(x, rel, backend="triton", reduction="none")
        assert torch.equal(v.detach(), torch.zeros_like(v))
        v.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
        assert fn(s, rel, backend="triton").item() == 0.0


def test_bitwise_reproducible():
    case = _to(_graded_case(9, 40, "mask", False, seed=8), torch.float32)
    for fn in FNS.values():
        a = _value_and_grad(fn, case, "triton", step="sigmoid")
        b = _value_and_grad(fn, case, "triton", step="sigmoid")
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- NaN and invalid entries


@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_nan_in_nan_out(ignore_kind):
    s, _, ignore = nan_problem(ignore_kind)
    case = _to(Case("nan", s, nan_relevance(), ignore))
    for fn in FNS.values():
        x = case.scores.clone().requires_grad_()
        v = fn(x, case.target, ignore=case.ignore, backend="triton", reduction="none")
        assert torch.equal(torch.isnan(v).cpu(), POISONED)
        ref = fn(case.scores, case.target, ignore=case.ignore, backend="naive", reduction="none")
        torch.testing.assert_close(v[~POISONED], ref[~POISONED], rtol=1e-10, atol=1e-12)
        (g,) = torch.autograd.grad(v.sum(), x)
        assert torch.isfinite(g[~POISONED]).all()  # row i's gradient comes from query i alone
        assert torch.isnan(g[0]).any()  # query 0 has relevant items: its NaN reaches its gradient
        assert torch.equal(g[1], torch.zeros_like(g[1]))  # query 1 has none: its score is a constant NaN
        assert torch.isnan(fn(case.scores, case.target, ignore=case.ignore, backend="triton")).item()


def test_invalid_entries_make_their_query_nan():
    # checked inside the kernels (no host sync, so no exception), over the whole row as the C++ op
    # does: the query they belong to is NaN with a NaN gradient row, the others are unaffected
    case = _to(_graded_case(8, 9, "index", False, seed=3))
    ign = case.ignore.clone()
    ign[1] = 9
    ign[3] = -2
    rel = case.target.clone()
    rel[2, 4] = float("nan")
    rel[4, 0] = float("inf")
    rel[5, 6] = -0.5
    rel[6, 2] = 1e-310  # a positive subnormal
    bad = torch.tensor([False, True, True, True, True, True, True, False])
    for name, fn in FNS.items():
        x = case.scores.clone().requires_grad_()
        v = fn(x, rel, ignore=ign, backend="triton", reduction="none")
        assert torch.equal(torch.isnan(v).cpu(), bad), name
        good_ign = torch.where(bad.to(ign.device), -1, ign)
        good_rel = torch.where(bad.to(rel.device)[:, None], 0.0, rel)
        ref = fn(case.scores, good_rel, ignore=good_ign, backend="naive", reduction="none")
        torch.testing.assert_close(v[~bad], ref[~bad], rtol=1e-10, atol=1e-12)
        (g,) = torch.autograd.grad(v.sum(), x)
        assert torch.isnan(g[bad]).all() and torch.isfinite(g[~bad]).all()
    # NDCG's gain 2^r - 1 overflows float64 at r >= 1024: that query alone is NaN (H-AP has no limit)
    rel2 = case.target.clone()
    rel2[0, 0] = 1024.0
    v = ndcg(case.scores, rel2, backend="triton", reduction="none")
    assert torch.isnan(v).cpu().tolist() == [True] + [False] * 7
    assert torch.isfinite(h_ap(case.scores, rel2, backend="triton", reduction="none")).all()
    # the other backends still raise: the ValueError is the host-synchronising path's
    with pytest.raises(ValueError, match="relevance"):
        h_ap(case.scores, rel, backend="naive")


# --------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("step", STEPS)
def test_half_scores_straight_into_the_kernels(dtype, name, step):
    # The kernels read half scores and compute in float32; the value is float32, the gradient comes
    # back in the input dtype. Reference: fp64 on the same rounded inputs. Allowed: 2x the error of
    # naive float32 on those inputs (docs/design.md §3), plus, for the gradient, its one rounding to
    # the dtype (eps * max |gradient|).
    case = _to(_graded_case(12, 37, "mask", False, seed=40))
    s_lo = case.scores.to(dtype)
    fn = FNS[name]
    got = _value_and_grad(fn, Case("lo", s_lo, case.target, case.ignore), "triton", step=step)
    naive32 = _value_and_grad(fn, Case("n32", s_lo.float(), case.target, case.ignore), "naive", step=step)
    ref = _value_and_grad(fn, Case("ref", s_lo.double(), case.target, case.ignore), "naive", step=step)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    assert max_err(got[0], ref[0]) <= 2 * max_err(naive32[0], ref[0]) + 1e-6
    eps = torch.finfo(dtype).eps
    assert max_err(got[1], ref[1]) <= 2 * max_err(naive32[1], ref[1]) + eps * ref[1].abs().max().item() + 1e-6


# --------------------------------------------------------------------------- launches


@pytest.mark.parametrize("name", FNS)
def test_fixed_number_of_launches_whatever_the_data(small_blocks, monkeypatch, name):
    log = []
    for k in ("_compact_kernel", "_sums_kernel", "_epilogue_kernel", "_grad_kernel"):
        monkeypatch.setattr(gl, k, _CountingKernel(getattr(gl, k), log))
    monkeypatch.setattr(tk, "SPLIT", 3)
    few = _to(_graded_case(5, 12, "index", False, seed=1))  # rows of 1-3 tiles of ranked items: both modes
    many = _to(_graded_case(5, 12, "mask", True, seed=2))  # every item ranked: dealt tiles
    nan = _to(_graded_case(5, 12, "none", False, seed=3))
    nan.scores[2, 3] = float("nan")
    nan.target[4, 1] = -1.0
    counts = []
    for case in (few, many, nan):
        for grad in (True, False):
            log.clear()
            s = case.scores.clone().requires_grad_(grad)
            v = FNS[name](s, case.target, ignore=case.ignore, backend="triton")
            if grad:
                v.backward()
            counts.append((grad, len(log)))
    assert counts == [(True, 4), (False, 3)] * 3


# --------------------------------------------------------------------------- the kernel API


@pytest.mark.parametrize("over,err,msg", [
    (dict(relevance=torch.ones(4, 5)), ValueError, "relevance"),
    (dict(relevance=torch.ones(4, 6, dtype=torch.complex64)), TypeError, "relevance"),
    (dict(key=torch.ones(4, 5)), ValueError, "key"),
    (dict(key=torch.ones(4, 6, dtype=torch.complex64)), TypeError, "key"),
    (dict(key=torch.ones(4, 6).tolist()), TypeError, "key"),
    (dict(ignore_idx=torch.zeros(4, dtype=torch.int32)), TypeError, "ignore_idx"),
    (dict(ignore_mask=torch.zeros(4, 6)), TypeError, "ignore_mask"),
    (dict(scores=torch.zeros(4, 6, dtype=torch.int32)), TypeError, "scores"),
    (dict(params="suprank"), TypeError, "params"),
    (dict(kind="map"), ValueError, "kind"),
])
def test_direct_calls_are_checked(over, err, msg):
    kw = dict(scores=torch.rand(4, 6, dtype=torch.float64), relevance=torch.ones(4, 6), key=None, ignore_idx=None,
              ignore_mask=None, params=StepParams(1))
    kind = over.pop("kind", "h_ap")
    kw.update(over)
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with pytest.raises(err, match=msg):
        gl.graded_loss_rows(*kw.values(), kind=kind)


def test_direct_call_outputs():
    s = torch.rand(4, 6, dtype=torch.float64, device=DEVICE)
    rel = torch.tensor([[0, 1, 2, 0, 3, 1]] * 3 + [[0] * 6], dtype=torch.int64, device=DEVICE)
    score, n_pos, rows = gl.graded_loss_rows(s, rel, None, None, None, StepParams(1), kind="ndcg", with_grad=False)
    assert rows.shape == (0, 6) and n_pos.tolist() == [4, 4, 4, 0] and n_pos.dtype == torch.int64
    ref = fastrank.ndcg(s, rel.double(), backend="naive", reduction="none")
    torch.testing.assert_close(score, ref, rtol=1e-12, atol=1e-12)
    score2, _, rows2 = gl.graded_loss_rows(s, rel, None, None, None, StepParams(1), kind="ndcg")
    assert rows2.shape == (4, 6) and torch.equal(score, score2)


# --------------------------------------------------------------------------- GPU: no host sync, CUDA graphs


def gpu_no_sync_and_graph_replay(fn) -> None:
    """fn(scores, ignore) -> a scalar loss on backend="triton" (CUDA): its forward and backward
    raise no host sync, and a CUDA graph of both replays to the eager results, also on new scores
    written into the captured buffer."""
    g = torch.Generator(device="cuda").manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(256, 64, device="cuda", generator=g), dim=1)
    ig = torch.arange(256, device="cuda")
    fn((emb @ emb.T).requires_grad_(), ig).backward()  # warm: compiled, constants cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = (emb @ emb.T).requires_grad_()
        fn(s, ig).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert s.grad is not None
    static = (emb @ emb.T).detach().clone().requires_grad_()
    eager = fn(static, ig)
    (g_eager,) = torch.autograd.grad(eager, static)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            torch.autograd.grad(fn(static, ig), static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static, ig)
        (g_out,) = torch.autograd.grad(out, static)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(g_out, g_eager)
    emb2 = torch.nn.functional.normalize(torch.randn(256, 64, device="cuda", generator=g), dim=1)
    with torch.no_grad():
        static.copy_(emb2 @ emb2.T)
    graph.replay()
    ref = fn(static.detach().clone(), ig)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (Triton kernels compiled, not interpreted)")
@pytest.mark.parametrize("name", FNS)
def test_gpu_no_host_sync_and_cuda_graph_replay(name):
    labels = torch.arange(256, device="cuda") // 4
    rel = (labels[:, None] == labels[None, :]).float() * 2 + (labels[:, None] // 4 == labels[None, :] // 4).float()
    gpu_no_sync_and_graph_replay(lambda s, ig: FNS[name](s, rel, ignore=ig, backend="triton"))


# --------------------------------------------------------------------------- AOT compilation (no GPU needed)

_AOT_SCRIPT = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastrank.triton_kernels import graded_loss as gl, loss as tk

def sig(fn, types, consts):
    out = {}
    for name in fn.arg_names:
        if name in consts:
            out[name] = "constexpr"
        elif name.endswith("_ptr"):
            out[name] = types[name]
        else:
            out[name] = "i64" if name.startswith("stride") else "i32"
    return out

def compile_all(launches, common):
    for fn, consts in launches:
        src = ASTSource(fn=fn, signature=sig(fn, common, consts), constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert k.asm["cubin"], fn.__name__

for st, acc in (("*fp32", "*fp32"), ("*fp64", "*fp64"), ("*bf16", "*fp32"), ("*fp16", "*fp32")):
    common = {"scores_ptr": st, "rel_ptr": acc, "key_ptr": acc, "ign_idx_ptr": "*i64", "ign_mask_ptr": "*u8",
              "cols_ptr": "*i32", "meta_ptr": "*i32", "params_ptr": acc, "work_ptr": acc, "part_ptr": acc,
              "score_ptr": acc, "npos_ptr": "*i64", "grad_ptr": acc}
    launches = [(gl._compact_kernel, {"IGNORE": 3, "HAS_KEY": has_key, "BLOCK_K": tk.GPU_BLOCK_K_COMPACT})
                for has_key in (False, True)]
    # the key and the H-rank are suprank's (the H-rank H-AP's only)
    variants = [(0, False, False), (1, False, False), (1, True, False), (1, True, True), (1, False, True)]
    for step, has_key, hrank in variants:
        for ndcg in ((False, True) if not hrank else (False,)):
            for grad in (False, True):
                nb = 2 + ((2 if step == 0 or hrank else 1) if grad else 0) + ndcg
                launches.append((gl._sums_kernel, {"STEP": step, "IGNORE": 3, "GRAD": grad, "NDCG": ndcg, "FAST": False,
                                                   "HAS_KEY": has_key, "HRANK": hrank, "NB": nb,
                                                   "BLOCK_P": tk.GPU_BLOCK_P, "BLOCK_K": tk.GPU_BLOCK_K}))
                launches.append((gl._epilogue_kernel, {"STEP": step, "NDCG": ndcg, "GRAD": grad, "HRANK": hrank,
                                                       "NB": nb, "BLOCK_P": tk.GPU_BLOCK_P}))
        launches.append((gl._grad_kernel, {"STEP": step, "IGNORE": 3, "FAST": acc == "*fp32", "HAS_KEY": has_key,
                                           "HRANK": hrank, "BLOCK_P": tk.GPU_BLOCK_P, "BLOCK_K": tk.GPU_BLOCK_K}))
    compile_all(launches, common)
print("AOT-OK")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    # the interpreter never lowers the kernels: compile every variant ahead of time for an H100
    # (Triton's bundled ptxas, no GPU) in a process without TRITON_INTERPRET
    compile_ahead_of_time(_AOT_SCRIPT)
