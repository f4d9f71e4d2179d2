"""Process-level tuning applied by the CLI and benchmarks (never by library imports)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Keep glibc from returning every large temporary to the OS.

    With glibc's defaults each temporary of 128 KiB or more is fresh ``mmap`` memory and pays
    page faults on first touch; a training step at batch 100 makes dozens of them. Raising the
    mmap and trim thresholds (what ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do at
    start-up) lets them be reused from the heap. Returns whether the settings were applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
        return ok and libc.mallopt(M_TRIM_THRESHOLD, 512 << 20) == 1
    except (OSError, AttributeError):
        return False
