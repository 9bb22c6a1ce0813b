"""Which backend runs a call: the `backend=` argument, else FASTRANK_BACKEND, else `auto`.

`auto` picks, for the tensor's device: `cpp` on the CPU when the extension is built,
`torch` otherwise. On CUDA it prefers the more verified GPU backend: the one that
fastrank/gpu_evidence.json (written by `make gpu-check` on a real GPU) records as
verified, the faster one once both are, and Triton while neither is, since CI runs
every Triton kernel in the interpreter whereas the CUDA C++ kernels are only
compiled there. An explicitly requested backend that cannot run raises with the reason.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .extension import load_extension as _load_extension
from .registry import FAMILIES, LOSS_OPS

BACKENDS = ("naive", "torch", "cpp", "triton", "cuda")
CHOICES = BACKENDS + ("auto",)

@dataclass(frozen=True)
class BackendInfo:
    available: bool
    reason: str  # why it is unavailable, or what it runs on
    #: GPU backends: the committed `make gpu-check` summary that verified it on a real GPU
    #: (a path in the repository), or None while it has never passed there
    gpu_verified: Optional[str] = None

    def __bool__(self) -> bool:
        return self.available


GPU_BACKENDS = ("cuda", "triton")
_EVIDENCE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpu_evidence.json")


def gpu_evidence() -> Dict[str, Optional[str]]:
    """fastrank/gpu_evidence.json: per GPU backend the summary that verified it (or None), and
    `preferred_on_cuda` once a run measured both. Unreadable or absent means nothing verified."""
    try:
        with open(_EVIDENCE_PATH) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        raw = {}
    ev = {b: raw.get(b) if isinstance(raw.get(b), str) else None for b in GPU_BACKENDS}
    pref = raw.get("preferred_on_cuda")
    ev["preferred_on_cuda"] = pref if pref in GPU_BACKENDS and all(ev[b] for b in GPU_BACKENDS) else None
    return ev


def cuda_preference() -> List[str]:
    """The order in which `auto` tries the GPU backends on CUDA tensors (see the module docstring)."""
    ev = gpu_evidence()
    if ev["preferred_on_cuda"]:
        first = ev["preferred_on_cuda"]
    elif ev["cuda"] and not ev["triton"]:
        first = "cuda"
    else:
        first = "triton"
    return [first] + [b for b in GPU_BACKENDS if b != first]


_CUDA_KERNELS: Optional[bool] = None


def _has_cuda_kernel() -> bool:
    """A build has CUDA kernels only if every op family's forward and backward op has one.
    Asked once per process: the registrations are fixed once the extension has loaded."""
    global _CUDA_KERNELS
    if _CUDA_KERNELS is None:
        if _load_extension() is not None:
            return False
        _CUDA_KERNELS = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastrank::{op}", "CUDA")
                            for f in FAMILIES.values() for op in (f.cpp_fwd, f.cpp_bwd))
    return _CUDA_KERNELS


def _available(name: str) -> bool:
    """backends()[name].available without building the table (resolve runs on every call)."""
    if name in ("naive", "torch"):
        return True
    if name == "cpp":
        return _load_extension() is None
    if name == "cuda":
        return _has_cuda_kernel()
    return _triton_info().available


def _verified_note(backend: str, evidence: Optional[str]) -> str:
    if evidence:
        return f"; verified on a GPU by `make gpu-check` ({evidence})"
    how = "run in the Triton interpreter in CI" if backend == "triton" else "compile-checked only, with nvcc -c"
    return f"; not yet verified on a GPU ({how}; `make gpu-check` on a GPU machine records it)"


def fused_losses() -> bool:
    """Whether the losses run as fused loss ops where a backend has them (default), or as the
    rank-sums op plus a PyTorch epilogue (FASTRANK_FUSED=0: the two-pass path, for comparisons)."""
    return os.environ.get("FASTRANK_FUSED", "1") != "0"


_CUDA_LOSS_KERNELS: Dict[str, bool] = {}


def _has_cuda_loss_kernel(loss: str) -> bool:
    """Whether this build registers the fused loss op `loss` (a LOSS_OPS name) for CUDA tensors
    (csrc/cuda/loss_op.cpp: ap_loss, recall_loss). Asked once per op and process."""
    if loss not in _CUDA_LOSS_KERNELS:
        _CUDA_LOSS_KERNELS[loss] = _has_cuda_kernel() and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"fastrank::{LOSS_OPS[loss].name}", "CUDA")
    return _CUDA_LOSS_KERNELS[loss]


def use_fused(backend: str, loss: Optional[str] = None) -> bool:
    """Whether a loss call on the resolved `backend` runs as its fused loss op: on `cpp` every
    loss op; on `triton` the loss ops `loss` (a LOSS_OPS name) that have Triton kernels; on
    `cuda` those this build has CUDA kernels for."""
    if not fused_losses():
        return False
    if backend == "cuda":
        return loss in LOSS_OPS and _has_cuda_loss_kernel(loss)
    return backend == "cpp" or (backend == "triton" and loss in LOSS_OPS and LOSS_OPS[loss].triton)


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1, as in CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_info() -> BackendInfo:
    try:
        import triton  # noqa: F401

        # an availability probe of the optional Triton backend (heavy, imported only when asked)
        from ..triton_kernels import rank_sums  # noqa: F401
    except ImportError as e:
        return BackendInfo(False, f"Triton is not importable ({e}); `pip install triton` on a CUDA machine")
    if triton_interpreted():
        return BackendInfo(True, "Triton kernels in the interpreter (TRITON_INTERPRET=1), CPU tensors; slow, for testing")
    if not torch.cuda.is_available():
        return BackendInfo(False, "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 to interpret them on the CPU)")
    return BackendInfo(True, "Triton kernels, CUDA tensors")


def backends() -> Dict[str, BackendInfo]:
    """Each backend, whether it can run here, and why not; for the GPU backends also whether a
    `make gpu-check` run has verified them on a real GPU (`gpu_verified`: the summary's path).

    >>> fastrank.backends()["cpp"]
    BackendInfo(available=True, reason='fused C++ kernels, CPU tensors', gpu_verified=None)
    """
    ext = _load_extension()
    ev = gpu_evidence()
    tri = _triton_info()
    out = {
        "naive": BackendInfo(True, "reference: materialises the Q x N x N tensor, any device"),
        "torch": BackendInfo(True, "pure PyTorch, positive rows only, chunked, any device"),
        "cpp": BackendInfo(ext is None, ext or "fused C++ kernels, CPU tensors"),
        "triton": BackendInfo(tri.available, tri.reason + _verified_note("triton", ev["triton"]), ev["triton"]),
    }
    if ext is not None:
        cuda = BackendInfo(False, ext)
    elif not _has_cuda_kernel():
        cuda = BackendInfo(
            False,
            "fastrank was built without CUDA kernels (needs a CUDA build of torch and CUDA_HOME at build time; "
            "FASTRANK_FORCE_CUDA=1 forces it)",
        )
    else:
        cuda = BackendInfo(True, "fused CUDA kernels, CUDA tensors")
    out["cuda"] = BackendInfo(cuda.available, cuda.reason + _verified_note("cuda", ev["cuda"]), ev["cuda"])
    return out


def resolve(fn: str, backend: Optional[str], device: torch.device) -> str:
    """The concrete backend name for a call on tensors on `device`."""
    name = backend
    if name is None:
        name = os.environ.get("FASTRANK_BACKEND", "auto") or "auto"
        if name not in CHOICES:
            raise ValueError(
                f"{fn}: environment variable FASTRANK_BACKEND must be one of {', '.join(CHOICES)}, got {name!r}"
            )
    if name == "auto":
        if device.type == "cpu" and _load_extension() is None:
            return "cpp"
        if device.type == "cuda":
            for b in cuda_preference():
                if (b == "cuda" and _has_cuda_kernel()) or (b == "triton" and _triton_info().available):
                    return b
        return "torch"
    if not _available(name):
        raise RuntimeError(f"{fn}: backend {name!r} is not available: {backends()[name].reason}")
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"{fn}: backend 'cpp' runs on CPU tensors, but `scores` is on {device}")
    if name == "triton" and device.type != "cuda" and not (triton_interpreted() and device.type == "cpu"):
        raise ValueError(f"{fn}: backend 'triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                         f"but `scores` is on {device}")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"{fn}: backend {name!r} runs on CUDA tensors, but `scores` is on {device}")
    return name
