"""Triton kernels of fastrank, installed as `fastrank.triton_kernels`.

rank_sums.py   fused forward/backward of the rank-sums primitive (SPEC §1.1)
histogram.py   fused soft histograms of histogram AP (FastAP, SoftBin)
_step.py       the step functions as @triton.jit helpers

On a machine without a GPU, set TRITON_INTERPRET=1 before importing these modules to run
the kernels in Triton's interpreter on CPU tensors (that is how CI tests them).
"""
