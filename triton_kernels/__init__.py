"""Triton kernels of fastrank, installed as `fastrank.triton_kernels`.

Empty until the GPU kernels land (issue #4). Under CI, `TRITON_INTERPRET=1` must be
set before these modules are imported so the kernels run on the CPU.
"""
