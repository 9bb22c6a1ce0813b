"""fp64 parity of every fused op on the GPU backends against `naive`, with host syncs and launches per call.

    python tools/gpu_parity.py --out parity.csv [--backends cuda,triton] [--quick]

For each op (the public function as a user calls it), backend and case it computes the
value and the gradient of the scores in float64 and compares them with `backend="naive"` on
the same device: the tolerances of tests/test_gpu.py (values rtol 1e-10 / atol 1e-12,
gradients rtol 1e-8 / atol 1e-10). On one case per op it then counts, for one warm
forward+backward call, the host synchronisations (`torch.cuda.set_sync_debug_mode("warn")`
turns each into a warning) and the CUDA kernel launches (torch.profiler). A failing op never
stops the sweep: its row records the error's first line.

Runs on CPU tensors too (`--device cpu`, backends naive/torch/cpp; syncs and launches are
then left empty), which is how `make test` checks that this script itself works.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

import fastrank  # noqa: E402

COLUMNS = ("op", "backend", "case", "status", "value_err", "grad_err", "syncs", "launches", "note")
VALUE_TOL = (1e-10, 1e-12)  # rtol, atol
GRAD_TOL = (1e-8, 1e-10)


@dataclass
class Case:
    name: str
    scores: torch.Tensor
    labels: Tuple[torch.Tensor, torch.Tensor]
    ignore: Optional[torch.Tensor]

    @property
    def relevance(self) -> torch.Tensor:
        # two-level hierarchy (class // 3, class): relevance 2 / 1 / 0
        q, g = self.labels
        return fastrank.relevance_from_hierarchy(
            torch.stack([q // 3, q], 1), torch.stack([g // 3, g], 1), order="coarsest_first",
            dtype=self.scores.dtype)


def make_cases(device: torch.device, quick: bool) -> List[Case]:
    """Odd sizes, ties, a query without positives, each ignore form; N = 1 as the edge."""
    gen = torch.Generator().manual_seed(0)

    def case(name: str, q: int, n: int, classes: int, ignore_kind: str, ties: bool) -> Case:
        s = torch.rand(q, n, generator=gen, dtype=torch.float64) * 2 - 1
        if ties:
            s = (s * 10).round() / 10
        glab = torch.randint(classes, (n,), generator=gen)
        qlab = torch.randint(classes + 1, (q,), generator=gen)  # label `classes`: no positive
        ignore = {"none": None, "self": torch.arange(q).clamp(max=n - 1),
                  "mask": torch.rand(q, n, generator=gen) < 0.2}[ignore_kind]
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Case(name, s.to(device), (qlab.to(device), glab.to(device)), to(ignore))

    cases = [case("37x301_ties_self", 37, 301, 6, "self", True)]
    if not quick:
        cases += [case("64x1000_mask", 64, 1000, 9, "mask", False), case("5x1_none", 5, 1, 2, "none", False)]
    return cases


def _ops() -> Dict[str, Callable]:
    """op -> f(scores, case, backend) returning a scalar to differentiate.

    The op is the public function's name, as bench/ keys its ops; a function checked in
    several forms gets a row per form, "<function>:<variant / kind / step>".
    """
    F = fastrank
    return {
        "sup_ap": lambda s, c, b: F.sup_ap(s, c.labels, ignore=c.ignore, backend=b),
        "smooth_ap": lambda s, c, b: F.smooth_ap(s, c.labels, ignore=c.ignore, backend=b),
        "recall_at_k:suprank": lambda s, c, b: F.recall_at_k(s, c.labels, ignore=c.ignore, backend=b),
        "recall_at_k:patel": lambda s, c, b: F.recall_at_k(s, c.labels, ignore=c.ignore, variant="patel",
                                                           backend=b),
        "histogram_ap:fastap": lambda s, c, b: F.histogram_ap(s, c.labels, kind="fastap", ignore=c.ignore,
                                                              backend=b),
        "histogram_ap:softbin": lambda s, c, b: F.histogram_ap(s, c.labels, kind="softbin", ignore=c.ignore,
                                                               backend=b),
        "h_ap:suprank": lambda s, c, b: F.h_ap(s, c.relevance, ignore=c.ignore, backend=b),
        "h_ap:sigmoid": lambda s, c, b: F.h_ap(s, c.relevance, step="sigmoid", ignore=c.ignore, backend=b),
        "ndcg": lambda s, c, b: F.ndcg(s, c.relevance, ignore=c.ignore, backend=b),
    }


OPS = tuple(_ops())


def _value_and_grad(fn: Callable, case: Case, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    s = case.scores.detach().clone().requires_grad_()
    v = fn(s, case, backend)
    v.backward()
    return v.detach(), s.grad


def _err(got: torch.Tensor, ref: torch.Tensor, tol: Tuple[float, float]) -> Tuple[float, bool]:
    """max |got - ref| and whether it is within atol + rtol |ref| everywhere (NaN where ref is NaN)."""
    both_nan = torch.isnan(got) & torch.isnan(ref)
    diff = torch.where(both_nan, torch.zeros_like(got), (got - ref).abs())  # NaN where only one side is
    ok = bool(((diff <= tol[1] + tol[0] * ref.abs()) | both_nan).all())
    return float(diff.max()) if diff.numel() else 0.0, ok


def count_syncs(call: Callable[[], None]) -> int:
    """Host synchronisations of one call: each one is a warning in sync-debug mode "warn"."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def count_launches(call: Callable[[], None]) -> int:
    """CUDA kernels (and memsets/copies issued as kernels) launched by one call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    n = 0
    for e in prof.events():
        dev_type = getattr(e, "device_type", None)
        if dev_type is not None and "CUDA" in str(dev_type) and not str(e.name).startswith("cudaMemcpy"):
            n += 1
    return n


def run(backends: List[str], device: torch.device, quick: bool) -> List[dict]:
    rows: List[dict] = []
    cases = make_cases(device, quick)
    ops = _ops()
    for op, fn in ops.items():
        for ci, case in enumerate(cases):
            try:
                ref_v, ref_g = _value_and_grad(fn, case, "naive")
            except Exception as e:  # noqa: BLE001 - the reference itself failed: record and go on
                rows.append(dict(op=op, backend="naive", case=case.name, status="error",
                                 note=_first_line(e)))
                continue
            for b in backends:
                row = dict(op=op, backend=b, case=case.name)
                try:
                    v, g = _value_and_grad(fn, case, b)
                    ve, vok = _err(v, ref_v, VALUE_TOL)
                    ge, gok = _err(g, ref_g, GRAD_TOL)
                    row.update(status="pass" if vok and gok else "fail", value_err=f"{ve:.3g}", grad_err=f"{ge:.3g}")
                    if ci == 0 and device.type == "cuda":
                        def call(fn=fn, case=case, b=b):
                            s = case.scores.detach().clone().requires_grad_()
                            fn(s, case, b).backward()
                        call()  # warm: compiled kernels, autotune, allocator
                        row["syncs"] = count_syncs(call)
                        row["launches"] = count_launches(call)
                except Exception as e:  # noqa: BLE001
                    row.update(status="error", note=_first_line(e))
                rows.append(row)
                print(f"[parity] {op:20s} {b:7s} {case.name:18s} {row['status']:5s} "
                      f"value {row.get('value_err', '-'):>9s} grad {row.get('grad_err', '-'):>9s} "
                      f"syncs {row.get('syncs', '-')} launches {row.get('launches', '-')} {row.get('note', '')}",
                      flush=True)
    return rows


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def write(path: str, rows: List[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--backends", default=None, help="comma list (default: cuda,triton on cuda; torch,cpp on cpu)")
    p.add_argument("--quick", action="store_true", help="one case per op")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("[parity] no CUDA device: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    wanted = args.backends.split(",") if args.backends else (
        ["cuda", "triton"] if args.device == "cuda" else ["torch", "cpp"])
    info = fastrank.backends()
    backends = []
    rows: List[dict] = []
    for b in wanted:
        if info[b].available:
            backends.append(b)
        else:  # recorded, so the summary says why a backend has no rows
            rows.append(dict(op="*", backend=b, case="*", status="unavailable", note=info[b].reason))
            print(f"[parity] backend {b} unavailable: {info[b].reason}", flush=True)
    try:
        rows += run(backends, torch.device(args.device), args.quick)
    except Exception:  # noqa: BLE001 - keep what ran
        traceback.print_exc()
        rows.append(dict(op="*", backend="*", case="*", status="error", note="sweep aborted, see log"))
    write(args.out, rows)
    bad = sum(1 for r in rows if r["status"] in ("fail", "error"))
    print(f"[parity] {len(rows)} rows, {bad} fail/error -> {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
