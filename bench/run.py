"""fastrank benchmark (docs/design.md §4, issue 3): ``python bench/run.py`` (``make bench``).

Every point is one (op, backend, workload, x, mode): ``1 - op(scores, target)`` on a
seeded workload (bench/workloads.py), timed in `forward`, `backward` or `full`
(forward+backward) mode (bench/measure.py). On the CPU each point runs in a fresh
Python process (peak RSS via VmHWM is per process; allocator state and thread pools
must not leak between points); on a GPU (``--device cuda``) points run in this
process, with the allocator's peak counters reset and its cache emptied between them.
This process measures the ceiling (CPU: `torch.sigmoid` on an in-cache buffer; GPU:
the SFU table of bench/gpu.py), guards against points that cannot fit (memory
estimate, predicted time, a smaller x that already failed, the run's time budget),
and writes

    the markdown tables on stdout,
    bench/results/<device>_<sweep>_<YYYYmmdd-HHMMSS>.csv (+ <device>_<sweep>_latest.csv),
    bench/results/<device>_<sweep>_<workload>_<mode>.png, one per (workload, mode),

where <device> is `cpu` or `gpu_<device name>`, <sweep> `default`, `full`, `quick`, or
`custom` when --ops/--backends/--workloads/--modes/--sizes narrow it (or --tag).

Sweeps (sizes per workload, op family and backend in SWEEPS below):
  CPU default (``make bench``, hard budget 8 min): workload batch, mode full, all
      seven ops; naive to B = 512, torch to 2048 (rank ops) / 512 (histogram ops), cpp
      to 16384; the graded ops (h_ap, ndcg: ~4x the pairs) naive to 256, torch to 512,
      cpp to 4096.
  CPU --full (``make bench-full``, a few hours): every workload x mode x op, larger caps.
  CPU --quick: a ~1 min smoke test.
  GPU default (``make gpu-bench``, budget 8 min): every workload, mode full; GPU --full:
      every mode, larger sizes.
Every planned point gets a row; one that was not measured says why (status oom,
timeout, unsupported, error, or skipped when the run's budget was spent).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# `python bench/run.py` puts bench/ (not the repository) on sys.path; the package
# imports below need the repository root
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.measure import (  # noqa: E402
    MODES, OP_DEFS, OPS, PointResult, PointSpec, blank_result, choose_reps, cost_units, naive_bytes_estimate,
    run_point,
)
from bench.op_keys import RENAMED_OP_KEYS  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402

RESULTS_DIR = os.path.join(_HERE, "results")
MARK = "FASTRANK_BENCH_RESULT "  # prefix of the child's result line on stdout
BUDGET_GRACE_S = 30.0  # a CPU point in flight when the budget ends may run this much longer


def p2(lo: int, hi: int) -> List[int]:
    """Powers of two from lo to hi inclusive."""
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= 2
    return out


XBM_SIZES = [16384, 32768, 65536]

# sizes[workload][family][backend]; a backend not listed takes the "fused" entry
Sizes = Dict[str, Dict[str, Dict[str, List[int]]]]


@dataclass
class Sweep:
    workloads: Tuple[str, ...]
    modes: Tuple[str, ...]
    ops: Tuple[str, ...]
    backends: Tuple[str, ...]
    sizes: Sizes
    min_time_s: float = 2.0
    max_reps: int = 50
    warmup_s: float = 0.0
    budget_min: float = 0.0  # 0: no budget
    notes: List[str] = field(default_factory=list)

    def sizes_for(self, workload: str, op: str, backend: str) -> List[int]:
        table = self.sizes.get(workload, {})
        d = OP_DEFS[op]
        fam = table.get(d.sizes_key, table.get(d.family, {}))  # graded ops fall back to "rank"
        return list(fam.get(backend, fam.get("fused", [])))


_CPU_FULL_SIZES: Sizes = {
    "batch": {
        "rank": {"naive": p2(128, 1024), "torch": p2(128, 16384), "fused": p2(128, 16384)},
        "hist": {"naive": p2(128, 4096), "torch": p2(128, 4096), "fused": p2(128, 16384)},
    },
    "xbm": {f: {"naive": XBM_SIZES, "torch": XBM_SIZES, "fused": XBM_SIZES} for f in ("rank", "hist")},
    "dense": {
        "rank": {"naive": p2(128, 512), "torch": p2(128, 2048), "fused": p2(128, 4096)},
        "hist": {"naive": p2(128, 2048), "torch": p2(128, 2048), "fused": p2(128, 8192)},
    },
}
_GPU_DEFAULT_SIZES: Sizes = {
    "batch": {
        "rank": {"naive": p2(128, 1024), "torch": p2(128, 8192), "fused": p2(128, 32768)},
        "hist": {"naive": p2(128, 8192), "torch": p2(128, 16384), "fused": p2(128, 32768)},
    },
    "xbm": {f: {"naive": XBM_SIZES, "torch": XBM_SIZES, "fused": XBM_SIZES} for f in ("rank", "hist")},
    "dense": {
        "rank": {"naive": p2(128, 1024), "torch": p2(128, 4096), "fused": p2(128, 16384)},
        "hist": {"naive": p2(128, 8192), "torch": p2(128, 16384), "fused": p2(128, 32768)},
    },
}
_GPU_FULL_SIZES: Sizes = {
    "batch": {
        "rank": {"naive": p2(128, 2048), "torch": p2(128, 16384), "fused": p2(128, 65536)},
        "hist": {"naive": p2(128, 16384), "torch": p2(128, 32768), "fused": p2(128, 65536)},
    },
    "xbm": _GPU_DEFAULT_SIZES["xbm"],
    "dense": {
        "rank": {"naive": p2(128, 2048), "torch": p2(128, 8192), "fused": p2(128, 32768)},
        "hist": {"naive": p2(128, 16384), "torch": p2(128, 32768), "fused": p2(128, 65536)},
    },
}

SWEEPS: Dict[Tuple[str, str], Sweep] = {
    # 80 points. At ~2 s of process start-up + warm-up + memory run + >= 1 s of reps per
    # point this is ~4 min of small points plus ~1.5 min for the large ones on 2 idle
    # cores. The run budget (budget_min, +30 s grace for the point in flight) bounds a contended
    # run: with `make build`'s ~1.5 min rebuild, `make bench` stays under 10 minutes (a run
    # with another process on one core took 7.8 min of sweep before this cap was 7).
    # The torch backend runs rank ops at ~50 M pairs/s here (B = 8192 is ~5-7 s per
    # fwd+bwd, ~30 s per point, x3 ops) and histogram ops at ~1-3 M items/s (its
    # (rows, N, bins) chunks), so both are capped; naive rank ops cost ~10 s per call
    # at B = 512. --full has the rest.
    ("cpu", "default"): Sweep(
        workloads=("batch",), modes=("full",), ops=OPS, backends=("naive", "torch", "cpp"),
        sizes={"batch": {
            # naive to 512 for the rank ops: the issue-2 targets compare with it at B = 512
            "rank": {"naive": p2(128, 512), "torch": p2(128, 2048), "fused": p2(128, 16384)},
            "hist": {"naive": p2(128, 512), "torch": p2(128, 512), "fused": p2(128, 16384)},
            # ~4x the pairs of the binary ops (a query ranks its whole super-class)
            "graded": {"naive": p2(128, 256), "torch": p2(128, 512), "fused": p2(128, 4096)},
        }},
        min_time_s=1.0, budget_min=8.0,
    ),
    ("cpu", "full"): Sweep(
        workloads=WORKLOADS, modes=MODES, ops=OPS, backends=("naive", "torch", "cpp"), sizes=_CPU_FULL_SIZES,
        min_time_s=2.0,
    ),
    ("cpu", "quick"): Sweep(
        workloads=("batch",), modes=("full",), ops=OPS, backends=("naive", "torch", "cpp"),
        sizes={"batch": {
            "rank": {"naive": [128], "torch": [128, 256], "fused": [128, 256, 512]},
            "hist": {"naive": [128, 256], "torch": [128, 256], "fused": [128, 256, 512]},
            "graded": {"naive": [128], "torch": [128, 256], "fused": [128, 256, 512]},
        }},
        min_time_s=0.3,
    ),
    ("cuda", "default"): Sweep(
        workloads=WORKLOADS, modes=("full",), ops=OPS, backends=("naive", "torch", "triton", "cuda"),
        sizes=_GPU_DEFAULT_SIZES, min_time_s=0.3, max_reps=200, warmup_s=0.1, budget_min=8.0,
    ),
    ("cuda", "full"): Sweep(
        workloads=WORKLOADS, modes=MODES, ops=OPS, backends=("naive", "torch", "triton", "cuda"),
        sizes=_GPU_FULL_SIZES, min_time_s=0.5, max_reps=200, warmup_s=0.1,
    ),
    ("cuda", "quick"): Sweep(
        workloads=("batch",), modes=("full",), ops=OPS, backends=("naive", "torch", "triton", "cuda"),
        sizes={"batch": {f: {"naive": [128, 256], "fused": [128, 1024, 4096]} for f in ("rank", "hist")}},
        min_time_s=0.1, max_reps=100, warmup_s=0.05,
    ),
}


# ----------------------------------------------------------------------------- child side


def _child(point_json: str) -> int:
    """`--point`: measure one point and print its result as one JSON line."""
    spec = PointSpec(**json.loads(point_json))
    res = run_point(spec)
    sys.stdout.write(MARK + json.dumps(res.to_json()) + "\n")
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------- machine facts


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def git_sha() -> str:
    """Short HEAD sha, with "-dirty" when tracked files differ from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT, capture_output=True,
            text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("-dirty" if dirty else "")


def mem_available_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except Exception:  # noqa: BLE001 - absent or broken: the column stays empty
        return ""


# ----------------------------------------------------------------------------- parent side


class CpuContention:
    """CPU time that processes other than this benchmark used between two snapshots, in cores.

    The fused kernels use every core with OpenMP, whose barriers stall whenever one
    thread is descheduled, so a concurrent build or test run inflates times badly (and
    unevenly). /proc/stat counts all busy time (steal included: a hypervisor taking the
    core is the same loss); subtracting our own and our finished children's CPU time
    leaves the others'.
    """

    def __init__(self) -> None:
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start = self._snapshot()

    def _snapshot(self) -> Optional[tuple]:
        try:
            with open("/proc/stat") as f:
                v = [int(t) for t in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / self._hz
        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            ru = resource.getrusage(who)
            own += ru.ru_utime + ru.ru_stime
        return time.monotonic(), busy, own

    def restart(self) -> None:
        self._start = self._snapshot()

    def others_cores(self) -> float:
        """Average cores used by other processes since the last (re)start; NaN if unknown."""
        end = self._snapshot()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return math.nan
        wall = end[0] - self._start[0]
        return max(0.0, ((end[1] - self._start[1]) - (end[2] - self._start[2])) / wall)


def run_in_subprocess(spec: PointSpec, timeout_s: float, why: str = "--timeout") -> PointResult:
    """Runs one point in a fresh interpreter; any failure becomes a status, never an exception."""
    cmd = [sys.executable, os.path.abspath(__file__), "--point", json.dumps(spec.__dict__)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=_ROOT)
    except subprocess.TimeoutExpired:
        return blank_result(spec, "timeout", f"killed after {timeout_s:.0f} s ({why})")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return PointResult.from_json(json.loads(line[len(MARK):]))
    if proc.returncode == -9:
        # SIGKILL that we did not send: on Linux almost always the OOM killer
        return blank_result(spec, "oom", "child killed by SIGKILL (likely the kernel OOM killer)")
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return blank_result(spec, "error", f"exit status {proc.returncode}: {tail[:200]}")


def run_in_process(spec: PointSpec) -> PointResult:
    """Runs one point here (GPU sweeps, tests); the CUDA cache is emptied afterwards, OOM or not."""
    import gc

    import torch

    try:
        return run_point(spec)
    finally:
        gc.collect()
        if spec.device == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()


def plan(sweep: Sweep, device: str, sizes: Optional[List[int]] = None) -> List[PointSpec]:
    """Points in run order: workload, mode, then increasing x, then op and backend.

    Size-major order makes a run that spends its budget lose its largest points, of
    every op alike, rather than the last op entirely; each (op, backend) still sees
    its sizes in increasing order, which the guard relies on.
    """
    points = []
    for workload in sweep.workloads:
        for mode in sweep.modes:
            per_key = {
                (op, b): sorted(set(sizes if sizes is not None else sweep.sizes_for(workload, op, b)))
                for op in sweep.ops for b in sweep.backends
            }
            for x in sorted({x for xs in per_key.values() for x in xs}):
                for op in sweep.ops:
                    for b in sweep.backends:
                        if x in per_key[(op, b)]:
                            points.append(PointSpec(
                                op=op, backend=b, x=x, workload=workload, mode=mode, device=device,
                                min_time_s=sweep.min_time_s, max_reps=sweep.max_reps, warmup_s=sweep.warmup_s,
                            ))
    return points


class Guard:
    """Decides, before launching a point, whether it can possibly fit.

    * naive: its (Q, N, N) (rank ops) or (Q, N, bins) (histogram ops) tensors are
      estimated and skipped as OOM over the memory limit, so a sweep cannot take the
      machine down (RLIMIT_AS is no use here: torch and OpenMP reserve far more address
      space than they touch).
    * any backend: once a point of an (op, backend, workload, mode) fails, larger x are
      not tried; and the time of the last good point, scaled by the work (pairs, items,
      or the naive cube), predicts whether warm-up + memory run + one rep fit in the
      per-point timeout.
    * the run's budget (seconds, 0 = none): a point whose predicted wall time would
      end past it is skipped.
    """

    def __init__(self, mem_limit_bytes: float, timeout_s: float, budget_s: float = 0.0,
                 overhead_s: float = 3.0) -> None:
        self.mem_limit = mem_limit_bytes
        self.timeout_s = timeout_s
        self.budget_s = budget_s
        self.overhead_s = overhead_s  # per-point cost besides the op itself (process start-up, inputs)
        self.failed: Dict[tuple, str] = {}
        self.last_ok: Dict[tuple, PointResult] = {}

    @staticmethod
    def _key(spec: PointSpec) -> tuple:
        return spec.op, spec.backend, spec.workload, spec.mode

    def predicted_s(self, spec: PointSpec) -> float:
        """Predicted time of one timed call (NaN without a smaller good point)."""
        prev = self.last_ok.get(self._key(spec))
        if prev is None:
            return math.nan
        return prev.p50_ms / 1e3 * cost_units(spec) / max(cost_units(prev.spec), 1.0)

    def predicted_wall_s(self, spec: PointSpec) -> float:
        t = self.predicted_s(spec)
        if math.isnan(t):
            return self.overhead_s + spec.min_time_s
        return self.overhead_s + 2 * t + choose_reps(t, spec) * t

    def check(self, spec: PointSpec, elapsed_s: float = 0.0) -> Optional[PointResult]:
        key = self._key(spec)
        if key in self.failed:
            return blank_result(spec, self.failed[key], f"skipped: a smaller x already ended in {self.failed[key]}")
        if spec.backend == "naive":
            est = naive_bytes_estimate(spec.op, spec.workload, spec.x)
            if est > self.mem_limit:
                return blank_result(spec, "oom", f"skipped: estimated {est / 1e9:.0f} GB > limit "
                                                 f"{self.mem_limit / 1e9:.0f} GB")
        predicted = self.predicted_s(spec)
        if not math.isnan(predicted) and 3 * predicted > self.timeout_s:
            return blank_result(spec, "timeout", f"skipped: predicted {predicted:.0f} s per call, "
                                                 f"x3 runs > --timeout {self.timeout_s:.0f} s")
        if self.budget_s > 0 and elapsed_s + self.predicted_wall_s(spec) > self.budget_s:
            return blank_result(spec, "skipped", f"run budget of {self.budget_s / 60:.1f} min spent "
                                                 f"(--budget-min; {elapsed_s / 60:.1f} min elapsed)")
        return None

    def record(self, res: PointResult) -> None:
        key = self._key(res.spec)
        if res.status == "ok":
            self.last_ok[key] = res
            if not math.isnan(res.wall_s) and res.reps:
                # learn the per-point overhead from the cheapest point seen
                own = (2 + res.reps) * res.p50_ms / 1e3
                self.overhead_s = min(self.overhead_s, max(0.0, res.wall_s - own))
        elif res.status != "skipped":
            self.failed.setdefault(key, res.status)


def _progress(items: List[PointSpec]) -> Iterable[PointSpec]:
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; the table is the output
        return items
    return tqdm(items, desc="bench", unit="pt", file=sys.stderr, dynamic_ncols=True)


def _csv_list(s: Optional[str]) -> List[str]:
    return [t.strip() for t in (s or "").split(",") if t.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (fresh process per point) or cuda (points in-process; `make gpu-bench`)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true", help="every workload, mode and op, larger sizes (hours on CPU)")
    g.add_argument("--quick", action="store_true", help="smoke test: batch, full mode, small sizes (~1 min)")
    p.add_argument("--ops", default=None, help="comma list of: " + ", ".join(OPS)
                   + " (the public functions; histogram_ap by kind; default: the sweep's)")
    p.add_argument("--backends", default=None, help="comma list (unavailable ones are skipped; default: the sweep's)")
    p.add_argument("--workloads", default=None, help="comma list of: " + ", ".join(WORKLOADS))
    p.add_argument("--modes", default=None, help="comma list of: " + ", ".join(MODES))
    p.add_argument("--sizes", default=None, help="comma list of x for every (op, backend) (overrides the sweep)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-point timeout in seconds (default 300)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="skip points that would end after this many minutes (0 = none; default: the sweep's)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timed reps per point (default: the sweep's)")
    p.add_argument("--mem-limit-gb", type=float, default=16.0,
                   help="naive points estimated above this (or 75%% of MemAvailable; GPU: 2x device memory) "
                        "are skipped as OOM")
    p.add_argument("--in-process", action="store_true",
                   help="CPU: run points in this process (faster; peak memory then includes allocator reuse)")
    p.add_argument("--out-dir", default=RESULTS_DIR, help="where the CSV and PNGs go")
    p.add_argument("--tag", default=None, help="file-name tag instead of the sweep name")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", default=None, metavar="CSV",
                   help="only redraw the PNGs (next to the CSV) and reprint the tables of a CSV this tool wrote")
    p.add_argument("--point", default=None, help=argparse.SUPPRESS)  # internal: child mode
    return p.parse_args(argv)


def _select(name: str, given: Optional[str], default: Sequence[str], valid: Sequence[str],
            renamed: Optional[Dict[str, str]] = None) -> Tuple[str, ...]:
    """The comma list `given` (or `default`); an unknown entry stops the run naming the valid ones
    (and, for a name in `renamed`, the name it has now)."""
    if given is None:
        return tuple(default)
    out = _csv_list(given)
    unknown = [v for v in out if v not in valid]
    if unknown or not out:
        hints = [f"{v} is now {renamed[v]}" for v in unknown if renamed and v in renamed]
        raise SystemExit(f"unknown --{name} {unknown or given!r}" + (f" ({'; '.join(hints)})" if hints else "")
                         + f"; choose from {', '.join(valid)}")
    return tuple(out)


def _replot(csv_path: str) -> int:
    """`--replot`: tables and PNGs again from a CSV (PNG names: the CSV's, less `_latest` / the stamp)."""
    import re

    from bench.report import Derived, load_csv, markdown_table, plot

    results, info = load_csv(csv_path)
    d = Derived(results, info.ceiling_rate)
    print(markdown_table(d))
    stem = re.sub(r"_(latest|\d{8}-\d{6})$", "", os.path.splitext(csv_path)[0])
    for workload, mode in d.groups():
        png = f"{stem}_{workload}_{mode}.png"
        if plot(png, d, info, workload, mode):
            print(f"wrote {png}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.point is not None:
        return _child(args.point)
    if args.replot is not None:
        return _replot(args.replot)

    import torch

    import fastrank
    from bench.measure import sigmoid_ceiling
    from bench.report import CONTENDED, LEGEND, Derived, RunInfo, markdown_table, plot, write_csv

    if args.device == "cuda" and not torch.cuda.is_available():
        print("[bench] --device cuda: torch.cuda.is_available() is False (no GPU, or a CPU-only torch build)",
              file=sys.stderr)
        return 1
    sweep_name = "full" if args.full else "quick" if args.quick else "default"
    base = SWEEPS[(args.device, sweep_name)]
    custom = any(v is not None for v in (args.ops, args.backends, args.workloads, args.modes, args.sizes))
    sweep = Sweep(
        workloads=_select("workloads", args.workloads, base.workloads, WORKLOADS),
        modes=_select("modes", args.modes, base.modes, MODES),
        ops=_select("ops", args.ops, base.ops, OPS, RENAMED_OP_KEYS),
        backends=(),
        sizes=base.sizes, min_time_s=base.min_time_s if args.min_time is None else args.min_time,
        max_reps=base.max_reps, warmup_s=base.warmup_s,
        budget_min=base.budget_min if args.budget_min is None else args.budget_min,
    )
    info_by_name = fastrank.backends()
    wanted = _select("backends", args.backends, base.backends, tuple(info_by_name))
    backends = []
    for b in wanted:
        info = info_by_name[b]
        if not info.available:
            print(f"[bench] skipping backend {b!r}: {info.reason}", file=sys.stderr)
        elif args.device == "cpu" and b == "triton" and args.backends is None:
            pass  # interpreted Triton (TRITON_INTERPRET=1) is a test mode, not a benchmark
        else:
            backends.append(b)
    sweep.backends = tuple(backends)
    sizes = [int(s) for s in _csv_list(args.sizes)] if args.sizes else None
    if sizes is not None and any(s <= 0 for s in sizes):
        raise SystemExit(f"--sizes must be positive, got {args.sizes!r}")
    for workload in sweep.workloads:
        if workload not in sweep.sizes and sizes is None:
            raise SystemExit(f"the {sweep_name} sweep has no sizes for workload {workload!r}; pass --sizes "
                             f"or use --full")
    points = plan(sweep, args.device, sizes)
    in_process = args.device == "cuda" or args.in_process

    start = time.time()
    now = _dt.datetime.now()
    if args.device == "cuda":
        from bench.gpu import device_ceiling, slug

        name, gc_ = device_ceiling(torch.cuda.current_device())
        ceiling_rate, ceiling_text, device_name = gc_.rate, gc_.text, name
        prefix = f"gpu_{slug(name)}"
        mem_limit = 2.0 * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        memory_method = "max_memory_allocated"
    else:
        c = sigmoid_ceiling()
        ceiling_rate, ceiling_text, device_name = c.rate, c.describe(), cpu_model()
        prefix = "cpu"
        mem_limit = min(args.mem_limit_gb * 1e9, 0.75 * mem_available_bytes())
        memory_method = "VmHWM (in-process)" if in_process else "VmHWM"
    info = RunInfo(
        device=device_name, torch_version=torch.__version__, git_sha=git_sha(),
        timestamp=now.isoformat(timespec="seconds"), threads=torch.get_num_threads(),
        ceiling_rate=ceiling_rate, ceiling_text=ceiling_text, triton_version=triton_version(),
        cuda_version=torch.version.cuda or "", memory_method=memory_method,
        kind="GPU" if args.device == "cuda" else "CPU",
    )
    guard = Guard(mem_limit, args.timeout, sweep.budget_min * 60, overhead_s=0.5 if in_process else 3.0)
    results: List[PointResult] = []
    whole_run = CpuContention()
    bar = _progress(points)
    for spec in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{spec.workload}/{spec.mode} {spec.op}/{spec.backend} x={spec.x}")
        res = guard.check(spec, time.time() - start)
        if res is None:
            point_cpu = CpuContention()
            t0 = time.monotonic()
            if in_process:  # no way to stop a point here: the guard's prediction is the only timeout
                res = run_in_process(spec)
            else:
                # with a budget, no point may run past it (plus a grace period): a hard bound on the run
                left = guard.budget_s + BUDGET_GRACE_S - (time.time() - start) if guard.budget_s > 0 else math.inf
                timeout, why = (args.timeout, "--timeout") if args.timeout <= left else (max(5.0, left), "run budget")
                res = run_in_subprocess(spec, timeout, why)
            res.wall_s = time.monotonic() - t0
            res.others_cores = point_cpu.others_cores()
        guard.record(res)
        results.append(res)
    others = whole_run.others_cores()

    d = Derived(results, ceiling_rate)
    what = f"{len(sweep.ops)} ops x {len(sweep.backends)} backends, workloads {', '.join(sweep.workloads)}, " \
           f"modes {', '.join(sweep.modes)}"
    print()
    title = f"custom selection (from the {sweep_name} sweep)" if custom else f"{sweep_name} sweep"
    print(f"## fastrank {info.kind} benchmark — {title}: {what}")
    print()
    print(markdown_table(d))
    print()
    print(LEGEND)
    print(f"{info.ceiling_text}; torch {info.torch_version}, triton {info.triton_version or '-'}, "
          f"CUDA {info.cuda_version or '-'}, {info.threads} threads, device {info.device}, "
          f"git {info.git_sha}, {info.timestamp}")
    print("peak extra memory: " + ("max_memory_allocated minus the bytes allocated before the timed call "
                                   "(inputs; in backward mode also the forward's graph)" if args.device == "cuda" else
                                   "VmHWM after a reset minus RSS before the timed call, one fresh process per "
                                   "point" + (" (here: in-process)" if in_process else "")))
    if sweep_name == "default" and args.device == "cpu" and not custom:
        print("default sweep: batch workload, full mode; naive to B = 512, torch to 2048 (rank ops) / 512 "
              "(histogram ops), cpp to 16384; graded ops (h_ap, ndcg) naive to 256, torch to 512, cpp to 4096; "
              "to stay within ~8 minutes. `make bench-full` runs every "
              "workload x mode with larger sizes.")
    if sweep.budget_min > 0:
        n_budget = sum(1 for r in results if r.status == "skipped")
        print(f"run budget {sweep.budget_min:.1f} min: {n_budget} points skipped for lack of time" if n_budget else
              f"run budget {sweep.budget_min:.1f} min: every planned point ran")
    print(f"other processes used {others:.2f} of {os.cpu_count()} cores on average during the run")
    n_flagged = sum(1 for r in results if r.others_cores > CONTENDED)  # NaN compares False
    if n_flagged or others > CONTENDED:
        print(f"WARNING: the machine was not idle; {n_flagged} points (marked †) ran while other processes used "
              f"> {CONTENDED} cores and their times are inflated (OpenMP barriers stall on a "
              f"descheduled thread). Rerun on an idle machine for numbers to quote.")

    os.makedirs(args.out_dir, exist_ok=True)
    tag = args.tag or ("custom" if custom else sweep_name)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    csv_path = os.path.join(args.out_dir, f"{prefix}_{tag}_{stamp}.csv")
    latest = os.path.join(args.out_dir, f"{prefix}_{tag}_latest.csv")
    write_csv(csv_path, d, info)
    shutil.copyfile(csv_path, latest)
    written = [csv_path, latest]
    if not args.no_plot:
        try:
            for workload, mode in d.groups():
                png = os.path.join(args.out_dir, f"{prefix}_{tag}_{workload}_{mode}.png")
                if plot(png, d, info, workload, mode):
                    written.append(png)
        except ImportError as e:  # matplotlib missing: the table and CSV still stand
            print(f"[bench] no plot: {e}", file=sys.stderr)
    rel = [os.path.relpath(w, _ROOT) if w.startswith(_ROOT) else w for w in written]
    print(f"wrote {', '.join(rel)}  ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
