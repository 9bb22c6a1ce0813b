"""Loading the compiled extension fastrank._C, once, with the reason when it cannot load."""
from __future__ import annotations

import threading

import torch
from typing import Optional

_EXT_ERROR: Optional[str] = None
_EXT_LOADED = False
_EXT_LOCK = threading.Lock()


# torch.compile runs it once while tracing and keeps the answer (it cannot trace the lock)
@torch.compiler.assume_constant_result
def load_extension() -> Optional[str]:
    """Imports fastrank._C once; returns None on success or the reason it failed.

    Thread-safe: the flag is set only after the import has finished, under a lock, so a
    thread never sees "loaded" while another is still registering torch.ops.fastrank.*."""
    global _EXT_ERROR, _EXT_LOADED
    if _EXT_LOADED:
        return _EXT_ERROR
    with _EXT_LOCK:
        if not _EXT_LOADED:
            try:
                # the extension, not a module of the layers: importing it registers torch.ops.fastrank.*
                from .. import _C  # noqa: F401
            except ImportError as e:  # pragma: no cover - depends on the build
                _EXT_ERROR = (
                    f"the C++ extension fastrank._C is not built or failed to load ({e}); "
                    "build it with `pip install --no-build-isolation -e .` (or `make test`)"
                )
            _EXT_LOADED = True
    return _EXT_ERROR


def empty_cache() -> int:
    """Returns the fused CPU loss ops' cached gradient-rows block to the system; its size in bytes
    (0: none was cached, or the extension is not built).

    A fused loss op on the `cpp` backend writes its (Q, N) gradient rows in the forward. When such a
    block of 4 MiB or more dies (the gradient consumed by the backward of the matmul that made the
    scores, or ``.grad`` dropped), it is kept for the next call instead of going back to the system:
    fresh memory costs the kernel's zeroing of every page at its first touch, which at B = 16384
    took longer than the gradient itself. The cache holds one block, the last one freed, so a
    training loop holds the memory of one gradient between its steps. Call this to return it (e.g.
    before a phase that needs the memory); ``FASTRANK_CACHE_GRAD_ROWS=0`` turns the cache off.

    It also drops the per-thread row scratch the CPU kernels keep between calls with small rows
    (at most 4 MiB per kind of kernel; not counted in the returned size).
    """
    if load_extension() is not None:
        return 0
    return int(torch.ops.fastrank.empty_cache())


def cached_bytes() -> int:
    """The size in bytes of the cached gradient-rows block (see :func:`empty_cache`); 0: none."""
    if load_extension() is not None:
        return 0
    return int(torch.ops.fastrank.cached_grad_rows_bytes())
