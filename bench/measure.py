"""One benchmark point, and the CPU ceiling it is compared with.

`run_point` is meant to run in a fresh process (``python bench/run.py --point``):
peak RSS is a per-process quantity, and a fresh process also keeps one point's
allocator state, thread pools and caches from leaking into the next.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List

import torch

from .memory import PeakMemory
from .workloads import label_pairs, make_batch

# loss name on the command line -> fastrank function name (resolved lazily, after import)
OPS: Dict[str, str] = {"supap": "sup_ap", "smoothap": "smooth_ap"}


@dataclass
class PointSpec:
    """What to measure: fwd+bwd of ``1 - op(scores, (labels, labels), backend=backend)``."""

    op: str
    backend: str
    B: int
    workload: str = "batch"
    min_time_s: float = 2.0  # timing keeps repeating until this much time is spent ...
    min_reps: int = 3  # ... with at least this many reps ...
    max_reps: int = 50  # ... and at most this many
    slow_budget_s: float = 60.0  # a slow point gets min_reps only if they fit in this, else 1 rep


@dataclass
class PointResult:
    """What a point reports back (times in ms, memory in bytes)."""

    spec: PointSpec
    status: str = "ok"  # ok | oom | timeout | error
    note: str = ""
    p20_ms: float = math.nan
    p50_ms: float = math.nan
    p80_ms: float = math.nan
    reps: int = 0
    peak_extra_bytes: float = math.nan
    memory_exact: bool = True
    pairs: int = 0
    threads: int = 0
    others_cores: float = math.nan  # CPU load of other processes while the point ran (set by the parent)
    times_ms: List[float] = field(default_factory=list)

    def to_json(self) -> Dict:
        d = asdict(self)
        # NaN is not JSON; None round-trips and the parent turns it back into NaN
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

    @classmethod
    def from_json(cls, d: Dict) -> "PointResult":
        d = dict(d)
        spec = PointSpec(**d.pop("spec"))
        for k in ("p20_ms", "p50_ms", "p80_ms", "peak_extra_bytes", "others_cores"):
            if d.get(k) is None:
                d[k] = math.nan
        return cls(spec=spec, **d)


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


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc).lower()
    return "can't allocate memory" in msg or "out of memory" in msg or "not enough memory" in msg


def run_point(spec: PointSpec) -> PointResult:
    """Builds the inputs, warms up, measures peak extra memory of one fwd+bwd, then times reps."""
    import fastrank  # imported here so that `bench.measure` imports without the extension

    res = PointResult(spec=spec, threads=torch.get_num_threads())
    if spec.workload != "batch":
        raise ValueError(f"unknown workload {spec.workload!r}")
    fn: Callable = getattr(fastrank, OPS[spec.op])
    scores, labels = make_batch(spec.B)
    x = scores.requires_grad_(True)
    target = (labels, labels)
    res.pairs = label_pairs(labels, labels)

    def fwd_bwd() -> None:
        loss = 1 - fn(x, target, backend=spec.backend)
        loss.backward()

    try:
        # warm-up: first-call costs (op registration, thread-pool start, lazy allocations)
        # must count neither in the memory baseline nor in the times
        fwd_bwd()
        x.grad = None
        gc.collect()
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            fwd_bwd()
            one_run_s = time.perf_counter() - t0
        res.peak_extra_bytes = float(mem.extra)
        res.memory_exact = mem.exact
        if not mem.exact:
            res.note = "VmHWM could not be reset (/proc/self/clear_refs): peak may include the warm-up"
        times: List[float] = []
        for _ in range(choose_reps(one_run_s, spec)):
            x.grad = None  # freeing the previous gradient is not part of the measured call
            t0 = time.perf_counter()
            fwd_bwd()
            times.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded status
        res.status = "oom" if _is_oom(exc) else "error"
        res.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return res
    res.times_ms = [t * 1e3 for t in times]
    res.reps = len(times)
    res.p20_ms, res.p50_ms, res.p80_ms = (quantile(res.times_ms, q) for q in (0.2, 0.5, 0.8))
    return res


@dataclass
class Ceiling:
    """`torch.sigmoid` throughput on an in-cache buffer (SPEC §4's CPU ceiling)."""

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

    16384 floats (64 KiB) stay in L1/L2, so this is compute-bound σ throughput. ATen
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


def naive_bytes_estimate(B: int) -> float:
    """Rough peak of the naive backend at Q = N = B: ~K float32 (B, B, B) tensors alive at once.

    The cube of differences, the step values and their masked products (plus their
    gradients in backward) coexist; K was fitted to measured VmHWM at B = 256, 512.
    """
    return NAIVE_CUBES * 4.0 * B**3


NAIVE_CUBES = 10.0
