"""Peak extra host memory of a piece of code, read from /proc (Linux only).

tracemalloc does not see torch's allocations (docs/design.md §4), so we measure the
process's resident set instead: writing "5" to /proc/self/clear_refs resets the
high-water mark VmHWM to the current RSS, and after the code runs
``VmHWM - VmRSS(before)`` is the peak extra memory it needed.

glibc keeps freed blocks around (and raises its mmap threshold after the first
large free), so memory released by a warm-up call can stay resident and be
reused silently by the measured call. `trim_heap` hands it back to the kernel
first, so the measured call has to fault its working set in again and it shows
in VmHWM.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Dict, Optional

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kb() -> Dict[str, int]:
    """The memory lines (VmRSS, VmHWM, ...) of /proc/self/status, in KiB."""
    out: Dict[str, int] = {}
    with open(_STATUS) as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if key.startswith("Vm") and len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0])
    return out


def rss_bytes() -> int:
    """Current resident set size."""
    return _status_kb()["VmRSS"] * 1024


def hwm_bytes() -> int:
    """Peak resident set size since the process started or since the last `reset_peak`."""
    return _status_kb()["VmHWM"] * 1024


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS; False when the kernel does not allow it."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Returns glibc's free heap pages to the kernel (no-op without glibc)."""
    path: Optional[str] = ctypes.util.find_library("c")
    if path is None:
        return
    try:
        libc = ctypes.CDLL(path)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager: ``extra`` = peak RSS inside the block minus RSS on entry (bytes).

    >>> with PeakMemory() as m:
    ...     run()
    >>> m.extra
    """

    def __init__(self) -> None:
        self.baseline = 0
        self.peak = 0
        self.extra = 0
        self.exact = True  # False if VmHWM could not be reset (then peak may predate the block)

    def __enter__(self) -> "PeakMemory":
        trim_heap()
        self.exact = reset_peak()
        self.baseline = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        self.peak = hwm_bytes()
        self.extra = max(0, self.peak - self.baseline)
