"""Build fastrank._C: the fused C++ CPU kernels always, the CUDA kernels when possible.

Environment:
  FASTRANK_SKIP_CUDA=1    never build the CUDA kernels
  FASTRANK_FORCE_CUDA=1   build them even when torch.version.cuda / CUDA_HOME look absent
  FASTRANK_CUDA_ARCHS     e.g. "8.0;9.0" (sets TORCH_CUDA_ARCH_LIST)
  MAX_JOBS                parallel compile jobs (read by torch's ninja builder)
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
except ImportError:  # one line, no traceback: this is the most common first-install mistake
    sys.exit(
        "fastrank: PyTorch must be importable at build time. Install torch first, then run "
        "`pip install --no-build-isolation -e .` (or simply `make test`)."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("FASTRANK_SKIP_CUDA"):
        return False
    if _flag("FASTRANK_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extensions():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -Wno-maybe-uninitialized: GCC 12 flags the deliberately undefined vector inside its own
    # AVX-512 intrinsics headers (_mm512_undefined_ps in max/min/rcp14...), used by csrc/cpu/loops.h
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", "-Wno-psabi"]
    include_dirs = [os.path.join(HERE, "csrc")]
    if _want_cuda():
        archs = os.environ.get("FASTRANK_CUDA_ARCHS")
        if archs:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        return [
            CUDAExtension(
                "fastrank._C",
                cpu_sources + cuda_sources,
                include_dirs=include_dirs,
                define_macros=[("FASTRANK_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "fastrank._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
