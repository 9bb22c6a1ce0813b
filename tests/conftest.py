import os
import subprocess
import sys

import torch

# Triton's interpreter must be chosen before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastrank  # noqa: E402

AVAILABLE = [name for name, info in fastrank.backends().items() if info.available]
CPU_BACKENDS = [b for b in ("naive", "torch", "cpp") if b in AVAILABLE]
FUSED_CPU = [b for b in ("torch", "cpp") if b in AVAILABLE]


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


#: whether the cpp backend's float32 loops are the vector-extension ones of csrc/cpu/vec.h here
#: (the rule of csrc/cpu/loops.h: not with avx512f and fma, which take the hand-written AVX-512
#: loops, nor with FASTRANK_CPU_PORTABLE=1, which takes the scalar loops)
CPP_VECTOR_LOOPS = not {"avx512f", "fma"} <= _cpu_flags() and os.environ.get("FASTRANK_CPU_PORTABLE") != "1"


#: Triton tests: compiled kernels on a GPU, else the interpreter on CPU tensors
TRITON_ON_GPU = os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.cuda.is_available()
TRITON_DEVICE = torch.device("cuda" if TRITON_ON_GPU else "cpu")
triton_gpu_only = pytest.mark.skipif(
    not TRITON_ON_GPU, reason="needs a CUDA GPU (Triton kernels compiled, not interpreted)"
)


def _opcheck_missing():
    """Why torch.library.opcheck cannot run here (its machinery, torch.testing._internal.optests,
    needed expecttest on some torch versions), or None."""
    try:
        import torch.testing._internal.optests  # noqa: F401  (what torch.library.opcheck imports)
    except ImportError as e:
        return f"torch.library.opcheck is unavailable ({e}); `pip install expecttest`"
    return None


def pytest_collection_modifyitems(config, items):
    """Tests named test_opcheck_* (the convention for every torch.library.opcheck test) skip with
    the reason where opcheck's optional dependencies are missing, instead of erroring."""
    why = _opcheck_missing()
    if why is None:
        return
    for item in items:
        if item.name.startswith("test_opcheck"):
            item.add_marker(pytest.mark.skip(reason=why))


def requires(backend: str):
    info = fastrank.backends()[backend]
    return pytest.mark.skipif(not info.available, reason=f"{backend}: {info.reason}")


def compile_ahead_of_time(script: str, timeout: int = 900) -> None:
    """Run `script` (Triton kernels compiled with triton.compile for a GPU target, printing AOT-OK)
    in a process without TRITON_INTERPRET: the interpreter never lowers a kernel, so this is the
    CPU's only check that every variant compiles. Skips where Triton's ptxas is missing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                         check=False)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert out.returncode == 0 and "AOT-OK" in out.stdout, out.stderr[-4000:]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
