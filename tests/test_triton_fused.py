"""The fused Triton loss kernels (triton_kernels/loss.py): AP (Smooth-AP, SupAP) and Recall@k
(SupRank, Patel et al.) in a fixed number of launches without host synchronisation.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports the kernels,
and they run in Triton's interpreter on CPU tensors (numpy: float64 is exact arithmetic in the
same order as on a GPU, so fp64 results are held to the naive cube at 1e-10). With a GPU the
same tests run compiled. The GPU-only checks (no host sync, CUDA-graph capture) are in
tests/test_gpu.py.
"""
import functools
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is not importable: the Triton backend cannot be tested here")

import torch  # noqa: E402

import fastrank  # noqa: E402
from fastrank.core.params import StepParams  # noqa: E402

from .cases import all_cases, assert_all_close, assert_zero_without_positives, make_case, max_err  # noqa: E402
from .cases import outputs_and_grad, to_device  # noqa: E402
from .conftest import TRITON_DEVICE as DEVICE  # noqa: E402
from .conftest import TRITON_ON_GPU as ON_GPU  # noqa: E402
from .conftest import compile_ahead_of_time, requires  # noqa: E402
from .nan_rows import POISONED, nan_problem  # noqa: E402

pytestmark = requires("triton")

tk = pytest.importorskip("fastrank.triton_kernels.loss")

FNS = {
    "smooth_ap": fastrank.smooth_ap,
    "sup_ap": fastrank.sup_ap,
    # ks past the gallery (min(|P|, k)), a temp that makes the sigmoid around k steep
    "recall_suprank": functools.partial(fastrank.recall_at_k, ks=(1, 3, 40), temp=0.5),
    "recall_patel": functools.partial(fastrank.recall_at_k, ks=(1, 2, 8), variant="patel"),
    "recall_patel_suprank_step": functools.partial(fastrank.recall_at_k, ks=(2, 5), variant="patel", step="suprank"),
}

#: the interpreter is slow on small CPUs: every other shared case (all shapes, every target and
#: ignore form, ties); compiled on a GPU, all of them
CASES = all_cases() if ON_GPU else all_cases()[::2]


def _to(case, dtype=None):
    return to_device(case, DEVICE, dtype)


def _value_and_grad(fn, case, backend, reduction="none", **kw):
    return outputs_and_grad(
        lambda s: fn(s, case.target, ignore=case.ignore, backend=backend, reduction=reduction, **kw), case.scores)


def _assert_fp64_close(got, ref):
    assert_all_close(got, ref, rtol=1e-10, atol=1e-12, grad_rtol=1e-10, grad_atol=1e-11)


@pytest.fixture
def small_blocks(monkeypatch):
    """Interpreter: tiny blocks, so small shapes run the multi-tile loops (GPU: its own blocks)."""
    monkeypatch.setattr(tk, "INTERPRETER_MAX_BLOCK_P", 2)
    monkeypatch.setattr(tk, "INTERPRETER_MAX_BLOCK_K", 4)


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fused_triton_equals_naive(name, case):
    case = _to(case)
    _assert_fp64_close(_value_and_grad(FNS[name], case, "triton"), _value_and_grad(FNS[name], case, "naive"))


@pytest.mark.parametrize("split", [3])
@pytest.mark.parametrize("name", ["smooth_ap", "sup_ap", "recall_patel"])
@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_multi_tile_rows_and_both_split_modes(small_blocks, monkeypatch, split, name, ignore_kind):
    # BLOCK_P = 2, BLOCK_K = 4: N = 23 is six column tiles. With split = 3 a row with fewer than 3 tiles
    # of positives has its columns split in chunks (partial sums reduced in kernel 3), a row with more
    # deals its tiles round-robin: 2 classes give rows of ~11 positives, 7 classes rows of 1-5
    monkeypatch.setattr(tk, "SPLIT", split)
    for classes in (2, 7):
        case = _to(make_case(5, 23, classes, "labels", ignore_kind, ties=True, seed=30 + classes))
        _assert_fp64_close(_value_and_grad(FNS[name], case, "triton"), _value_and_grad(FNS[name], case, "naive"))


def test_splits_from_the_shape():
    # the split depends on Q and N only: small Q against a long memory splits, a big batch does not
    assert tk.splits(8192, 8192, 64) == 1
    assert tk.splits(256, 65536, 64) > 1
    assert tk.splits(256, 65536, 64) * 256 <= 2 * tk.TARGET_PROGRAMS
    assert tk.splits(1, 100, 64) == 1  # never chunks narrower than MIN_CHUNK


@pytest.mark.parametrize("name", ["sup_ap", "recall_suprank"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_equals_the_two_pass_triton_path(name, reduction, monkeypatch):
    case = _to(CASES[5])
    fused = _value_and_grad(FNS[name], case, "triton", reduction)
    monkeypatch.setenv("FASTRANK_FUSED", "0")
    two_pass = _value_and_grad(FNS[name], case, "triton", reduction)
    _assert_fp64_close(fused, two_pass)


@pytest.mark.parametrize("module,fn", [("ap", fastrank.sup_ap), ("recall", fastrank.recall_at_k)])
def test_the_switch_selects_the_path(module, fn, monkeypatch):
    # the fused path never packs the problem on the host; FASTRANK_FUSED=0 does (build_problem)
    import importlib

    mod = importlib.import_module(f"fastrank.{module}")
    calls = []
    real = mod.build_problem
    monkeypatch.setattr(mod, "build_problem", lambda *a: calls.append(1) or real(*a))
    case = _to(CASES[3])
    fn(case.scores, case.target, ignore=case.ignore, backend="triton")
    assert calls == []
    monkeypatch.setenv("FASTRANK_FUSED", "0")
    fn(case.scores, case.target, ignore=case.ignore, backend="triton")
    assert calls == [1]


def test_gradcheck():
    # a small problem: gradcheck runs the forward twice per score
    case = _to(make_case(3, 5, 2, "labels", "mask", seed=13))
    for name in ("smooth_ap", "recall_suprank"):
        kw = {"tau": 0.5, **({"temp": 2.0} if name.startswith("recall") else {})}
        s = case.scores.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x: FNS[name](x, case.target, ignore=case.ignore, backend="triton", reduction="none", **kw), (s,),
            eps=1e-6, atol=1e-7)


def test_no_positive_anywhere_gives_zero():
    s = torch.rand(4, 6, dtype=torch.float64, device=DEVICE)
    target = (torch.arange(4, device=DEVICE) + 10, torch.arange(6, device=DEVICE))
    for fn in FNS.values():
        assert_zero_without_positives(lambda x, t: fn(x, t, backend="triton"), s, target)


def test_second_derivative_is_refused():
    case = _to(CASES[6])
    s = case.scores.clone().requires_grad_()
    v = fastrank.sup_ap(s, case.target, ignore=case.ignore, backend="triton")
    (g,) = torch.autograd.grad(v, s, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        g.sum().backward()


def test_bitwise_reproducible():
    case = _to(make_case(9, 40, 3, "labels", "self", seed=8, dtype=torch.float32))
    a = _value_and_grad(fastrank.smooth_ap, case, "triton")
    b = _value_and_grad(fastrank.smooth_ap, case, "triton")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- NaN and invalid entries


@pytest.mark.parametrize("ignore_kind", ["none", "index", "mask"])
def test_nan_in_nan_out(ignore_kind):
    s, target, ignore = nan_problem(ignore_kind)
    case = _to(type(CASES[0])("nan", s, target, ignore))
    for fn in FNS.values():
        x = case.scores.clone().requires_grad_()
        v = fn(x, case.target, ignore=case.ignore, backend="triton", reduction="none")
        assert torch.equal(torch.isnan(v).cpu(), POISONED)
        ref = fn(case.scores, case.target, ignore=case.ignore, backend="naive", reduction="none")
        torch.testing.assert_close(v[~POISONED], ref[~POISONED], rtol=1e-10, atol=1e-12)
        (g,) = torch.autograd.grad(v.sum(), x)
        assert torch.isfinite(g[~POISONED]).all()  # row i's gradient comes from query i alone
        assert torch.isnan(g[0]).any()  # query 0 has positives: its NaN reaches its gradient
        assert torch.equal(g[1], torch.zeros_like(g[1]))  # query 1 has none: its score is a constant NaN
        assert torch.isnan(fn(case.scores, case.target, ignore=case.ignore, backend="triton")).item()


def test_invalid_entries_make_their_query_nan():
    # an ignore index outside [-1, N) and a NaN relevance are checked inside the kernels (no host
    # sync, so no exception): the query they belong to is NaN, the others are unaffected
    case = _to(make_case(5, 9, 2, "float", "index", seed=3))
    ign = case.ignore.clone()
    ign[1] = 9
    ign[3] = -2
    rel = case.target.clone()
    rel[2, 4] = float("nan")
    bad = torch.tensor([False, True, True, True, False])
    for fn in FNS.values():
        x = case.scores.clone().requires_grad_()
        v = fn(x, rel, ignore=ign, backend="triton", reduction="none")
        assert torch.equal(torch.isnan(v).cpu(), bad)
        good_ign = torch.where(bad.to(ign.device), -1, ign)
        ref = fn(case.scores, torch.nan_to_num(rel), ignore=good_ign, backend="naive", reduction="none")
        torch.testing.assert_close(v[~bad], ref[~bad], rtol=1e-10, atol=1e-12)
        (g,) = torch.autograd.grad(v.sum(), x)
        assert torch.isnan(g[bad]).all() and torch.isfinite(g[~bad]).all()
    # the other backends still raise: the ValueError is the host-synchronising path's
    with pytest.raises(ValueError, match="ignore"):
        fastrank.sup_ap(case.scores, rel.nan_to_num(), ignore=ign, backend="naive")


# --------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["smooth_ap", "sup_ap", "recall_suprank"])
def test_half_scores_straight_into_the_kernels(dtype, name):
    # The kernels read half scores and compute in float32; the value is float32, the gradient comes
    # back in the input dtype. Reference: fp64 on the same rounded inputs. Allowed: 2x the error of
    # naive float32 on those inputs (docs/design.md §3), plus, for the gradient, its one rounding to
    # the dtype (eps * max |gradient|).
    case = _to(make_case(12, 37, 3, "labels", "self", seed=40))
    s_lo = case.scores.to(dtype)
    fn = FNS[name]
    got = _value_and_grad(fn, type(case)("lo", s_lo, case.target, case.ignore), "triton")
    naive32 = _value_and_grad(fn, type(case)("n32", s_lo.float(), case.target, case.ignore), "naive")
    ref = _value_and_grad(fn, type(case)("ref", s_lo.double(), case.target, case.ignore), "naive")
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    assert max_err(got[0], ref[0]) <= 2 * max_err(naive32[0], ref[0]) + 1e-6
    eps = torch.finfo(dtype).eps
    assert max_err(got[1], ref[1]) <= 2 * max_err(naive32[1], ref[1]) + eps * ref[1].abs().max().item() + 1e-6


# --------------------------------------------------------------------------- launches


class _CountingKernel:
    """Wraps a @triton.jit kernel: counts its launches (kernel[grid](...))."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else repr(self.kernel))
        return self.kernel[grid]


@pytest.mark.parametrize("name", ["smooth_ap", "sup_ap", "recall_patel"])
def test_fixed_number_of_launches_whatever_the_data(monkeypatch, name):
    log = []
    for k in ("_compact_kernel", "_sums_kernel", "_epilogue_kernel", "_grad_kernel"):
        monkeypatch.setattr(tk, k, _CountingKernel(getattr(tk, k), log))
    monkeypatch.setattr(tk, "SPLIT", 2)
    few = _to(make_case(6, 20, 8, "labels", "index", seed=1))  # rows of 0-5 positives: chunked columns
    many = _to(make_case(6, 20, 1, "bool", "mask", seed=2))  # every item positive: dealt tiles
    nan = _to(make_case(6, 20, 2, "float", "none", seed=3))
    nan.scores[2, 3] = float("nan")
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


def _direct(**over):
    s = torch.rand(4, 6, dtype=torch.float64, device=DEVICE)
    kw = dict(scores=s, query_labels=torch.arange(4, device=DEVICE), gallery_labels=torch.arange(6, device=DEVICE) % 3,
              relevance=None, ignore_idx=None, ignore_mask=None, params=StepParams(1))
    kw.update(over)
    return tk.loss_rows(*kw.values())


@pytest.mark.parametrize("over,err,msg", [
    (dict(relevance=torch.ones(4, 6)), ValueError, "either query_labels and gallery_labels, or relevance"),
    (dict(gallery_labels=None), ValueError, "either query_labels"),
    (dict(query_labels=torch.arange(5)), ValueError, "query_labels"),
    (dict(gallery_labels=torch.rand(6)), TypeError, "gallery_labels"),
    (dict(query_labels=None, gallery_labels=None, relevance=torch.ones(4, 5)), ValueError, "relevance"),
    (dict(ignore_idx=torch.zeros(4, dtype=torch.int32)), TypeError, "ignore_idx"),
    (dict(ignore_mask=torch.zeros(4, 6)), TypeError, "ignore_mask"),
    (dict(scores=torch.zeros(4, 6, dtype=torch.int32)), TypeError, "scores"),
    (dict(params="suprank"), TypeError, "params"),
])
def test_direct_calls_are_checked(over, err, msg):
    over = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in over.items()}
    with pytest.raises(err, match=msg):
        _direct(**over)


def test_direct_call_outputs():
    s = torch.rand(4, 6, dtype=torch.float64, device=DEVICE)
    lab = (torch.tensor([0, 1, 2, 9], device=DEVICE), torch.arange(6, device=DEVICE) % 3)
    score, n_pos, rows = tk.loss_rows(s, *lab, None, None, None, StepParams(1), with_grad=False)
    assert rows.shape == (0, 6) and n_pos.tolist() == [2, 2, 2, 0] and n_pos.dtype == torch.int64
    ref = fastrank.sup_ap(s, lab, backend="naive", reduction="none")
    torch.testing.assert_close(score, ref, rtol=1e-12, atol=1e-12)
    score2, _, rows2 = tk.loss_rows(s, *lab, None, None, None, StepParams(1))
    assert rows2.shape == (4, 6) and torch.equal(score, score2)


# --------------------------------------------------------------------------- AOT compilation (no GPU needed)

_AOT_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastrank.triton_kernels import loss as tk

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

    for st, acc in (("*fp32", "*fp32"), ("*fp64", "*fp64"), ("*bf16", "*fp32"), ("*fp16", "*fp32")):
        for target, lab, rel in ((0, "*i64", "*fp32"), (1, "*i64", "*u8"), (1, "*i32", "*fp64")):
            common = {"scores_ptr": st, "qlab_ptr": lab, "glab_ptr": lab, "rel_ptr": rel, "ign_idx_ptr": "*i64",
                      "ign_mask_ptr": "*u8", "cols_ptr": "*i32", "meta_ptr": "*i32", "params_ptr": acc,
                      "work_ptr": acc, "part_ptr": acc, "ks_ptr": acc, "score_ptr": acc, "npos_ptr": "*i64",
                      "grad_ptr": acc, "rsum_ptr": acc}
            launches = [(tk._compact_kernel, {"TARGET": target, "IGNORE": 3, "REL_FLOAT": rel.startswith("*fp"),
                                              "BLOCK_K": tk.GPU_BLOCK_K_COMPACT})]
            for step in (0, 1):
                for grad in (False, True):
                    nb = 2 + ((2 if step == 0 else 1) if grad else 0)
                    for epi in (0, 1):
                        launches.append((tk._sums_kernel, {"STEP": step, "TARGET": target, "IGNORE": 3, "GRAD": grad,
                                                           "FAST": False, "EPI": epi, "NB": nb,
                                                           "BLOCK_P": tk.GPU_BLOCK_P, "BLOCK_K": tk.GPU_BLOCK_K}))
                        launches.append((tk._epilogue_kernel, {"STEP": step, "EPI": epi, "CLAMP_HITS": epi == 1,
                                                               "GRAD": grad, "NB": nb, "BLOCK_P": tk.GPU_BLOCK_P,
                                                               "BLOCK_NK": 8}))
                for has_b in ((False, True) if step == 0 else (False,)):
                    launches.append((tk._grad_kernel, {"STEP": step, "TARGET": target, "IGNORE": 3,
                                                       "FAST": acc == "*fp32", "HAS_B": has_b,
                                                       "BLOCK_P": tk.GPU_BLOCK_P, "BLOCK_K": tk.GPU_BLOCK_K}))
            for fn, consts in launches:
                src = ASTSource(fn=fn, signature=sig(fn, common, consts), constexprs=consts)
                k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
                assert k.asm["cubin"], fn.__name__
    print("AOT-OK")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    # the interpreter never lowers the kernels: compile every variant ahead of time for an H100
    # (Triton's bundled ptxas, no GPU) in a process without TRITON_INTERPRET
    compile_ahead_of_time(_AOT_SCRIPT)


# --------------------------------------------------------------------------- scratch memory

#: (Q, N) planes of scratch beyond the outputs, in units of float32 scores: the int32 columns
#: plus the per-positive planes of `work_planes` (module docstring of triton_kernels/loss.py)
SCRATCH_PLANES = {("ap", 1, True): 2, ("ap", 0, True): 3, ("recall", 1, True): 2, ("recall", 0, True): 2,
                  ("ap", 1, False): 1, ("ap", 0, False): 1, ("recall", 1, False): 2}


@pytest.mark.parametrize("kind,step,with_grad", list(SCRATCH_PLANES))
def test_scratch_memory_bound(kind, step, with_grad):
    """What the fused kernels allocate besides their outputs stays within the documented planes
    (SupAP with its gradient: 2x float32 scores, where keeping rank_pos and S1 cost 4x), so the
    batch that fits grows; counted over every tensor the call creates."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.startswith(("empty", "zeros", "new_empty", "new_zeros", "full", "_to_copy", "clone")):
                self.bytes += out.numel() * out.element_size()
            return out

    q, n = 48, 96
    case = make_case(q, n, 6, "labels", "self", seed=3, dtype=torch.float32)
    c = to_device(case, DEVICE)
    s, t, ig = c.scores, c.target, c.ignore
    params = StepParams(step=step)
    opts = dict(kind="ap") if kind == "ap" else dict(kind="recall", ks=(1, 2, 4), inv_temp=1.0)
    with _Allocations() as rec:
        score, n_pos, rows = tk.loss_rows(s, t[0], t[1], None, ig, None, params, with_grad=with_grad, **opts)
    outputs = sum(x.numel() * x.element_size() for x in (score, n_pos, rows))
    scratch = rec.bytes - outputs
    size = s.numel() * s.element_size()
    assert scratch <= SCRATCH_PLANES[(kind, step, with_grad)] * size + 4096, (scratch, size)
    assert scratch >= size  # the int32 columns alone: the count sees the kernels' allocations
    assert torch.isfinite(score).all()
