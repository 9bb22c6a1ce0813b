"""Fused graded_loss vs the two-pass path (FASTRANK_FUSED=0) on cpp: h_ap and ndcg, forward + backward,
float32, relevance from 4-per-class labels with two levels (same class 2, same group of 4 classes 1)."""
import os
import sys
import time

import torch

import fastrank


def bench(fn, scores, rel, reps):
    times = []
    for _ in range(reps + 1):
        s = scores.clone().requires_grad_()
        t0 = time.perf_counter()
        fn(s, rel, backend="cpp").backward()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return times[len(times) // 2]


def main():
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    for b in [int(x) for x in (sys.argv[1:] or ["1024", "4096"])]:
        g = torch.Generator().manual_seed(0)
        emb = torch.nn.functional.normalize(torch.randn(b, 128, generator=g), dim=1)
        labels = torch.arange(b) // 4
        levels = torch.stack([labels // 4, labels], 1)
        rel = fastrank.relevance_from_hierarchy(levels, levels, order="coarsest_first")
        scores = emb @ emb.T
        reps = 7 if b <= 1024 else 3
        for name, fn in (("h_ap", fastrank.h_ap), ("ndcg", fastrank.ndcg)):
            out = {}
            for fused in ("1", "0"):
                os.environ["FASTRANK_FUSED"] = fused
                out[fused] = bench(fn, scores, rel, reps)
            os.environ.pop("FASTRANK_FUSED")
            print(f"B={b} {name}: fused {out['1'] * 1e3:.1f} ms, two-pass {out['0'] * 1e3:.1f} ms, "
                  f"speedup {out['0'] / out['1']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
