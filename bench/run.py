"""CPU benchmark of fastrank's AP losses (SPEC §4): ``python bench/run.py`` (``make bench``).

For every (op, backend, B) point a fresh Python process builds the `batch` workload,
runs one warm-up forward+backward of ``1 - op(scores, (labels, labels))``, measures
the peak extra RSS of one more, then times repetitions. This parent process measures
the `torch.sigmoid` ceiling, guards against points that cannot fit (memory estimate,
predicted time, a smaller B that already failed), and writes

    the markdown table on stdout,
    bench/results/cpu_batch_<YYYYmmdd-HHMMSS>.csv (+ cpu_batch_latest.csv),
    bench/results/cpu_batch_latest.png.

Default sweep (about 5 minutes on 2 idle cores): naive at B = 128..512, torch at
128..8192, cpp at 128..16384. The torch backend runs at ~50 M pairs/s here, so
B = 16384 (1.07e9 pairs) costs ~20-25 s per fwd+bwd and 1.5-2 minutes per op with
warm-up, memory run and reps, which would push the default past 10 minutes; it is
in ``--full`` only. ``--quick`` is a ~30 s smoke test.
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
from typing import Dict, Iterable, List, Optional, Sequence

# `python bench/run.py` puts bench/ (not the repository) on sys.path; the package
# imports below need the repository root
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.measure import OPS, PointResult, PointSpec, naive_bytes_estimate, run_point  # noqa: E402

ALL_SIZES = [128, 256, 512, 1024, 2048, 4096, 8192, 16384]
SWEEPS: Dict[str, Dict[str, List[int]]] = {
    "default": {"naive": ALL_SIZES[:3], "torch": ALL_SIZES[:7], "cpp": ALL_SIZES},
    "full": {"naive": ALL_SIZES[:4], "torch": ALL_SIZES, "cpp": ALL_SIZES},
    # a smoke test: the naive cube at 512 alone costs ~15 s per op
    "quick": {"naive": ALL_SIZES[:2], "torch": ALL_SIZES[:3], "cpp": ALL_SIZES[:3]},
}
RESULTS_DIR = os.path.join(_HERE, "results")
MARK = "FASTRANK_BENCH_RESULT "  # prefix of the child's result line on stdout


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


def _skip(spec: PointSpec, status: str, note: str) -> PointResult:
    # `batch` workload: B queries, each with 4 positives (itself included), N = B
    return PointResult(spec=spec, status=status, note=note, pairs=4 * spec.B * spec.B, others_cores=math.nan)


def run_in_subprocess(spec: PointSpec, timeout_s: float) -> PointResult:
    """Runs one point in a fresh interpreter; any failure becomes a status, never an exception."""
    cmd = [sys.executable, os.path.abspath(__file__), "--point", json.dumps(spec.__dict__)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=_ROOT)
    except subprocess.TimeoutExpired:
        return _skip(spec, "timeout", f"killed after {timeout_s:.0f} s (--timeout)")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return PointResult.from_json(json.loads(line[len(MARK):]))
    if proc.returncode == -9:
        # SIGKILL that we did not send: on Linux almost always the OOM killer
        return _skip(spec, "oom", "child killed by SIGKILL (likely the kernel OOM killer)")
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return _skip(spec, "error", f"exit status {proc.returncode}: {tail[:200]}")


def plan(ops: Sequence[str], backends: Sequence[str], mode: str, sizes: Optional[List[int]]) -> List[PointSpec]:
    """Points in run order: op, then backend, then increasing B."""
    points = []
    for op in ops:
        for backend in backends:
            bs = sizes if sizes is not None else SWEEPS[mode].get(backend, SWEEPS[mode]["cpp"])
            points.extend(PointSpec(op=op, backend=backend, B=b) for b in sorted(bs))
    return points


class Guard:
    """Decides, before launching a point, whether it can possibly fit.

    * naive: its (B, B, B) cubes are estimated and skipped as OOM over the memory limit,
      so a sweep cannot take the machine down (RLIMIT_AS is no use here: torch and
      OpenMP reserve far more address space than they touch).
    * any backend: once a point of an (op, backend) fails, larger B are not tried; and
      the time of the last good point, scaled by B^2 (B^3 for naive), predicts whether
      warm-up + memory run + one rep fit in the per-point timeout.
    """

    def __init__(self, mem_limit_bytes: float, timeout_s: float) -> None:
        self.mem_limit = mem_limit_bytes
        self.timeout_s = timeout_s
        self.failed: Dict[tuple, str] = {}
        self.last_ok: Dict[tuple, PointResult] = {}

    def check(self, spec: PointSpec) -> Optional[PointResult]:
        key = (spec.op, spec.backend)
        if key in self.failed:
            return _skip(spec, self.failed[key], f"skipped: a smaller B already ended in {self.failed[key]}")
        if spec.backend == "naive":
            est = naive_bytes_estimate(spec.B)
            if est > self.mem_limit:
                return _skip(spec, "oom", f"skipped: estimated {est / 1e9:.0f} GB > limit {self.mem_limit / 1e9:.0f} GB")
        prev = self.last_ok.get(key)
        if prev is not None:
            power = 3 if spec.backend == "naive" else 2
            predicted_s = prev.p50_ms / 1e3 * (spec.B / prev.spec.B) ** power
            if 3 * predicted_s > self.timeout_s:
                return _skip(spec, "timeout", f"skipped: predicted {predicted_s:.0f} s per fwd+bwd, "
                                              f"x3 runs > --timeout {self.timeout_s:.0f} s")
        return None

    def record(self, res: PointResult) -> None:
        key = (res.spec.op, res.spec.backend)
        if res.status == "ok":
            self.last_ok[key] = res
        else:
            self.failed.setdefault(key, res.status)


def _progress(items: List[PointSpec]) -> Iterable[PointSpec]:
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; the table is the output
        return items
    return tqdm(items, desc="bench", unit="pt", file=sys.stderr, dynamic_ncols=True)


def _csv_list(s: str) -> List[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="supap,smoothap", help="comma list of: " + ", ".join(OPS))
    p.add_argument("--backends", default="naive,torch,cpp", help="comma list (unavailable ones are skipped)")
    p.add_argument("--sizes", default=None, help="comma list of B for every backend (overrides the sweep)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true", help="naive up to 1024, torch and cpp up to 16384")
    g.add_argument("--quick", action="store_true", help="smoke test: B <= 512 (naive <= 256), ~0.5 s per point")
    p.add_argument("--timeout", type=float, default=300.0, help="per-point timeout in seconds (default 300)")
    p.add_argument("--mem-limit-gb", type=float, default=16.0,
                   help="naive points estimated above this (or 75%% of MemAvailable) are skipped as OOM")
    p.add_argument("--out-dir", default=RESULTS_DIR, help="where the CSV and PNG go")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--point", default=None, help=argparse.SUPPRESS)  # internal: child mode
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.point is not None:
        return _child(args.point)

    import torch

    import fastrank
    from bench.measure import sigmoid_ceiling
    from bench.report import CONTENDED, Derived, RunInfo, markdown_table, plot, write_csv

    mode = "full" if args.full else "quick" if args.quick else "default"
    ops = _csv_list(args.ops)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise SystemExit(f"unknown --ops {unknown}; choose from {', '.join(OPS)}")
    info_by_name = fastrank.backends()
    backends, skipped = [], []
    for b in _csv_list(args.backends):
        info = info_by_name.get(b)
        if info is None:
            raise SystemExit(f"unknown backend {b!r}; choose from {', '.join(info_by_name)}")
        (backends if info.available else skipped).append(b)
    for b in skipped:
        print(f"[bench] skipping backend {b!r}: {info_by_name[b].reason}", file=sys.stderr)
    sizes = [int(s) for s in _csv_list(args.sizes)] if args.sizes else None
    points = plan(ops, backends, mode, sizes)
    if args.quick:
        for pt in points:
            pt.min_time_s = 0.5

    start = time.time()
    now = _dt.datetime.now()
    ceiling = sigmoid_ceiling()
    info = RunInfo(
        device=cpu_model(), torch_version=torch.__version__, git_sha=git_sha(),
        timestamp=now.isoformat(timespec="seconds"), threads=torch.get_num_threads(),
        ceiling_rate=ceiling.rate, ceiling_text=ceiling.describe(),
    )
    mem_limit = min(args.mem_limit_gb * 1e9, 0.75 * mem_available_bytes())
    guard = Guard(mem_limit, args.timeout)
    results: List[PointResult] = []
    whole_run = CpuContention()
    for spec in _progress(points):
        res = guard.check(spec)
        if res is None:
            point_cpu = CpuContention()
            res = run_in_subprocess(spec, args.timeout)
            res.others_cores = point_cpu.others_cores()
        guard.record(res)
        results.append(res)
    others = whole_run.others_cores()

    d = Derived(results, ceiling.rate)
    print()
    print(f"## fastrank CPU benchmark — workload `batch` (Q = N = B, dim 512, 4 per class), forward+backward of 1 - AP")
    print()
    print(markdown_table(d))
    print()
    print("pairs = Σ_i |P_i|·N = 4·B²; fwd+bwd evaluates each pair twice, so pair evals/s = 2·pairs / p50. "
          "% ceiling (cpp, torch) = pair evals/s over the σ ceiling. Speed-ups: p50 of naive (torch) / p50 of this row, same run.")
    print(f"{info.ceiling_text}; torch {info.torch_version}, {info.threads} threads, "
          f"CPU {info.device}, git {info.git_sha}, {info.timestamp}")
    if mode == "default" and "torch" in backends and sizes is None:
        print(f"mode {mode}: torch sweep capped at B = {SWEEPS['default']['torch'][-1]} to stay within ~10 min "
              f"(B = 16384 is ~20-25 s per fwd+bwd here); naive at B <= {SWEEPS['default']['naive'][-1]}. --full runs all.")
    else:
        print(f"mode {mode}" + (" (sizes from --sizes)" if sizes is not None else ""))
    print(f"other processes used {others:.2f} of {os.cpu_count()} cores on average during the run")
    n_flagged = sum(1 for r in results if r.others_cores > CONTENDED)  # NaN compares False
    if n_flagged or others > CONTENDED:
        print(f"WARNING: the machine was not idle; {n_flagged} points (marked †) ran while other processes used "
              f"> {CONTENDED} cores and their times are inflated (OpenMP barriers stall on a "
              f"descheduled thread). Rerun on an idle machine for numbers to quote.")

    os.makedirs(args.out_dir, exist_ok=True)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    csv_path = os.path.join(args.out_dir, f"cpu_batch_{stamp}.csv")
    write_csv(csv_path, d, info)
    shutil.copyfile(csv_path, os.path.join(args.out_dir, "cpu_batch_latest.csv"))
    written = [csv_path, os.path.join(args.out_dir, "cpu_batch_latest.csv")]
    if not args.no_plot:
        try:
            png = os.path.join(args.out_dir, "cpu_batch_latest.png")
            plot(png, d, info)
            written.append(png)
        except ImportError as e:  # matplotlib missing: the table and CSV still stand
            print(f"[bench] no plot: {e}", file=sys.stderr)
    print(f"wrote {', '.join(os.path.relpath(w, _ROOT) for w in written)}  ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
