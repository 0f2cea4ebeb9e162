"""Which pages of a file are in the page cache right now, without changing that.

Events are hints; this is the truth at the moment a task looks. ``cachestat()`` (Linux 6.5) counts cached pages of
a range in one syscall; ``mmap`` + ``mincore`` names them. :func:`resident_pages` uses the count to avoid the
mapping whenever the answer is "none" or "all", which is the common case.

Neither call reads the file or faults a page in. Open files for them with :func:`open_noatime`: mapping a file
updates its access time (and so dirties the inode) unless it was opened with O_NOATIME. Both calls need the
caller to own the file, be able to write it or be root: otherwise cachestat fails with EPERM (seen on 6.18) and
mincore reports every page as resident.
"""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
import os
from typing import TYPE_CHECKING, NamedTuple

from pyroaring import BitMap

from duet_core.events import PAGE_SIZE

if TYPE_CHECKING:
    import numpy as np

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# cachestat runs once per file of a snapshot: its own prototype lets ctypes convert the arguments without wrappers.
_cachestat_call = _libc["syscall"]
_cachestat_call.restype = ctypes.c_long
_cachestat_call.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]

SYS_CACHESTAT = 451  # x86_64
MAP_FAILED = ctypes.c_void_p(-1).value
MINCORE_WINDOW = 1 << 18  # pages per mapping (1 GiB of file, a 256 KiB vector)
MAX_PAGES = 1 << 32  # page indexes are 32-bit in a BitMap: files up to 16 TiB


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


class CacheStat(NamedTuple):
    """Page counts for a byte range of a file, as ``cachestat(2)`` reports them."""

    nr_cache: int
    nr_dirty: int
    nr_writeback: int
    nr_evicted: int
    nr_recently_evicted: int


def file_pages(size: int) -> int:
    """How many pages a file of ``size`` bytes spans."""
    return (size + PAGE_SIZE - 1) // PAGE_SIZE


def open_noatime(path: str | bytes | os.PathLike, dir_fd: int | None = None) -> int:
    """Open a file read-only for residency checks: O_NOATIME, never through a final symlink (ELOOP).

    O_NOATIME needs ownership or CAP_FOWNER; without it (EPERM) the file is opened without the flag.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return os.open(path, flags, dir_fd=dir_fd)


def cachestat(fd: int, off: int = 0, length: int = 0) -> CacheStat | None:
    """``cachestat(2)`` of bytes ``[off, off + length)`` of ``fd`` (``length`` 0: to the end of the file).

    Returns None when the kernel lacks the syscall (ENOSYS, before Linux 6.5) or will not tell (EPERM: like
    ``mincore`` since Linux 5.2, it shows the page cache of a file only to its owner or to whoever may write it),
    so callers fall back to :func:`mincore_pages` — which then reports only this process's own mappings, i.e.
    nothing cached, and cache hygiene evicts nothing; raises OSError otherwise.
    """
    rng = _CachestatRange(off, length)
    out = _Cachestat()
    rc = _cachestat_call(SYS_CACHESTAT, fd, ctypes.addressof(rng), ctypes.addressof(out), 0)
    if rc < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM):
            return None
        raise OSError(err, f"cachestat: {os.strerror(err)}")
    return CacheStat(out.nr_cache, out.nr_dirty, out.nr_writeback, out.nr_evicted, out.nr_recently_evicted)


def _mincore_window(fd: int, first: int, count: int, vec: ctypes.Array) -> np.ndarray:
    """Indexes (relative to ``first``) of the resident pages among ``count`` pages from page ``first``."""
    import numpy as np  # here: the CLI imports this module for commands that never map a file

    length = count * PAGE_SIZE
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, first * PAGE_SIZE)
    if addr == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap for mincore: {os.strerror(err)}")
    try:
        if _libc.mincore(addr, length, vec) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore: {os.strerror(err)}")
    finally:
        _libc.munmap(addr, length)
    return np.flatnonzero(np.frombuffer(vec, dtype=np.uint8, count=count) & 1)


def mincore_pages(fd: int, size: int) -> BitMap:
    """Page indexes of ``fd`` (first ``size`` bytes) in the page cache, by ``mmap`` + ``mincore``.

    The file is mapped read-only and shared, one window at a time, and never touched, so nothing is faulted in.
    Pages past a shrunken end of file are simply reported absent.
    """
    import numpy as np

    npages = file_pages(size)
    if npages > MAX_PAGES:
        raise OSError(errno.EFBIG, f"file of {size} bytes has more pages than a 32-bit BitMap can index")
    pages = BitMap()
    vec = ctypes.create_string_buffer(min(npages, MINCORE_WINDOW))
    for first in range(0, npages, MINCORE_WINDOW):
        found = _mincore_window(fd, first, min(MINCORE_WINDOW, npages - first), vec)
        pages.update(array.array("I", (found + first).astype(np.uint32).tobytes()))
    return pages


def resident_pages(fd: int, size: int) -> BitMap:
    """Page indexes of the first ``size`` bytes of ``fd`` that are in the page cache now.

    One ``cachestat`` answers the common cases (nothing or everything cached); only a partly cached file is
    mapped and checked page by page with ``mincore``. Does not read the file or change what is cached.
    """
    npages = file_pages(size)
    if npages == 0:
        return BitMap()
    counts = cachestat(fd, 0, npages * PAGE_SIZE)
    if counts is not None:
        if counts.nr_cache == 0:
            return BitMap()
        if counts.nr_cache >= npages:
            return BitMap(range(npages))
    return mincore_pages(fd, size)


def cached_pages(fd: int) -> BitMap:
    """The pages of an open file in the page cache now, for a snapshot of many files: one ``cachestat`` answers
    "none" (the common case), and only a file with cached pages is ``fstat``-ed for its size and looked at closer
    (:func:`resident_pages`)."""
    counts = cachestat(fd)
    if counts is not None and counts.nr_cache == 0:
        return BitMap()
    return resident_pages(fd, os.fstat(fd).st_size)


def resident_count(fd: int) -> int:
    """How many pages of ``fd`` are in the page cache (cachestat, or mincore where cachestat is missing)."""
    counts = cachestat(fd)
    if counts is not None:
        return counts.nr_cache
    return len(mincore_pages(fd, os.fstat(fd).st_size))


def runs_of(pages: BitMap) -> list[tuple[int, int]]:
    """Page set → sorted (first, count) runs. Vectorised: a 1 GiB file is 262,144 pages, and a loop over them in
    Python took 0.1 s per call (a third of a cold scrub's CPU on large files)."""
    if not pages:
        return []
    first, n = pages.min(), len(pages)
    if pages.max() - first + 1 == n:      # one run: the common case, and numpy costs more than it saves here
        return [(first, n)]
    import numpy as np

    a = np.frombuffer(pages.to_array(), dtype=np.uint32).astype(np.int64)
    breaks = np.flatnonzero(np.diff(a) != 1) + 1
    starts = np.concatenate(([0], breaks))
    counts = np.diff(np.concatenate((starts, [len(a)])))
    return list(zip(a[starts].tolist(), counts.tolist()))


def pages_of(ranges: list[tuple[int, int]]) -> BitMap:
    bm = BitMap()
    for first, count in ranges:
        bm.add_range(first, first + count)
    return bm


MAX_DIRTY_RUNS = 4096     # runs of pages asked about one by one; a file with more is asked about as a whole


def unwritten(fd: int, pages: BitMap) -> BitMap:
    """Of ``pages`` (thought modified), those that may still be dirty or under writeback: ``cachestat`` over each run
    of them, and a run where the kernel counts neither is clean now. For when flush events were lost. Conservative:
    a run is kept when cachestat cannot tell, and a file with very many runs is cleared only when wholly clean."""
    runs = runs_of(pages)
    if len(runs) > MAX_DIRTY_RUNS:
        whole = cachestat(fd)
        return BitMap() if whole is not None and not whole.nr_dirty and not whole.nr_writeback else BitMap(pages)
    out = BitMap()
    for first, count in runs:
        counts = cachestat(fd, first * PAGE_SIZE, count * PAGE_SIZE)
        if counts is None or counts.nr_dirty or counts.nr_writeback:
            out.add_range(first, first + count)
    return out


def evict(fd: int, off: int = 0, length: int = 0) -> None:
    """Drop the clean cached pages of ``[off, off + length)`` (``length`` 0: to the end) with fadvise DONTNEED.

    Dirty pages and pages under writeback stay: fsync first to evict everything.
    """
    os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)


def evict_runs(fd: int, runs: list[tuple[int, int]]) -> None:
    """:func:`evict` each page range ``(first page, count)`` of ``runs`` (:func:`runs_of`)."""
    for first, count in runs:
        evict(fd, first * PAGE_SIZE, count * PAGE_SIZE)
