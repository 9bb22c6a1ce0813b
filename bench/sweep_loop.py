"""The fused AP sweeps of one row, timed in a C++ loop (docs/design.md §2.4).

``python bench/sweep_loop.py [--n 16384] [--reps 400] [--runs 3]``

Compiles bench/cpp/sweep_loop.cpp against csrc/ (the same header the extension builds, with
the extension's -O3 and its instruction-set clones; the one picked at load time is the
machine's), runs it --runs times per step (sigmoid: Smooth-AP; SupRank: SupAP) and prints, for
one row of N float32 scores against 4 positives, single-threaded, the minimum over --reps of:

    forward   the forward-only sweep
    store     the forward sweep that stores each term's value for the gradient
    grad      the gradient sweep that forms the slopes and writes the row

and store / forward, (store + grad) / forward. No torch process, no threads, no allocation: the
question it answers is what the gradient costs in the loop itself. Not part of `make bench`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
SOURCE = os.path.join(_HERE, "cpp", "sweep_loop.cpp")
STEPS = {"sigmoid": 0, "suprank": 1}


def build(out_dir: str) -> str:
    """Compiles the loop; returns the binary's path. Needs g++ and torch's headers."""
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("bench/sweep_loop.py needs g++ (or c++) on PATH")
    exe = os.path.join(out_dir, "sweep_loop")
    cmd = [cxx, "-std=c++17", "-O3", "-fno-math-errno", "-fopenmp", "-Wno-psabi", "-I", os.path.join(_ROOT, "csrc")]
    for p in include_paths():
        cmd += ["-I", p]
    subprocess.run(cmd + [SOURCE, "-o", exe], check=True)
    return exe


def run(exe: str, n: int, reps: int, step: str) -> Dict[str, float]:
    out = subprocess.run([exe, str(n), str(reps), str(STEPS[step])], check=True, capture_output=True, text=True)
    return {k: float(v) for k, v in (line.split() for line in out.stdout.splitlines())}


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16384, help="row length N")
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--runs", type=int, default=3, help="processes per step")
    args = ap.parse_args(argv)
    if args.n < 4 or args.reps < 1 or args.runs < 1:
        ap.error("--n must be at least 4, --reps and --runs positive")
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(tmp)
        print(f"one row, N = {args.n}, 4 positives, float32, 1 thread, min of {args.reps} (us)")
        print("| step | run | forward | store | grad | store / forward | (store + grad) / forward |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in range(args.runs):
            for step in STEPS:
                t = run(exe, args.n, args.reps, step)
                f, s, g = t["forward_us"], t["store_us"], t["grad_us"]
                print(f"| {step} | {r + 1} | {f:.1f} | {s:.1f} | {g:.1f} | {s / f:.3f} | {(s + g) / f:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
