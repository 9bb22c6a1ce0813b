"""Where a fused loss call's forward+backward time goes beyond its forward (docs/design.md §2.4).

``python bench/fused_breakdown.py [--ops sup_ap,smooth_ap] [--size 16384] [--reps 6]``

In one process, call by call in turn (so that a change in machine load hits all alike), on the
`batch` workload (4 per class, float32, `cpp` backend, fused path), the median of --reps calls of:

    fwd       the loss under torch.no_grad (with_grad=False: no gradient rows)
    fwd_grad  the loss on scores that require grad, no backward (the rows are written, then freed)
    full      ``(1 - loss).backward()`` (the rows written, then scaled by grad_output in place)
    memory    a fill and an in-place row scaling of a touched tensor of the size of `scores`: the
              memory floor of writing the gradient once and scaling it once

and prints fwd_grad / fwd, full / fwd and what is left of full - fwd once the memory floor is
taken out. Not part of `make bench`: a tool for the question "is the gradient's cost compute or
memory".
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from bench import workloads as W  # noqa: E402
from bench.fused import _calls, _time, fused_switch_restored  # noqa: E402
from bench.measure import OP_DEFS  # noqa: E402


def _memory_floor(scores: torch.Tensor) -> Callable[[], None]:
    """A fill and an in-place row scaling of a touched tensor shaped like `scores`."""
    buf = torch.empty_like(scores)
    buf.fill_(1.0)
    scale = torch.full((scores.shape[0], 1), 0.5, dtype=scores.dtype)

    def memory() -> None:
        buf.fill_(2.0)
        buf.mul_(scale)

    return memory


def _fns(op: str, w: W.Workload, memory: Callable[[], None]) -> Dict[str, Callable[[], None]]:
    forward, full = _calls(op, w)
    call = OP_DEFS[op].call

    def fwd_grad() -> None:
        s = w.scores.detach().requires_grad_()
        call(s, w, "cpp").item()

    return {"fwd": forward, "fwd_grad": fwd_grad, "full": full, "memory": memory}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default="sup_ap,smooth_ap")
    ap.add_argument("--size", type=int, default=16384, help="B (Q = N = B)")
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in ops if o not in OP_DEFS]
    if unknown:
        ap.error(f"unknown ops {unknown}; choose from {', '.join(OP_DEFS)}")
    if args.reps < 1 or args.size < 1:
        ap.error("--reps and --size must be positive")
    import fastrank

    if not fastrank.backends()["cpp"].available:
        print(f"bench/fused_breakdown.py: the cpp backend is not available: {fastrank.backends()['cpp'].reason}")
        return 1
    with fused_switch_restored():
        os.environ["FASTRANK_FUSED"] = "1"
        _run(ops, args.size, args.reps)
    return 0


def _run(ops: List[str], size: int, reps: int) -> None:
    w = W.build("batch", size)
    memory = _memory_floor(w.scores)
    print(f"B = {size}, {torch.get_num_threads()} threads, median of {reps} calls (ms)")
    print("| op | fwd | fwd_grad | full | memory | fwd_grad / fwd | full / fwd | (full - fwd - memory) / fwd |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for op in ops:
        # exactly `reps` rounds: no minimum time
        m = {k: v * 1e3 for k, v in _time(_fns(op, w, memory), float("inf"), reps).items()}
        print(f"| {op} | {m['fwd']:.4g} | {m['fwd_grad']:.4g} | {m['full']:.4g} | {m['memory']:.4g} | "
              f"{m['fwd_grad'] / m['fwd']:.2f} | {m['full'] / m['fwd']:.2f} | "
              f"{(m['full'] - m['fwd'] - m['memory']) / m['fwd']:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
