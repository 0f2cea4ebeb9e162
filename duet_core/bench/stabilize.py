"""Make timings comparable on a noisy VM (DESIGN.md, "Timing noise").

The VM's balloon hands freed memory back to the host, so the same run varied by ±70% until every run first dropped
the caches, waited a few seconds and touched ~3 GiB of memory; then ±2%. :func:`stabilize` does exactly that.
"""

from __future__ import annotations

import gc
import os
import time

import numpy as np

from duet_core import residency

PAGE = 4096


def drop_caches() -> None:
    """Write back dirty data, then drop the page cache, dentries and inodes (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def touch_memory(nbytes: int) -> None:
    """Fault in ``nbytes`` of anonymous memory (one write per page), then give it back."""
    if nbytes <= 0:
        return
    buf = np.empty(nbytes, np.uint8)   # large: mmap'd by malloc, so freeing it unmaps it
    buf[::PAGE] = 1
    del buf
    gc.collect()


def evict(path: str) -> int:
    """Drop ``path``'s clean pages from the cache; return how many are still cached (0 unless dirty)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        residency.evict(fd)
        return residency.resident_count(fd)
    finally:
        os.close(fd)


def stabilize(settle_s: float = 1.0, touch_bytes: int = 3 << 30, drop: bool = True) -> None:
    """drop_caches (unless ``drop`` is false), wait ``settle_s``, touch ``touch_bytes`` of memory and free it."""
    if drop:
        drop_caches()
    if settle_s > 0:
        time.sleep(settle_s)
    touch_memory(touch_bytes)
