"""Turning point results into the markdown table, the long-format CSV and the plot."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .measure import PointResult

# CSV columns: SPEC §4's fields first, in the agreed order; the extras after them
CSV_COLUMNS = [
    "op", "backend", "mode", "workload", "x", "p20_ms", "p50_ms", "p80_ms", "peak_extra_bytes",
    "pairs", "pairs_per_s", "pct_ceiling", "status", "device", "torch_version", "git_sha", "timestamp",
    # extras
    "pair_evals_per_s", "ceiling_evals_per_s", "speedup_vs_naive", "speedup_vs_torch",
    "reps", "threads", "others_cores", "note",
]

CONTENDED = 0.2  # cores used by other processes above which a point's time is flagged †

FUSED = ("cpp", "torch")  # backends whose rate is compared with the σ ceiling


@dataclass
class RunInfo:
    """Facts about the run that every row carries."""

    device: str
    torch_version: str
    git_sha: str
    timestamp: str
    threads: int
    ceiling_rate: float  # σ evaluations/s
    ceiling_text: str
    mode: str = "full"  # forward + backward
    workload: str = "batch"


def _ok(r: Optional[PointResult]) -> bool:
    return r is not None and r.status == "ok" and not math.isnan(r.p50_ms)


class Derived:
    """Rates and speed-ups of each point, computed once for the table, CSV and plot."""

    def __init__(self, results: Sequence[PointResult], ceiling_rate: float) -> None:
        self.results = list(results)
        self.ceiling_rate = ceiling_rate
        self._by_key: Dict[Tuple[str, str, int], PointResult] = {
            (r.spec.op, r.spec.backend, r.spec.B): r for r in self.results
        }

    def pairs_per_s(self, r: PointResult) -> float:
        return r.pairs / (r.p50_ms / 1e3) if _ok(r) else math.nan

    def pair_evals_per_s(self, r: PointResult) -> float:
        # the backward visits every pair again, so fwd+bwd is two evaluations per pair
        return 2 * self.pairs_per_s(r)

    def pct_ceiling(self, r: PointResult) -> float:
        if r.spec.backend not in FUSED or not self.ceiling_rate:
            return math.nan
        return self.pair_evals_per_s(r) / self.ceiling_rate * 100

    def speedup(self, r: PointResult, other: str) -> float:
        """p50 of `other` over p50 of `r` at the same op and B (> 1: `r` is faster).

        Only for rows that are meant to beat `other`: nothing on `naive` rows, and
        `torch` rows only against `naive`.
        """
        if r.spec.backend == other or r.spec.backend == "naive" or not _ok(r):
            return math.nan
        o = self._by_key.get((r.spec.op, other, r.spec.B))
        return o.p50_ms / r.p50_ms if _ok(o) else math.nan


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


def markdown_table(d: Derived) -> str:
    """The terminal table; failed points show their status, with the reason listed below."""
    head = [
        "op", "backend", "B", "p50 ms (p20–p80)", "peak extra MiB", "pair evals/s",
        "% ceiling", "speed-up vs naive", "vs torch",
    ]
    align = ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    notes: List[str] = []
    for r in d.results:
        pct = d.pct_ceiling(r)
        lines.append("| " + " | ".join([
            r.spec.op, r.spec.backend, str(r.spec.B), _time_cell(r), _mem_cell(r),
            _si(d.pair_evals_per_s(r), "/s") if _ok(r) else "–",
            "" if math.isnan(pct) else f"{pct:.1f}",
            _ratio(d.speedup(r, "naive")), _ratio(d.speedup(r, "torch")),
        ]) + " |")
        if r.status != "ok" and r.note:
            notes.append(f"- {r.spec.op}/{r.spec.backend}/B={r.spec.B}: {r.status} — {r.note}")
    return "\n".join(lines + ([""] + notes if notes else []))


# ----------------------------------------------------------------------------- CSV


def _num(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def write_csv(path: str, d: Derived, info: RunInfo) -> None:
    """One row per point (long format), SPEC §4's columns first."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in d.results:
            w.writerow({
                "op": r.spec.op, "backend": r.spec.backend, "mode": info.mode, "workload": r.spec.workload,
                "x": r.spec.B, "p20_ms": _num(r.p20_ms), "p50_ms": _num(r.p50_ms), "p80_ms": _num(r.p80_ms),
                "peak_extra_bytes": "" if math.isnan(r.peak_extra_bytes) else int(r.peak_extra_bytes),
                "pairs": r.pairs, "pairs_per_s": _num(d.pairs_per_s(r)), "pct_ceiling": _num(d.pct_ceiling(r)),
                "status": r.status, "device": info.device, "torch_version": info.torch_version,
                "git_sha": info.git_sha, "timestamp": info.timestamp,
                "pair_evals_per_s": _num(d.pair_evals_per_s(r)), "ceiling_evals_per_s": _num(info.ceiling_rate),
                "speedup_vs_naive": _num(d.speedup(r, "naive")), "speedup_vs_torch": _num(d.speedup(r, "torch")),
                "reps": r.reps, "threads": r.threads, "others_cores": _num(r.others_cores), "note": r.note,
            })


# ----------------------------------------------------------------------------- plot

_COLORS = {"naive": "tab:red", "torch": "tab:blue", "cpp": "tab:green", "triton": "tab:purple", "cuda": "tab:orange"}
_STYLES = {"supap": "-", "smoothap": "--"}


def plot(path: str, d: Derived, info: RunInfo) -> None:
    """Two log-log panels (time, peak memory vs B); failed points as an 'x' on the top edge."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a benchmark machine
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator
    from matplotlib.transforms import blended_transform_factory

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    series: Dict[Tuple[str, str], List[PointResult]] = {}
    for r in d.results:
        series.setdefault((r.spec.op, r.spec.backend), []).append(r)

    panels = [
        (axes[0], "p50 fwd+bwd time [ms]", lambda r: r.p50_ms if _ok(r) else math.nan),
        (axes[1], "peak extra memory [MiB]",
         lambda r: r.peak_extra_bytes / 2**20 if _ok(r) and r.peak_extra_bytes > 0 else math.nan),
    ]
    for ax, ylabel, value in panels:
        top = blended_transform_factory(ax.transData, ax.transAxes)  # x in data, y in axes units
        for (op, backend), rs in series.items():
            color = _COLORS.get(backend, "black")
            pts = [(r.spec.B, value(r)) for r in rs if not math.isnan(value(r))]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, _STYLES.get(op, ":"), marker="o", ms=4, color=color, label=f"{op} / {backend}")
            failed = [r.spec.B for r in rs if r.status != "ok"]
            if failed:
                ax.plot(failed, [1.0] * len(failed), "x", ms=9, mew=2, color=color, transform=top, clip_on=False)
        ax.set_xscale("log", base=2)
        bs = sorted({r.spec.B for r in d.results})
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.xaxis.set_minor_locator(NullLocator())  # the B values themselves are the ticks
        ax.set_yscale("log")
        ax.set_xlabel("B (Q = N = B, 4 per class)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"fastrank CPU `{info.workload}` fwd+bwd — {info.device}, {info.threads} threads, "
        f"torch {info.torch_version}, {info.git_sha}   (x on top edge: OOM / timeout / error)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
