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
