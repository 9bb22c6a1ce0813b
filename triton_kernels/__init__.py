"""Triton kernels of fastrank, installed as `fastrank.triton_kernels`.

rank_sums.py   fused forward/backward of the rank-sums primitive (docs/design.md §1.1)
graded.py      fused forward/backward of the graded rank sums (H-AP, NDCG)
histogram.py   fused soft histograms of histogram AP (FastAP, SoftBin)
loss.py        fused AP / Recall@k losses from the target as given: <= 4 launches, no host sync
_step.py       the step functions as @triton.jit helpers
_common.py     host-side checks, launch configuration and the kernels' shared preambles

On a machine without a GPU, set TRITON_INTERPRET=1 before importing these modules to run
the kernels in Triton's interpreter on CPU tensors (that is how CI tests them).
"""
