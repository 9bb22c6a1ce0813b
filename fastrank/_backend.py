"""Which backend runs a call: the `backend=` argument, else FASTRANK_BACKEND, else `auto`.

`auto` picks the fastest available backend for the tensor's device: `cpp` on the
CPU when the extension is built, `torch` otherwise. An explicitly requested
backend that cannot run raises with the reason.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Dict, Optional

import torch

BACKENDS = ("naive", "torch", "cpp", "triton", "cuda")
CHOICES = BACKENDS + ("auto",)

_EXT_ERROR: Optional[str] = None
_EXT_LOADED = False
_EXT_LOCK = threading.Lock()


def _load_extension() -> Optional[str]:
    """Imports fastrank._C once; returns None on success or the reason it failed.

    Thread-safe: the flag is set only after the import has finished, under a lock, so a
    thread never sees "loaded" while another is still registering torch.ops.fastrank.*."""
    global _EXT_ERROR, _EXT_LOADED
    if _EXT_LOADED:
        return _EXT_ERROR
    with _EXT_LOCK:
        if not _EXT_LOADED:
            try:
                from . import _C  # noqa: F401  (registers torch.ops.fastrank.*)
            except ImportError as e:  # pragma: no cover - depends on the build
                _EXT_ERROR = (
                    f"the C++ extension fastrank._C is not built or failed to load ({e}); "
                    "build it with `pip install --no-build-isolation -e .` (or `make test`)"
                )
            _EXT_LOADED = True
    return _EXT_ERROR


@dataclass(frozen=True)
class BackendInfo:
    available: bool
    reason: str  # why it is unavailable, or what it runs on

    def __bool__(self) -> bool:
        return self.available


def _has_cuda_kernel() -> bool:
    if _load_extension() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastrank::rank_sums_fwd", "CUDA")


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1, as in CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_info() -> BackendInfo:
    try:
        import triton  # noqa: F401

        from .triton_kernels import rank_sums  # noqa: F401
    except ImportError as e:
        return BackendInfo(False, f"Triton is not importable ({e}); `pip install triton` on a CUDA machine")
    if triton_interpreted():
        return BackendInfo(True, "Triton kernels in the interpreter (TRITON_INTERPRET=1), CPU tensors; slow, for testing")
    if not torch.cuda.is_available():
        return BackendInfo(False, "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 to interpret them on the CPU)")
    return BackendInfo(True, "Triton kernels, CUDA tensors")


def backends() -> Dict[str, BackendInfo]:
    """Each backend, whether it can run here, and why not.

    >>> fastrank.backends()["cpp"]
    BackendInfo(available=True, reason='fused C++ kernels, CPU tensors')
    """
    ext = _load_extension()
    out = {
        "naive": BackendInfo(True, "reference: materialises the Q x N x N tensor, any device"),
        "torch": BackendInfo(True, "pure PyTorch, positive rows only, chunked, any device"),
        "cpp": BackendInfo(ext is None, ext or "fused C++ kernels, CPU tensors"),
        "triton": _triton_info(),
    }
    if ext is not None:
        out["cuda"] = BackendInfo(False, ext)
    elif not _has_cuda_kernel():
        out["cuda"] = BackendInfo(
            False,
            "fastrank was built without CUDA kernels (needs a CUDA build of torch and CUDA_HOME at build time; "
            "FASTRANK_FORCE_CUDA=1 forces it)",
        )
    else:
        out["cuda"] = BackendInfo(True, "fused CUDA kernels, CUDA tensors")
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
            # Provisional order: no GPU benchmark has been run yet (see README, Backends). The
            # CUDA kernels come first because they cover every op; `make gpu-bench` decides.
            if _has_cuda_kernel():
                return "cuda"
            if _triton_info().available:
                return "triton"
        return "torch"
    info = backends()[name]
    if not info.available:
        raise RuntimeError(f"{fn}: backend {name!r} is not available: {info.reason}")
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"{fn}: backend 'cpp' runs on CPU tensors, but `scores` is on {device}")
    if name == "triton" and device.type != "cuda" and not (triton_interpreted() and device.type == "cpu"):
        raise ValueError(f"{fn}: backend 'triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                         f"but `scores` is on {device}")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"{fn}: backend {name!r} runs on CUDA tensors, but `scores` is on {device}")
    return name
