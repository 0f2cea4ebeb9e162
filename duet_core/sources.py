"""Where page-cache changes come from: the BPF programs, or — where BPF cannot be used — polling residency.

Both sources hand the engine the same thing, :class:`Changes`: merged per (file, 64-page chunk) bitmaps in the
layout of ``pagecache.h``, flush records, and pages lost per scope. The engine never knows which one it has,
except to say so (``Engine.source_name``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple, Protocol

import numpy as np

from duet_core.bpf import MERGE_ENTRIES
from duet_core.bpf.loader import CHUNK_KEY, CHUNK_SHIFT, CHUNK_VAL, SCOPE_CHECK_IGNORE
from duet_core.errors import BpfUnavailable
from duet_core.events import Event, FileId

LOST_STATS = ("lost_map", "lost_folio", "lost_ring")


class Flush(NamedTuple):
    """A writeback episode of one file ended at ``ts_ns`` (CLOCK_MONOTONIC); ``exact``: no dirty page left."""

    fid: FileId
    ts_ns: int
    exact: bool
    gen: int = 0


@dataclass
class Changes:
    keys: np.ndarray                                   # CHUNK_KEY records
    vals: np.ndarray                                   # CHUNK_VAL records, same order
    flushes: list[Flush] = field(default_factory=list)
    lost: dict[tuple[int, int], int] = field(default_factory=dict)        # (dev, subvol) -> pages lost
    lost_all: bool = False                             # lost without a known scope: resync everything


def kernel_mask(mask: Event) -> int:
    """The kernel events a registration mask needs: states are built from events, FLUSHED from DIRTIED."""
    need = mask & (Event.ADDED | Event.REMOVED | Event.DIRTIED | Event.FLUSHED)
    if mask & Event.EXISTS:
        need |= Event.ADDED | Event.REMOVED
    if mask & (Event.MODIFIED | Event.FLUSHED):
        need |= Event.ADDED | Event.REMOVED | Event.DIRTIED | Event.FLUSHED
    return int(need)


class Source(Protocol):
    name: str

    def set_scope(self, dev: int, subvol: int, mask: int, partial: bool) -> None: ...
    def del_scope(self, dev: int, subvol: int) -> None: ...
    def ignore(self, fid: FileId, gen: int) -> None: ...
    def unignore(self, fids: set[FileId]) -> None: ...
    def poll(self) -> Changes: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...


class BpfSource:
    """Page-cache events from the kernel (``pagecache.bpf.c``)."""

    name = "bpf"

    def __init__(self, merge_entries: int = MERGE_ENTRIES, skip_own_reads: bool = False, ring_bytes: int = 0,
                 skip_reads_of: int = 0):
        from duet_core.bpf.build import build
        from duet_core.bpf.loader import PageCacheBpf

        if os.geteuid() != 0:
            raise BpfUnavailable("failed to load BPF: duet is not running as root")
        if not os.path.exists("/sys/kernel/btf/vmlinux"):
            raise BpfUnavailable("failed to load BPF: the kernel has no BTF (/sys/kernel/btf/vmlinux)")
        self.bpf = PageCacheBpf(str(build()), merge_entries=merge_entries,
                                skip_added_tgid=os.getpid() if skip_own_reads else 0, ring_bytes=ring_bytes,
                                skip_added_tgid2=skip_reads_of if skip_own_reads else 0)
        self._lost_seen = 0

    def set_scope(self, dev: int, subvol: int, mask: int, partial: bool) -> None:
        self.bpf.set_scope(dev, subvol, mask | (SCOPE_CHECK_IGNORE if partial else 0))

    def del_scope(self, dev: int, subvol: int) -> None:
        self.bpf.del_scope(dev, subvol)

    def ignore(self, fid: FileId, gen: int) -> None:
        self.bpf.ignore(fid.dev, fid.subvol, fid.ino, gen)

    def unignore(self, fids: set[FileId]) -> None:
        self.bpf.unignore({tuple(f) for f in fids})

    def poll(self) -> Changes:
        drained = self.bpf.drain()
        flushes = [Flush(FileId(r.file.dev, r.file.subvol, r.file.ino), r.ts_ns, bool(r.exact), r.file.gen)
                   for r in self.bpf.flushes()]
        lost = self.bpf.take_lost()
        # Every lost page is counted twice in the kernel: in the per-CPU totals and, if it could, per scope.
        # If the totals grew by more than the per-scope map accounts for, some loss has no scope.
        stats = self.bpf.stats()
        total = sum(stats[k] for k in LOST_STATS)
        unscoped = (total - self._lost_seen) > sum(lost.values())
        self._lost_seen = total
        return Changes(drained.keys, drained.vals, flushes, lost, unscoped)

    def stats(self) -> dict[str, int]:
        return self.bpf.stats()

    def close(self) -> None:
        self.bpf.close()


class PollSource:
    """Fallback without BPF: re-read the residency of every file in scope at each poll and diff it.

    ``files`` returns the (FileId, absolute path) of every file currently in some scope. ADDED and REMOVED are
    exact up to the poll interval (a page added and removed between two polls is not seen); DIRTIED is seen per
    page through cachestat, FLUSHED when a dirty page is found clean. Cost grows with the scope, not the
    event rate, which is why BPF is preferred.
    """

    name = "poll"

    def __init__(self, files: Callable[[], Iterable[tuple[FileId, str]]]):
        from duet_core import residency

        self._res = residency
        self._files = files
        self._scopes: dict[tuple[int, int], int] = {}
        self._resident: dict[FileId, np.ndarray] = {}
        self._dirty: dict[FileId, np.ndarray] = {}
        self._polls = 0

    def set_scope(self, dev: int, subvol: int, mask: int, partial: bool) -> None:
        self._scopes[(dev, subvol)] = mask

    def del_scope(self, dev: int, subvol: int) -> None:
        self._scopes.pop((dev, subvol), None)

    def ignore(self, fid: FileId, gen: int) -> None:  # the poll source only visits files in scope anyway
        pass

    def unignore(self, fids: set[FileId]) -> None:
        pass

    def _snapshot(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """(resident pages, dirty pages) of one file as sorted uint64 arrays."""
        fd = self._res.open_noatime(path)
        try:
            size = os.fstat(fd).st_size
            resident = np.fromiter(self._res.resident_pages(fd, size), np.uint64)
            return resident, self._dirty_pages(fd, resident)
        finally:
            os.close(fd)

    def _dirty_pages(self, fd: int, resident: np.ndarray) -> np.ndarray:
        """Dirty pages among ``resident``: cachestat of the file, then of each 64-page chunk that has any resident
        page, then page by page only inside chunks that report dirty pages."""
        out: list[int] = []
        stat = self._res.cachestat(fd)
        if stat is None or not stat.nr_dirty:
            return np.empty(0, np.uint64)
        span = 64 * 4096
        for chunk in np.unique(resident >> np.uint64(6)).tolist():
            cs = self._res.cachestat(fd, chunk * span, span)
            if cs and cs.nr_dirty:
                out.extend(p for p in range(chunk * 64, chunk * 64 + 64)
                           if (pc := self._res.cachestat(fd, p * 4096, 4096)) and pc.nr_dirty)
        return np.array(out, np.uint64)

    def poll(self) -> Changes:
        keys: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        flushes: list[Flush] = []
        seen: set[FileId] = set()
        for fid, path in self._files():
            if (fid.dev, fid.subvol) not in self._scopes or fid in seen:
                continue
            seen.add(fid)
            try:
                resident, dirty = self._snapshot(path)
            except OSError:
                resident, dirty = np.empty(0, np.uint64), np.empty(0, np.uint64)
            before = self._resident.get(fid, np.empty(0, np.uint64))
            was_dirty = self._dirty.get(fid, np.empty(0, np.uint64))
            added = np.setdiff1d(resident, before, assume_unique=True)
            removed = np.setdiff1d(before, resident, assume_unique=True)
            dirtied = np.setdiff1d(dirty, was_dirty, assume_unique=True)
            cleaned = np.setdiff1d(np.setdiff1d(was_dirty, dirty, assume_unique=True), removed, assume_unique=True)
            self._resident[fid], self._dirty[fid] = resident, dirty
            if len(added) or len(removed) or len(dirtied):
                k, v = _chunk_records(fid, added, removed, dirtied)
                keys.append(k)
                vals.append(v)
            if len(cleaned) and not len(dirty):
                flushes.append(Flush(fid, _now_ns(), True))
        for fid in list(self._resident):
            if fid not in seen:  # left every scope
                del self._resident[fid]
                self._dirty.pop(fid, None)
        self._polls += 1
        if not keys:
            return Changes(np.empty(0, CHUNK_KEY), np.empty(0, CHUNK_VAL), flushes)
        return Changes(np.concatenate(keys), np.concatenate(vals), flushes)

    def stats(self) -> dict[str, int]:
        return {"polls": self._polls, "files": len(self._resident)}

    def close(self) -> None:
        self._resident.clear()
        self._dirty.clear()


def _now_ns() -> int:
    # bpf_ktime_get_ns() is CLOCK_MONOTONIC; the engine compares flush and dirty times on that clock.
    return time.monotonic_ns()


def _chunk_records(fid: FileId, added: np.ndarray, removed: np.ndarray, dirtied: np.ndarray):
    """Pack page lists into CHUNK_KEY/CHUNK_VAL records, as the kernel would have merged them."""
    now = _now_ns()
    chunks = np.unique(np.concatenate([added, removed, dirtied]) >> CHUNK_SHIFT)
    keys = np.zeros(len(chunks), CHUNK_KEY)
    vals = np.zeros(len(chunks), CHUNK_VAL)
    keys["dev"], keys["subvol"], keys["ino"], keys["chunk"] = fid.dev, fid.subvol, fid.ino, chunks
    for name, pages in (("added", added), ("removed", removed), ("dirtied", dirtied)):
        if len(pages):
            idx = np.searchsorted(chunks, pages >> CHUNK_SHIFT)
            np.bitwise_or.at(vals[name], idx, np.left_shift(np.uint64(1), pages & np.uint64(63)))
    vals["present"] = vals["added"]
    vals["first_dirty_ns"] = np.where(vals["dirtied"] != 0, now, 0)
    vals["last_dirty_ns"] = vals["first_dirty_ns"]
    return keys, vals
