"""Turning point results into the markdown table, the long-format CSV and the plots."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .measure import OP_DEFS, PointResult, passes
from .op_keys import current_op_key
from .workloads import X_LABEL

# CSV columns: docs/design.md §4's / issue 3's fields first, in the agreed order; the extras after them
CSV_COLUMNS = [
    "op", "backend", "mode", "workload", "x", "p20_ms", "p50_ms", "p80_ms", "peak_extra_bytes",
    "pairs", "pairs_per_s", "pct_ceiling", "status", "device", "torch_version", "triton_version",
    "cuda_version", "git_sha", "timestamp",
    # extras
    "unit", "q", "n", "pair_evals_per_s", "ceiling_evals_per_s", "speedup_vs_naive", "speedup_vs_torch",
    "reps", "threads", "others_cores", "memory_method", "wall_s", "note",
]

CONTENDED = 0.2  # cores used by other processes above which a point's time is flagged †

FUSED = ("cpp", "torch", "triton", "cuda")  # backends whose rank-op rate is compared with the sigma ceiling
_BACKEND_ORDER = ("naive", "torch", "cpp", "triton", "cuda")  # row order in the tables

LEGEND = (
    "pairs: rank ops (sup_ap, smooth_ap, recall_at_k) = Σ_i |P_i|·N per pass; graded ops (h_ap, ndcg) = "
    "Σ_i |ranked_i|·N, the ranked items being the query's super-class (4 classes); histogram ops "
    "(histogram_ap:fastap, histogram_ap:softbin) = "
    "scored items Q·N per pass (column `unit`). Throughput: rank ops in pair evaluations/s (pe/s) = "
    "passes·pairs / p50, with 2 passes in `full` mode (the backward visits every pair again) and 1 in "
    "`forward`/`backward`; histogram ops in items/s (it/s) = items / p50 of the call, whatever the mode. "
    "% ceiling: rank ops on fused backends only, pe/s over the sigma ceiling; histogram ops bin with a "
    "triangular kernel (no transcendental), so no sigma ceiling applies to them. Speed-ups: p50 of naive "
    "(torch) / p50 of this row, same run, same point."
)


@dataclass
class RunInfo:
    """Facts about the run that every row carries."""

    device: str
    torch_version: str
    git_sha: str
    timestamp: str
    threads: int
    ceiling_rate: float  # sigma evaluations/s (NaN when unknown)
    ceiling_text: str
    triton_version: str = ""
    cuda_version: str = ""
    memory_method: str = "VmHWM"  # "VmHWM" (CPU, fresh process per point) or "max_memory_allocated" (CUDA)
    kind: str = "CPU"  # "CPU" or "GPU", for titles


def _ok(r: Optional[PointResult]) -> bool:
    return r is not None and r.status == "ok" and not math.isnan(r.p50_ms)


def _key(r: PointResult, backend: Optional[str] = None) -> Tuple[str, str, str, int, str]:
    s = r.spec
    return s.op, s.mode, s.workload, s.x, backend if backend is not None else s.backend


class Derived:
    """Rates and speed-ups of each point, computed once for the table, CSV and plot."""

    def __init__(self, results: Sequence[PointResult], ceiling_rate: float) -> None:
        self.results = list(results)
        self.ceiling_rate = ceiling_rate
        self._by_key: Dict[Tuple, PointResult] = {_key(r): r for r in self.results}

    def pairs_per_s(self, r: PointResult) -> float:
        """Work per second of one call: pairs/s (rank ops) or items/s (histogram ops)."""
        return r.pairs / (r.p50_ms / 1e3) if _ok(r) and r.p50_ms > 0 else math.nan

    def pair_evals_per_s(self, r: PointResult) -> float:
        """pairs_per_s times the passes of the mode (2 for forward+backward)."""
        return passes(r.spec.mode) * self.pairs_per_s(r)

    def pct_ceiling(self, r: PointResult) -> float:
        if (r.spec.backend not in FUSED or OP_DEFS[r.spec.op].family != "rank"
                or not self.ceiling_rate or math.isnan(self.ceiling_rate)):
            return math.nan
        return self.pair_evals_per_s(r) / self.ceiling_rate * 100

    def speedup(self, r: PointResult, other: str) -> float:
        """p50 of `other` over p50 of `r` at the same op, mode, workload and x (> 1: `r` is faster).

        Only for rows that are meant to beat `other`: nothing on `naive` rows, and
        `torch` rows only against `naive`.
        """
        if r.spec.backend == other or r.spec.backend == "naive" or not _ok(r):
            return math.nan
        o = self._by_key.get(_key(r, other))
        return o.p50_ms / r.p50_ms if _ok(o) else math.nan

    def groups(self) -> List[Tuple[str, str]]:
        """(workload, mode) pairs in first-seen order."""
        seen: Dict[Tuple[str, str], None] = {}
        for r in self.results:
            seen.setdefault((r.spec.workload, r.spec.mode), None)
        return list(seen)


# ----------------------------------------------------------------------------- formatting


def _si(v: float, unit: str = "") -> str:
    if math.isnan(v):
        return "–"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}".rstrip()


def _ms(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _time_cell(r: PointResult) -> str:
    if not _ok(r):
        return r.status.upper()
    mark = " †" if r.others_cores > CONTENDED else ""  # NaN compares False
    if r.reps <= 1:
        return f"{_ms(r.p50_ms)} (1 rep){mark}"
    return f"{_ms(r.p50_ms)} ({_ms(r.p20_ms)}–{_ms(r.p80_ms)}){mark}"


def _mem_cell(r: PointResult) -> str:
    if math.isnan(r.peak_extra_bytes):
        return "–"
    mb = r.peak_extra_bytes / 2**20
    return f"{mb:.3g}" if mb < 100 else f"{mb:.0f}"


def _ratio(v: float) -> str:
    if math.isnan(v):
        return ""
    return f"{v:,.0f}×" if v >= 100 else f"{v:.3g}×"


def _rate_cell(d: Derived, r: PointResult) -> str:
    if not _ok(r):
        return "–"
    if r.unit == "pair":
        return _si(d.pair_evals_per_s(r), "pe/s")
    return _si(d.pairs_per_s(r), "it/s")


def markdown_table(d: Derived) -> str:
    """One table per (workload, mode); failed points show their status, with the reason listed below."""
    head = ["op", "backend", "x", "p50 ms (p20–p80)", "peak extra MiB", "throughput", "% ceiling",
            "vs naive", "vs torch"]
    align = ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"]
    out: List[str] = []
    notes: List[str] = []
    for workload, mode in d.groups():
        rows = [r for r in d.results if (r.spec.workload, r.spec.mode) == (workload, mode)]
        rows.sort(key=lambda r: (list(OP_DEFS).index(r.spec.op) if r.spec.op in OP_DEFS else 99,
                                 _BACKEND_ORDER.index(r.spec.backend) if r.spec.backend in _BACKEND_ORDER else 99,
                                 r.spec.backend, r.spec.x))
        if out:
            out.append("")
        out.append(f"### workload `{workload}` — x = {X_LABEL.get(workload, 'size')}, mode `{mode}`")
        out.append("")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(align) + "|")
        for r in rows:
            pct = d.pct_ceiling(r)
            out.append("| " + " | ".join([
                r.spec.op, r.spec.backend, str(r.spec.x), _time_cell(r), _mem_cell(r), _rate_cell(d, r),
                "" if math.isnan(pct) else f"{pct:.1f}",
                _ratio(d.speedup(r, "naive")), _ratio(d.speedup(r, "torch")),
            ]) + " |")
            if r.status != "ok" and r.note:
                notes.append(f"- {workload}/{mode} {r.spec.op}/{r.spec.backend}/x={r.spec.x}: "
                             f"{r.status} — {r.note}")
    return "\n".join(out + ([""] + notes if notes else []))


# ----------------------------------------------------------------------------- CSV


def _num(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def write_csv(path: str, d: Derived, info: RunInfo) -> None:
    """One row per point (long format), docs/design.md §4's columns first."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in d.results:
            w.writerow({
                "op": r.spec.op, "backend": r.spec.backend, "mode": r.spec.mode, "workload": r.spec.workload,
                "x": r.spec.x, "p20_ms": _num(r.p20_ms), "p50_ms": _num(r.p50_ms), "p80_ms": _num(r.p80_ms),
                "peak_extra_bytes": "" if math.isnan(r.peak_extra_bytes) else int(r.peak_extra_bytes),
                "pairs": r.pairs, "pairs_per_s": _num(d.pairs_per_s(r)), "pct_ceiling": _num(d.pct_ceiling(r)),
                "status": r.status, "device": info.device, "torch_version": info.torch_version,
                "triton_version": info.triton_version, "cuda_version": info.cuda_version,
                "git_sha": info.git_sha, "timestamp": info.timestamp,
                "unit": r.unit, "q": r.q, "n": r.n,
                "pair_evals_per_s": _num(d.pair_evals_per_s(r)), "ceiling_evals_per_s": _num(info.ceiling_rate),
                "speedup_vs_naive": _num(d.speedup(r, "naive")), "speedup_vs_torch": _num(d.speedup(r, "torch")),
                "reps": r.reps, "threads": r.threads, "others_cores": _num(r.others_cores),
                "memory_method": info.memory_method, "wall_s": _num(r.wall_s), "note": r.note,
            })


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_csv(path: str) -> Tuple[List[PointResult], RunInfo]:
    """Results and run facts back from a CSV this module wrote (to re-plot without re-running).

    Op keys of CSVs written before the rename to the public function names are mapped to
    today's (bench/op_keys.py), so an old CSV's rows sort, plot and compare as new ones.
    """
    from .measure import PointSpec

    rows = read_csv(path)
    if not rows:
        raise ValueError(f"{path}: no rows")

    def num(r: Dict[str, str], k: str) -> float:
        return float(r[k]) if r.get(k) else math.nan

    results = [
        PointResult(
            spec=PointSpec(op=current_op_key(r["op"]), backend=r["backend"], x=int(r["x"]), workload=r["workload"],
                           mode=r["mode"]),
            status=r["status"], note=r.get("note", ""), p20_ms=num(r, "p20_ms"), p50_ms=num(r, "p50_ms"),
            p80_ms=num(r, "p80_ms"), reps=int(r.get("reps") or 0), peak_extra_bytes=num(r, "peak_extra_bytes"),
            pairs=int(r["pairs"]), unit=r.get("unit", "pair"), q=int(r.get("q") or 0), n=int(r.get("n") or 0),
            threads=int(r.get("threads") or 0), others_cores=num(r, "others_cores"), wall_s=num(r, "wall_s"),
        )
        for r in rows
    ]
    r0 = rows[0]
    method = r0.get("memory_method", "VmHWM")
    info = RunInfo(
        device=r0["device"], torch_version=r0["torch_version"], git_sha=r0["git_sha"], timestamp=r0["timestamp"],
        threads=int(r0.get("threads") or 0), ceiling_rate=num(r0, "ceiling_evals_per_s"), ceiling_text="",
        triton_version=r0.get("triton_version", ""), cuda_version=r0.get("cuda_version", ""), memory_method=method,
        kind="GPU" if method.startswith("max_memory") else "CPU",
    )
    return results, info


# ----------------------------------------------------------------------------- plot

_COLORS = {"naive": "tab:red", "torch": "tab:blue", "cpp": "tab:green", "triton": "tab:purple",
           "cuda": "tab:orange"}
# unmeasured points sit on the panel's top edge: x = OOM, v = timeout, | = skipped (run budget);
# error / unsupported are listed under the table
_FAIL_MARKERS = {"oom": "x", "timeout": "v", "skipped": "|"}
_MODE_TEXT = {"forward": "forward", "backward": "backward only", "full": "forward+backward"}


def plot(path: str, d: Derived, info: RunInfo, workload: str, mode: str) -> bool:
    """One figure for a (workload, mode): a row per op, time and peak memory vs x, log-log,
    one line per backend. Returns False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a benchmark machine
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator
    from matplotlib.transforms import blended_transform_factory

    rows = [r for r in d.results if (r.spec.workload, r.spec.mode) == (workload, mode)]
    ops = [o for o in OP_DEFS if any(r.spec.op == o for r in rows)]
    if not ops:
        return False
    fig, axes = plt.subplots(len(ops), 2, figsize=(12, 3.2 * len(ops) + 0.8), squeeze=False)
    xs_all = sorted({r.spec.x for r in rows})
    for i, op in enumerate(ops):
        series: Dict[str, List[PointResult]] = {}
        for r in rows:
            if r.spec.op == op:
                series.setdefault(r.spec.backend, []).append(r)
        panels = [
            (axes[i][0], "p50 time [ms]", lambda r: r.p50_ms if _ok(r) else math.nan),
            (axes[i][1], "peak extra memory [MiB]",
             lambda r: r.peak_extra_bytes / 2**20 if _ok(r) and r.peak_extra_bytes > 0 else math.nan),
        ]
        for ax, ylabel, value in panels:
            top = blended_transform_factory(ax.transData, ax.transAxes)  # x in data, y in axes units
            drawn = False
            for backend, rs in series.items():
                color = _COLORS.get(backend, "black")
                pts = [(r.spec.x, value(r)) for r in rs if not math.isnan(value(r))]
                if pts:
                    xs, ys = zip(*sorted(pts))
                    ax.plot(xs, ys, "-", marker="o", ms=4, color=color, label=backend)
                    drawn = True
                for status, marker in _FAIL_MARKERS.items():
                    failed = [r.spec.x for r in rs if r.status == status]
                    if failed:
                        ax.plot(failed, [1.0] * len(failed), marker, ms=9, mew=2, color=color, transform=top,
                                clip_on=False, linestyle="none")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all, [str(x) for x in xs_all], fontsize=7)
            ax.xaxis.set_minor_locator(NullLocator())  # the sizes themselves are the ticks
            if drawn:
                ax.set_yscale("log")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{op} — {ylabel.split(' [')[0]}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        axes[i][0].set_xlabel(X_LABEL.get(workload, "x"), fontsize=8)
        axes[i][1].set_xlabel(X_LABEL.get(workload, "x"), fontsize=8)
    handles = [Line2D([], [], color=_COLORS.get(b, "black"), marker="o", ms=4, label=b)
               for b in _COLORS if any(r.spec.backend == b for r in rows)]
    handles += [Line2D([], [], color="gray", marker=m, linestyle="none", ms=8, mew=2, label=f"{s} (top edge)")
                for s, m in _FAIL_MARKERS.items()]
    height = fig.get_figheight()  # title, then the legend under it, then the panels (in inches from the top)
    fig.suptitle(
        f"fastrank {info.kind} — workload `{workload}`, {_MODE_TEXT.get(mode, mode)} — {info.device}"
        + (f", {info.threads} threads" if info.kind == "CPU" else f", CUDA {info.cuda_version}")
        + f", torch {info.torch_version}, git {info.git_sha}, {info.timestamp}",
        fontsize=9, y=1 - 0.1 / height, va="top",
    )
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.35 / height), ncol=len(handles),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / height))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
