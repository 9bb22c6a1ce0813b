"""Fused loss ops against the two-pass path, in one process (docs/design.md §2.4, §4).

``python bench/fused.py`` (the second half of ``make bench``). On the `cpp` backend every
loss runs by default as one fused op per call (score and gradient rows in one pass per
row); FASTRANK_FUSED=0 selects the two-pass path (the family's rank-sums / histogram op,
the PyTorch epilogue, a second kernel for the backward). This script switches between the
two per call, in the same process, on the `batch` workload of bench/workloads.py, and
reports per (op, B):

    forward only, forward+backward (``1 - op(scores, target)`` then ``.backward()``), for
    both paths, their ratio, and fused fwd+bwd / fused forward-only;
    the per-call overhead: the times at the smallest B (64), where the kernel work is tiny;
    the fused path's peak extra memory of a forward+backward (bench/memory.py: VmHWM), in
    units of the size of `scores`, at the largest B of each op (the gradient itself is 1x).

Writes bench/results/cpu_fused_<YYYYmmdd-HHMMSS>.csv (+ cpu_fused_latest.csv) and
cpu_fused_speedup.png. Times are medians of repeated calls (at least --min-time seconds
and 5 calls per point, after one warm-up call); the two paths alternate call by call, so a
change in machine load hits both alike.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from bench import workloads as W  # noqa: E402
from bench.measure import OP_DEFS  # noqa: E402
from bench.memory import PeakMemory  # noqa: E402

RESULTS_DIR = os.path.join(_HERE, "results")

#: sizes per op: the graded ops rank ~4x the pairs (their whole super-class), so they stop earlier
SIZES: Dict[str, List[int]] = {
    "sup_ap": [64, 256, 1024, 4096, 16384],
    "smooth_ap": [64, 256, 1024, 4096, 16384],
    "recall_at_k": [64, 256, 1024, 4096],
    "histogram_ap:fastap": [64, 256, 1024, 4096, 16384],
    "histogram_ap:softbin": [64, 256, 1024, 4096, 16384],
    "h_ap": [64, 256, 1024, 4096],
    "ndcg": [64, 256, 1024, 4096],
}
QUICK_SIZES = [64, 256]

PATHS = ("fused", "two_pass")


@contextlib.contextmanager
def fused_switch_restored():
    """Puts FASTRANK_FUSED back as it was (set or unset) on leaving, whatever the body set it to."""
    saved = os.environ.get("FASTRANK_FUSED")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("FASTRANK_FUSED", None)
        else:
            os.environ["FASTRANK_FUSED"] = saved


def _with_path(path: str, f: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        os.environ["FASTRANK_FUSED"] = "1" if path == "fused" else "0"
        f()

    return run


def _calls(op: str, w: W.Workload):
    call = OP_DEFS[op].call

    def forward() -> None:
        with torch.no_grad():
            (1 - call(w.scores, w, "cpp")).item()

    def full() -> None:
        s = w.scores.detach().requires_grad_()
        (1 - call(s, w, "cpp")).backward()

    return forward, full


def _time(fns: Dict[str, Callable[[], None]], min_time_s: float, max_reps: int) -> Dict[str, float]:
    """Median seconds per call of each function, the functions alternating call by call."""
    for f in fns.values():
        f()  # warm-up: thread pool, allocator, first-call registration
    times: Dict[str, List[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    while True:
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
        n = len(next(iter(times.values())))
        if n >= max_reps or (n >= 5 and time.perf_counter() - start >= min_time_s):
            break
    return {k: statistics.median(v) for k, v in times.items()}


def peak_extra_bytes(op: str, w: W.Workload) -> int:
    """Peak extra resident memory of one fused forward+backward on a leaf copy of the scores
    (the gradient it leaves in .grad included): VmHWM minus RSS before the call."""
    os.environ["FASTRANK_FUSED"] = "1"
    s = w.scores.detach().clone().requires_grad_()
    call = OP_DEFS[op].call
    (1 - call(s, w, "cpp")).backward()  # warm: registration, thread pool, lazy imports
    s.grad = None
    import fastrank

    fastrank.empty_cache()  # the gradient as a first call allocates it, not the cached block
    with PeakMemory() as m:
        (1 - call(s, w, "cpp")).backward()
    return m.extra


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="B = 64, 256 only (a smoke test)")
    ap.add_argument("--ops", default=",".join(SIZES), help="comma-separated ops (default: all)")
    ap.add_argument("--sizes", default="", help="comma-separated B to run (default: each op's list)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of calls per point (default 1)")
    ap.add_argument("--max-reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=RESULTS_DIR)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in ops if o not in SIZES]
    if unknown:
        ap.error(f"unknown ops {unknown}; choose from {', '.join(SIZES)}")
    import fastrank

    if not fastrank.backends()["cpp"].available:
        print(f"bench/fused.py: the cpp backend is not available: {fastrank.backends()['cpp'].reason}")
        return 1
    rows = []
    print(f"\n## Fused loss ops vs the two-pass path (cpp, batch workload, {W.BATCH_PER_CLASS} per class, "
          f"float32, {torch.get_num_threads()} threads)\n")
    print("| op | B | fwd two-pass ms | fwd fused ms | fwd+bwd two-pass ms | fwd+bwd fused ms | "
          "fwd+bwd speedup | fused fwd+bwd / fwd | fused peak extra / scores |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with fused_switch_restored():
        for op in ops:
            sizes = QUICK_SIZES if args.quick else SIZES[op]
            if args.sizes:
                sizes = [int(b) for b in args.sizes.split(",") if b]
            for B in sizes:
                w = W.build("batch", B)
                forward, full = _calls(op, w)
                fns = {f"{mode}_{path}": _with_path(path, f) for mode, f in (("fwd", forward), ("full", full))
                       for path in PATHS}
                t = _time(fns, args.min_time, args.max_reps)
                extra = peak_extra_bytes(op, w) / (w.scores.numel() * w.scores.element_size()) \
                    if B == sizes[-1] else float("nan")
                row = dict(op=op, B=B, fwd_two_pass_ms=t["fwd_two_pass"] * 1e3, fwd_fused_ms=t["fwd_fused"] * 1e3,
                           full_two_pass_ms=t["full_two_pass"] * 1e3, full_fused_ms=t["full_fused"] * 1e3,
                           full_speedup=t["full_two_pass"] / t["full_fused"],
                           fused_full_over_fwd=t["full_fused"] / t["fwd_fused"], fused_peak_extra_over_scores=extra)
                rows.append(row)
                mem = f"{extra:.2f}" if extra == extra else ""
                print(f"| {op} | {B} | {row['fwd_two_pass_ms']:.3f} | {row['fwd_fused_ms']:.3f} | "
                      f"{row['full_two_pass_ms']:.3f} | {row['full_fused_ms']:.3f} | {row['full_speedup']:.2f}x | "
                      f"{row['fused_full_over_fwd']:.2f} | {mem} |", flush=True)
                del w
    small = [r for r in rows if r["B"] == 64]
    if small:
        print("\nPer-call overhead (B = 64, where the kernel work is a few microseconds): "
              + "; ".join(f"{r['op']} fused {r['full_fused_ms']:.3f} ms vs two-pass {r['full_two_pass_ms']:.3f} ms"
                          for r in small))
    _write(rows, args.out)
    return 0


def _write(rows: List[dict], out: str) -> None:
    if not rows:
        return
    os.makedirs(out, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (f"cpu_fused_{stamp}.csv", "cpu_fused_latest.csv"):
        with open(os.path.join(out, name), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
    print(f"\nwrote {os.path.join(out, f'cpu_fused_{stamp}.csv')} (+ cpu_fused_latest.csv)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for op in dict.fromkeys(r["op"] for r in rows):
        rs = [r for r in rows if r["op"] == op]
        ax.plot([r["B"] for r in rs], [r["full_speedup"] for r in rs], marker="o", label=op)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("B (batch workload, Q = N = B)")
    ax.set_ylabel("two-pass time / fused time (fwd+bwd)")
    ax.set_title("fused loss ops vs the two-pass path, cpp backend")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "cpu_fused_speedup.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
