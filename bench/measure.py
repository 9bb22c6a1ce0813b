"""One benchmark point, the ops it can run, and the CPU ceiling it is compared with.

`run_point` measures one (op, backend, workload, x, mode) point on the CPU or on a
CUDA device. On the CPU it is meant to run in a fresh process
(``python bench/run.py --point``): peak RSS is a per-process quantity, and a fresh
process also keeps one point's allocator state, thread pools and caches from leaking
into the next. On a GPU the driver runs points in its own process (peak memory comes
from the caching allocator's counters, which can be reset) and empties the cache
between them.

Modes (what is timed, and what the peak memory covers):

    forward   ``loss = 1 - op(scores, ...)`` with ``scores.requires_grad``, no backward
    backward  ``loss.backward()`` alone; the forward runs before each rep, outside the
              timed region, and the memory baseline is taken after it
    full      forward + backward (what a training step pays)
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from . import workloads as W
from .memory import PeakMemory

MODES = ("forward", "backward", "full")
STATUSES = ("ok", "oom", "timeout", "error", "unsupported", "skipped")


# ----------------------------------------------------------------------------- ops


def _sup_ap(scores, w: W.Workload, backend: str):
    import fastrank

    return fastrank.sup_ap(scores, w.target, backend=backend)


def _smooth_ap(scores, w: W.Workload, backend: str):
    import fastrank

    return fastrank.smooth_ap(scores, w.target, backend=backend)


def _recall_at_k(scores, w: W.Workload, backend: str):
    import fastrank

    return fastrank.recall_at_k(scores, w.target, backend=backend)  # variant="suprank", ks=(1, 2, 4, 8, 16)


def _fastap(scores, w: W.Workload, backend: str):
    import fastrank

    # FastAP leaves the query out of its own gallery (None for xbm: the queries are not in the memory)
    return fastrank.histogram_ap(scores, w.target, kind="fastap", ignore=w.self_index, backend=backend)


def _softbin(scores, w: W.Workload, backend: str):
    import fastrank

    return fastrank.histogram_ap(scores, w.target, kind="softbin", backend=backend)


def _graded_relevance(scores, w: W.Workload):
    import fastrank

    # built inside the timed call, as a training step builds it from the batch's labels
    return fastrank.relevance_from_hierarchy(*w.hierarchy, order="coarsest_first", dtype=scores.dtype)


def _h_ap(scores, w: W.Workload, backend: str):
    import fastrank

    return fastrank.h_ap(scores, _graded_relevance(scores, w), backend=backend)


def _ndcg(scores, w: W.Workload, backend: str):
    import fastrank

    return fastrank.ndcg(scores, _graded_relevance(scores, w), backend=backend)


@dataclass(frozen=True)
class Op:
    """A loss as the benchmark calls it: ``1 - call(scores, workload, backend)``.

    family "rank": work = pair evaluations, sum_i |P_i| * N per pass (`label_pairs`);
    each costs one sigma (or SupRank step) evaluation, so the sigma ceiling applies.
    family "hist": work = scored items, Q * N per pass (`label_items`); each item is
    binned with a triangular kernel (no transcendental), so no sigma ceiling applies.
    """

    name: str
    family: str  # "rank" | "hist"
    call: Callable
    bins: int = 0  # histogram bin centres L (sizes the naive (Q, N, L) tensor)
    ignores_self: bool = False  # passes ignore = the query's own column
    graded: bool = False  # ranks a two-level hierarchy (workloads.hierarchy): sizes table "graded"
    text: str = ""

    @property
    def sizes_key(self) -> str:
        """Which entry of a sweep's size table the op takes (graded ops do ~4x the pairs)."""
        return "graded" if self.graded else self.family


# keyed by the public function each op calls; histogram_ap's two kinds as "histogram_ap:<kind>"
OP_DEFS: Dict[str, Op] = {
    "sup_ap": Op("sup_ap", "rank", _sup_ap, text="fastrank.sup_ap (ROADMAP defaults)"),
    "smooth_ap": Op("smooth_ap", "rank", _smooth_ap, text="fastrank.smooth_ap (tau = 0.01)"),
    "recall_at_k": Op("recall_at_k", "rank", _recall_at_k,
                      text="fastrank.recall_at_k (suprank, ks = 1, 2, 4, 8, 16)"),
    "histogram_ap:fastap": Op("histogram_ap:fastap", "hist", _fastap, bins=11, ignores_self=True,
                              text="fastrank.histogram_ap(kind='fastap', 10 bins, ignore = the query itself)"),
    "histogram_ap:softbin": Op("histogram_ap:softbin", "hist", _softbin, bins=25,
                               text="fastrank.histogram_ap(kind='softbin', 25 bins)"),
    "h_ap": Op("h_ap", "rank", _h_ap, graded=True,
               text="fastrank.h_ap (suprank) on relevance_from_hierarchy((class // 4, class)): 2/1/0"),
    "ndcg": Op("ndcg", "rank", _ndcg, graded=True,
               text="fastrank.ndcg (suprank) on the same two-level relevance"),
}
OPS = tuple(OP_DEFS)
UNIT = {"rank": "pair", "hist": "item"}


def unit_of(op: str) -> str:
    return UNIT[OP_DEFS[op].family]


def work(op: str, workload: str, x: int) -> int:
    """Work of one pass: pairs (rank ops) or scored items (histogram ops); from labels only."""
    qlab, glab, in_gallery = W.labels(workload, x)
    d = OP_DEFS[op]
    if d.graded:
        return W.graded_pairs(qlab, glab)
    if d.family == "rank":
        return W.label_pairs(qlab, glab)
    return W.label_items(qlab, glab, ignore_self=d.ignores_self and in_gallery)


def passes(mode: str) -> int:
    """Evaluations of each pair (item) in a mode: the backward visits every pair again."""
    return 2 if mode == "full" else 1


# ----------------------------------------------------------------------------- points


@dataclass
class PointSpec:
    """What to measure: ``1 - op(scores, target, backend=backend)`` on a workload point, in a mode."""

    op: str
    backend: str
    x: int  # the workload's size: B for batch and dense, the memory size N for xbm
    workload: str = "batch"
    mode: str = "full"
    device: str = "cpu"  # "cpu" or "cuda"
    min_time_s: float = 2.0  # timing keeps repeating until this much time is spent ...
    min_reps: int = 3  # ... with at least this many reps ...
    max_reps: int = 50  # ... and at most this many
    slow_budget_s: float = 60.0  # a slow point gets min_reps only if they fit in this, else 1 rep
    warmup_s: float = 0.0  # extra warm-up after the first call (GPU: clocks, caches); 0 = one call


@dataclass
class PointResult:
    """What a point reports back (times in ms, memory in bytes)."""

    spec: PointSpec
    status: str = "ok"  # one of STATUSES
    note: str = ""
    p20_ms: float = math.nan
    p50_ms: float = math.nan
    p80_ms: float = math.nan
    reps: int = 0
    peak_extra_bytes: float = math.nan
    memory_exact: bool = True
    pairs: int = 0  # work of one pass: pairs (rank ops) or items (histogram ops), see `unit`
    unit: str = "pair"
    q: int = 0
    n: int = 0
    threads: int = 0
    others_cores: float = math.nan  # CPU load of other processes while the point ran (set by the driver)
    wall_s: float = math.nan  # wall time of the whole point, start-up included (set by the driver)
    times_ms: List[float] = field(default_factory=list)

    def to_json(self) -> Dict:
        d = asdict(self)
        # NaN is not JSON; None round-trips and from_json turns it back into NaN
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

    @classmethod
    def from_json(cls, d: Dict) -> "PointResult":
        d = dict(d)
        spec = PointSpec(**d.pop("spec"))
        for k in ("p20_ms", "p50_ms", "p80_ms", "peak_extra_bytes", "others_cores", "wall_s"):
            if d.get(k) is None:
                d[k] = math.nan
        return cls(spec=spec, **d)


def blank_result(spec: PointSpec, status: str, note: str) -> PointResult:
    """A point that was not (fully) measured, with its work and shape still filled in."""
    q, n = W.shape(spec.workload, spec.x)
    return PointResult(spec=spec, status=status, note=note, pairs=work(spec.op, spec.workload, spec.x),
                       unit=unit_of(spec.op), q=q, n=n)


def quantile(xs: List[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without needing numpy here."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def choose_reps(one_run_s: float, spec: PointSpec) -> int:
    """How many timed reps: ~min_time_s worth (min_reps..max_reps); slow points fewer.

    A point slower than min_time_s gets min_reps reps when they fit in slow_budget_s,
    otherwise a single rep, so that one slow reference point cannot eat the run's budget.
    """
    if one_run_s <= 0:
        return spec.max_reps
    if one_run_s <= spec.min_time_s:
        return int(min(spec.max_reps, max(spec.min_reps, math.ceil(spec.min_time_s / one_run_s))))
    return spec.min_reps if one_run_s * spec.min_reps <= spec.slow_budget_s else 1


# torch.cuda.OutOfMemoryError (an alias of torch.OutOfMemoryError from torch 2.5 on)
_TORCH_OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def classify_exception(exc: BaseException) -> str:
    """The status a failed point gets: oom, unsupported or error."""
    if isinstance(exc, (MemoryError, _TORCH_OOM)):
        return "oom"
    if isinstance(exc, NotImplementedError):  # e.g. a backend without histogram kernels
        return "unsupported"
    msg = str(exc).lower()
    if "can't allocate memory" in msg or "out of memory" in msg or "not enough memory" in msg:
        return "oom"
    return "error"


class CudaPeakMemory:
    """``extra`` = peak of the caching allocator's allocated bytes inside the block minus the
    bytes allocated on entry (the inputs, the saved graph in backward mode): what the code
    needed on top of what it was given. Reserved-but-unallocated cache is not counted."""

    exact = True

    def __init__(self, device) -> None:
        self.device = device
        self.baseline = self.peak = self.extra = 0

    def __enter__(self) -> "CudaPeakMemory":
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)
        self.extra = max(0, self.peak - self.baseline)


# L2 flush between GPU reps (as triton.testing.do_bench does): larger than the 50-60 MB L2
# of an H100/H200, so that no rep starts with the previous rep's inputs in cache
_L2_FLUSH_BYTES = 256 * 2**20


def _time_reps(reps: int, setup: Callable[[], None], timed: Callable[[], None], device) -> List[float]:
    """Seconds of `timed` per rep; `setup` runs before each rep, outside the timed region.

    CPU: perf_counter around the call (the ops are synchronous). CUDA: one pair of CUDA
    events per rep around the work the call enqueues, read after a single synchronize,
    with the L2 flushed (untimed) before each rep.
    """
    if device.type != "cuda":
        out = []
        for _ in range(reps):
            setup()
            t0 = time.perf_counter()
            timed()
            out.append(time.perf_counter() - t0)
        return out
    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        setup()
        flush.zero_()
        starts[i].record()
        timed()
        ends[i].record()
    torch.cuda.synchronize(device)
    del flush
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_point(spec: PointSpec) -> PointResult:
    """Builds the inputs, warms up, measures the peak extra memory of one timed call, then times reps.

    Every failure becomes a status (oom, unsupported, error) in the result, never an exception.
    """
    res = blank_result(spec, "ok", "")
    res.threads = torch.get_num_threads()
    if spec.op not in OP_DEFS:
        raise ValueError(f"unknown op {spec.op!r}; choose from {', '.join(OPS)}")
    if spec.mode not in MODES:
        raise ValueError(f"unknown mode {spec.mode!r}; choose from {', '.join(MODES)}")
    device = torch.device(spec.device)
    op = OP_DEFS[spec.op]
    try:
        w = W.build(spec.workload, spec.x, device=device)
        x = w.scores.requires_grad_(True)

        def forward():
            return 1 - op.call(x, w, spec.backend)

        def full() -> None:
            forward().backward()

        held: List[Optional[torch.Tensor]] = [None]  # the forward's output, between setup and timed call

        def clear() -> None:
            x.grad = None  # freeing the previous gradient is not part of the measured call
            held[0] = None  # nor is freeing the previous forward's graph

        if spec.mode == "forward":
            setup, timed = clear, lambda: held.__setitem__(0, forward())
        elif spec.mode == "backward":
            def setup() -> None:
                clear()
                held[0] = forward()

            timed = lambda: held[0].backward()  # noqa: E731
        else:
            setup, timed = clear, full

        # warm-up: first-call costs (op registration, thread pools, Triton/JIT compilation,
        # lazy allocations) count neither in the memory baseline nor in the times
        full()
        clear()
        _sync(device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        setup()
        mem = CudaPeakMemory(device) if device.type == "cuda" else PeakMemory()
        with mem:
            t0 = time.perf_counter()
            timed()
            _sync(device)
            one_run_s = time.perf_counter() - t0
        clear()
        res.peak_extra_bytes = float(mem.extra)
        res.memory_exact = mem.exact
        if not mem.exact:
            res.note = "VmHWM could not be reset (/proc/self/clear_refs): peak may include the warm-up"
        if spec.warmup_s > 0 and one_run_s < spec.warmup_s:
            _time_reps(min(100, math.ceil(spec.warmup_s / max(one_run_s, 1e-6))), setup, timed, device)
        times = _time_reps(choose_reps(one_run_s, spec), setup, timed, device)
        clear()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded status
        res.status = classify_exception(exc)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        res.note = f"{type(exc).__name__}: {first}"
        return res
    res.times_ms = [t * 1e3 for t in times]
    res.reps = len(times)
    res.p20_ms, res.p50_ms, res.p80_ms = (quantile(res.times_ms, q) for q in (0.2, 0.5, 0.8))
    return res


# ----------------------------------------------------------------------------- CPU ceiling


@dataclass
class Ceiling:
    """`torch.sigmoid` throughput on an in-cache buffer (docs/design.md §4's CPU ceiling)."""

    numel: int
    per_call_rate: float  # elements/s of one call (median call time)
    threads: int  # threads a fused kernel uses (torch.get_num_threads())
    call_threads: int  # threads one call of `numel` elements actually uses
    rate: float  # the ceiling: per_call_rate * threads / call_threads

    def describe(self) -> str:
        return (
            f"sigmoid ceiling {self.rate / 1e9:.2f} G/s = {self.per_call_rate / 1e9:.2f} G/s per call "
            f"on {self.numel} float32 (in cache, {self.call_threads} thread) x {self.threads} threads"
        )


def _median_call_rate(numel: int, calls: int) -> float:
    x = torch.randn(numel)
    out = torch.empty_like(x)
    for _ in range(max(10, calls // 10)):
        torch.sigmoid(x, out=out)
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        torch.sigmoid(x, out=out)
        ts.append(time.perf_counter() - t0)
    return numel / statistics.median(ts)


def sigmoid_ceiling(numel: int = 16384, calls: int = 5000) -> Ceiling:
    """Median single-call `torch.sigmoid(x, out=out)` throughput on ``numel`` float32 elements.

    16384 floats (64 KiB) stay in L1/L2, so this is compute-bound sigma throughput. ATen
    only splits an elementwise op over threads from 32768 elements on
    (at::internal::GRAIN_SIZE), so one call of this size runs on one core while the
    fused kernels use all of them: the ceiling scales the per-call rate by the thread
    count. Which case holds is checked by timing the call with 1 thread too.
    """
    threads = torch.get_num_threads()
    rate = _median_call_rate(numel, calls)
    call_threads = threads
    if threads > 1:
        torch.set_num_threads(1)
        try:
            rate_1 = _median_call_rate(numel, calls)
        finally:
            torch.set_num_threads(threads)
        # within noise of the one-thread rate: the call did not parallelise
        if rate < 1.3 * rate_1:
            call_threads = 1
    return Ceiling(numel, rate, threads, call_threads, rate * threads / call_threads)


# ----------------------------------------------------------------------------- memory estimates


NAIVE_CUBES = 10.0  # float32 (Q, N, N) tensors alive at once in the naive rank ops (fitted at B = 256, 512)
NAIVE_GRADED_CUBES = 16.0  # the graded cube also holds min(rel_j, rel_k) and the H / H^- choice (not fitted)
NAIVE_HIST_COPIES = 5.0  # float32 (Q, N, L) tensors alive at once in naive histogram ops (~4.2 measured, B = 1024)


def naive_bytes_estimate(op: str, workload: str, x: int) -> float:
    """Rough peak of the `naive` backend on a point.

    Rank ops: the cube of differences, the step values, their masked products (and
    their gradients in backward) coexist, ~NAIVE_CUBES float32 (Q, N, N) tensors.
    Histogram ops: the (Q, N, L) bin weights and their intermediates, ~NAIVE_HIST_COPIES
    float32 (Q, N, L) tensors.
    """
    q, n = W.shape(workload, x)
    d = OP_DEFS[op]
    if d.graded:
        return NAIVE_GRADED_CUBES * 4.0 * q * n * n
    if d.family == "rank":
        return NAIVE_CUBES * 4.0 * q * n * n
    return NAIVE_HIST_COPIES * 4.0 * q * n * d.bins


def cost_units(spec: PointSpec) -> float:
    """What a point's time scales with, to predict a larger point from a smaller one."""
    d = OP_DEFS[spec.op]
    q, n = W.shape(spec.workload, spec.x)
    if spec.backend == "naive" and d.family == "rank":
        return float(q) * n * n  # the naive cube, whatever |P|
    return float(work(spec.op, spec.workload, spec.x))
