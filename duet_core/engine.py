"""The core event engine: registrations over path scopes, fed by one shared event source.

A registration is ``(name, mask, path)``. The engine turns the path into a :class:`~duet_core.scope.Scope` (the
files under it, with the (superblock, subvolume) pairs they live on), tells the source which pairs to watch,
and fans every drained change out to the registrations whose scope holds the file. Merged chunk records are
turned into page sets with numpy, so no Python code runs per page.

One copy of each file's state (pages EXISTS, pages MODIFIED) is kept for all registrations; each registration
keeps only what it has not fetched yet: event pages, or the state it last reported (so that a change undone
before the next fetch cancels out, as in Duet).
"""

from __future__ import annotations

import logging
import os
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pyroaring import BitMap

from duet_core import residency
from duet_core.bpf import MERGE_ENTRIES
from duet_core.errors import BpfUnavailable, DuetError, require_directory
from duet_core.events import EVENTS, STATES, Batch, Event, FileId
from duet_core.exclude import NOTHING, Exclusions
from duet_core.identity import DevMap, file_id
from duet_core.scope import Scope
from duet_core.snapshotter import SnapshotChild
from duet_core.sources import BpfSource, Changes, PollSource, Source, kernel_mask

log = logging.getLogger("duet.engine")

MAX_PAGE = (1 << 32) - 1        # page bitmaps are 32-bit roaring: files up to 16 TiB
RESCAN_MIN_S = 1.0              # at most one rescan per second when unknown files show up
RESCAN_EVERY_S = 30.0           # and one every 30 s regardless, to notice files moved into a scope
MAX_HELD = 1 << 20              # chunk records of unknown files held while a rescan resolves them
CHECK_EVERY = 4096              # a registration looks for a stop (Engine.checkpoint) every this many files


SMALL_WORDS = 64                # below this many words, pages are listed one by one (cheaper than a roaring stream)
ARRAY_MAX = 4096                # roaring: a container (65,536 pages) of more pages than this is a bitset
_NO_RUN_COOKIE = 12346          # roaring's portable format without run containers (SERIAL_COOKIE_NO_RUNCONTAINER)


def mask_pages(chunks: np.ndarray, masks: np.ndarray) -> BitMap:
    """The pages of the set bits (page = chunk * 64 + bit) of parallel arrays of word numbers and 64-bit masks.

    A few words: their pages listed, and a bitmap built from the list. More: the bitmap is written directly in
    roaring's portable format and deserialized (:func:`_roaring_of_words`) — a container of more than 4,096 pages
    is a bitset, which is the words themselves in place — so a drain of random reads (60,000 pages in 6,000
    words) costs 0.06 ms instead of 1.4 ms, and no step runs per page of a dense container.
    """
    chunks = np.asarray(chunks, np.uint64)
    masks = np.asarray(masks, np.uint64)
    keep = masks != 0
    if len(chunks) and int(chunks.max()) > MAX_PAGE >> 6:
        keep &= chunks <= np.uint64(MAX_PAGE >> 6)
    if not keep.all():
        chunks, masks = chunks[keep], masks[keep]
    if not len(masks):
        return BitMap()
    if len(masks) < SMALL_WORDS:
        return BitMap(array("I", _pages_of_words(chunks, masks).astype(np.uint32).tobytes()))
    if len(chunks) > 1 and not (chunks[1:] > chunks[:-1]).all():   # sorted, one mask per word
        order = np.argsort(chunks, kind="stable")
        chunks, masks = chunks[order], masks[order]
        first = np.flatnonzero(np.r_[True, chunks[1:] != chunks[:-1]])
        chunks, masks = chunks[first], np.bitwise_or.reduceat(masks, first)
    return _roaring_of_words(chunks, masks)


def _pages_of_words(chunks: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Page numbers (uint64) of the set bits, word by word in the order given. One flat bit array: bit i of word
    r is at r * 64 + i, so its index gives both."""
    bits = np.unpackbits(np.ascontiguousarray(masks, dtype="<u8").view(np.uint8), bitorder="little")
    idx = np.flatnonzero(bits)
    return (chunks << np.uint64(6))[idx >> 6] + (idx & 63).astype(np.uint64)


def _roaring_of_words(chunks: np.ndarray, masks: np.ndarray) -> BitMap:
    """A BitMap from sorted, distinct, non-zero words, through roaring's portable serialization: a cookie and the
    number of containers; per container its key (the high 16 bits of its pages) and cardinality less one; per
    container its byte offset; then each container — 1,024 words (a bitset) when it has more than 4,096 pages,
    else its pages' low 16 bits in order (an array)."""
    keys = (chunks >> np.uint64(10)).astype(np.int64)
    first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    card = np.add.reduceat(np.bitwise_count(masks).astype(np.int64), first)
    bounds = np.r_[first, len(keys)].tolist()
    dense = card > ARRAY_MAX
    n = len(first)
    low = None
    if not dense.all():
        sparse = np.ones(len(keys), bool)
        for i in np.flatnonzero(dense).tolist():
            sparse[bounds[i]:bounds[i + 1]] = False
        low = (_pages_of_words(chunks[sparse], masks[sparse]) & np.uint64(0xFFFF)).astype("<u2")
    sizes = np.where(dense, 8192, 2 * card)
    head = 8 + 8 * n
    offsets = head + np.r_[0, np.cumsum(sizes)[:-1]]
    out = np.zeros(head + int(sizes.sum()), np.uint8)
    out[:8].view("<u4")[:] = (_NO_RUN_COOKIE, n)
    desc = out[8:8 + 4 * n].view("<u2")
    desc[0::2] = keys[first]
    desc[1::2] = card - 1
    out[8 + 4 * n:head].view("<u4")[:] = offsets
    taken = 0
    for i, (off, c) in enumerate(zip(offsets.tolist(), card.tolist())):
        if dense[i]:
            a, e = bounds[i], bounds[i + 1]
            out[off:off + 8192].view("<u8")[(chunks[a:e] & np.uint64(1023)).astype(np.int64)] = masks[a:e]
        else:
            out[off:off + 2 * c].view("<u2")[:] = low[taken:taken + c]
            taken += c
    return BitMap.deserialize(out.tobytes())


@dataclass
class FileState:
    """What the engine knows of one file's pages, shared by every registration."""

    exists: BitMap = field(default_factory=BitMap)
    modified: BitMap = field(default_factory=BitMap)
    dirty_ns: dict[int, int] = field(default_factory=dict)   # chunk -> last dirtying seen (ktime ns)
    last_flush_ns: int = 0                                   # last exact flush (every page clean then)
    last_dirty_ns: int = 0                                   # last dirtying seen, flushed or not


@dataclass
class Registration:
    """A handle returned by :meth:`Engine.register`."""

    id: int
    name: str
    mask: Event
    scope: Scope
    pending: dict[FileId, dict[Event, BitMap]] = field(default_factory=dict)   # event pages not fetched yet
    reported: dict[FileId, tuple[BitMap, BitMap]] = field(default_factory=dict)  # state last fetched
    touched: set[FileId] = field(default_factory=set)                        # state may have changed
    resync: bool = False

    @property
    def path(self) -> str:
        return self.scope.root


class Engine:
    """Registrations, one event source, and the merged state between them.

    ``source`` is ``"bpf"``, ``"poll"`` or ``"auto"`` (BPF if it loads, else polling with a one-line warning).
    ``interval`` is how stale a fetch may be: a fetch drains the source if the last drain is older.
    ``skip_own_reads``: pages this process itself brings into the cache are not reported as ADDED (duet run
    measures its own reads with cachestat; the events would only cost it time) — nor those of process
    ``skip_reads_of``, if given: the run's other process (``duet run --jobs 2``, :mod:`duet_core.jobs`).
    """

    def __init__(self, source: str = "auto", interval: float = 0.1, merge_entries: int = MERGE_ENTRIES,
                 skip_own_reads: bool = False, ring_bytes: int = 0, skip_reads_of: int = 0):
        self.interval = interval
        self.regs: dict[int, Registration] = {}
        self.files: dict[FileId, FileState] = {}
        self.scopes: dict[tuple[str, bool], Scope] = {}
        self.source_warning: str | None = None
        self._next_id = 1
        self._last_drain = 0.0
        self._last_rescan = time.monotonic()
        self._held: list[Changes] = []
        self._kernel_pairs: set[tuple[int, int]] = set()
        self.on_rescan = None   # called as on_rescan(scope, diff) after each rescan that found changes
        # Called between files of a registration's start-up snapshot (a pass over a whole scope, seconds for a large
        # one); it may raise to abandon the registration (duet run: errors.Stopped on SIGTERM).
        self.checkpoint: Callable[[], None] = lambda: None
        self._dropped_pairs: set[tuple[int, int]] = set()
        self._held_records = 0
        self.counters = {"drains": 0, "records": 0, "pages_added": 0, "pages_removed": 0, "pages_dirtied": 0,
                         "pages_flushed": 0, "flushes_partial": 0, "resyncs": 0, "unknown_ignored": 0}
        self.source: Source = self._open_source(source, merge_entries, skip_own_reads, ring_bytes, skip_reads_of)
        # True when every ADDED page this engine reports was brought in by another process (polling cannot tell).
        self.own_reads_skipped = skip_own_reads and isinstance(self.source, BpfSource)

    # -- source ----------------------------------------------------------------------------------------------------
    def _open_source(self, kind: str, merge_entries: int, skip_own_reads: bool, ring_bytes: int = 0,
                     skip_reads_of: int = 0) -> Source:
        if kind not in ("auto", "bpf", "poll"):
            raise DuetError(f"unknown event source {kind!r}", hint="use auto, bpf or poll")
        if kind in ("auto", "bpf"):
            try:
                return BpfSource(merge_entries=merge_entries, skip_own_reads=skip_own_reads, ring_bytes=ring_bytes,
                                 skip_reads_of=skip_reads_of)
            except BpfUnavailable as exc:
                if kind == "bpf":
                    raise
                self.source_warning = f"BPF unavailable ({exc}); polling page-cache residency instead"
                log.info("%s", self.source_warning)   # callers show source_warning once
        return PollSource(self._all_files)

    @property
    def source_name(self) -> str:
        return self.source.name

    def _all_files(self):
        for scope in self.scopes.values():
            for fid, rel in scope.files.items():
                yield fid, os.path.join(scope.root, rel)

    # -- registrations ---------------------------------------------------------------------------------------------
    def register(self, name: str, mask: Event | int, path: str, one_file_system: bool = False,
                 scope: Scope | None = None, snapshot=None, exclude: Exclusions = NOTHING) -> Registration:
        """Watch ``path`` for the events/states in ``mask``; files already cached are reported as EXISTS.

        ``exclude``: what of the tree below ``path`` is not watched (:mod:`duet_core.exclude`).
        ``scope``: a Scope of ``path`` the caller has already scanned (duet run records the scan in its state).
        ``snapshot``: the ``(fid, relpath)`` pairs whose residency to read now (default: every file of the scope) —
        fewer when the caller cares only about some files (duet run: those a task still needs; none for a second
        registration of a scope read already) — or the :class:`SnapshotChild` that :meth:`start_snapshot` started
        for this scope, whose findings are recorded instead. Cached files the engine knows of are reported either
        way.
        """
        mask = Event(mask)
        if not mask & (EVENTS | STATES):
            raise DuetError(f"registration {name!r} asks for no events")
        require_directory(path)
        root = os.path.realpath(path)
        key = (root, one_file_system, exclude)
        if scope is not None:
            self.scopes[key] = scope
        scope = self.scopes.get(key)
        if scope is None:
            scope = Scope(root, one_file_system=one_file_system, exclude=exclude)
            for _ in scope.scan():
                pass
            self.scopes[key] = scope
        reg = Registration(self._next_id, name, mask, scope)
        self._next_id += 1
        self.regs[reg.id] = reg
        self._sync_kernel_scopes()
        # Snapshot after the kernel filter is in place, so nothing falls between the two.
        self._snapshot(scope, snapshot, [reg])
        if reg.mask & STATES:
            for n, fid in enumerate(self.files):
                if not n % CHECK_EVERY:
                    self.checkpoint()
                if fid in scope.files:
                    reg.touched.add(fid)
        return reg

    def unregister(self, reg: Registration) -> None:
        self.regs.pop(reg.id, None)
        if not any(r.scope is reg.scope for r in self.regs.values()):
            self.scopes = {k: s for k, s in self.scopes.items() if s is not reg.scope}
            self.files = {fid: st for fid, st in self.files.items()
                          if any(fid in s.files for s in self.scopes.values())}
        self._sync_kernel_scopes()

    def start_snapshot(self, path: str, mask: Event | int, one_file_system: bool = False,
                       exclude: Exclusions = NOTHING) -> SnapshotChild | None:
        """Start reading what is cached under ``path`` in a child process now, before the caller scans the scope and
        registers it with ``snapshot=`` the child (duet run scans, syncs and plans meanwhile).

        The kernel filter is given the pair of ``path`` itself first (watched for ``mask``, the mask of the
        registration to come), so every change after the child reads a file is an event; the child reads only
        files on that pair. None when the source is not BPF (a poll source has no such ordering to keep) or the
        child cannot be started: the registration then reads residency itself, as without this call.
        """
        if self.source.name != "bpf":
            return None
        root = os.path.realpath(path)
        try:
            info = DevMap().info(os.stat(root).st_dev, root)
        except (OSError, DuetError) as exc:
            log.info("start-up snapshot stays in-process: %s", exc)
            return None
        pair = (info.dev, info.subvol)
        self.source.set_scope(*pair, kernel_mask(Event(mask)), True)   # partial: nothing is ignored yet anyway
        self._kernel_pairs.add(pair)
        try:
            return SnapshotChild(root, {pair}, one_file_system, exclude)
        except OSError as exc:
            log.info("start-up snapshot stays in-process: cannot start its process: %s", exc)
            return None

    def _sync_kernel_scopes(self) -> None:
        """Give the source the union of every registration's (dev, subvol) pairs and event masks."""
        want: dict[tuple[int, int], list] = {}
        for reg in self.regs.values():
            for pair, partial in reg.scope.pairs().items():
                entry = want.setdefault(pair, [0, True])
                entry[0] |= kernel_mask(reg.mask)
                entry[1] = entry[1] and partial
        for pair in self._dropped_pairs:
            if pair in want:
                want[pair][1] = True      # the kernel must consult the ignore set there now
        for pair, (mask, partial) in want.items():
            self.source.set_scope(pair[0], pair[1], mask, partial)
        for pair in self._kernel_pairs - set(want):
            self.source.del_scope(*pair)
        self._kernel_pairs = set(want)

    def _snapshot(self, scope: Scope, files, regs: list[Registration]) -> None:
        """Read the residency of ``files``, ``(fid, relpath)`` pairs (None: every file of the scope), (cachestat, then
        mincore) into the shared state — or record what a :class:`SnapshotChild` read.

        One ``open`` + ``cachestat`` + ``close`` per file; only a file with pages in the cache is ``fstat``-ed and,
        if partly cached, checked page by page. The whole scope is opened directory by directory
        (:meth:`Scope.open_all`), named files beneath the scope's root, which stays open for the pass.
        """
        state_regs = [reg for reg in regs if reg.mask & STATES]
        if isinstance(files, SnapshotChild):
            self._take_snapshot(scope, files, state_regs)
            return
        if files is None:
            for fid, fd in scope.open_all():
                self.checkpoint()
                self._record(fid, fd, state_regs)
            return
        with scope.opener() as open_file:
            for fid, rel in files:
                self.checkpoint()
                try:
                    fd = open_file(rel)
                except OSError:
                    continue
                try:
                    self._record(fid, fd, state_regs)
                finally:
                    os.close(fd)

    def _take_snapshot(self, scope: Scope, child: SnapshotChild, state_regs: list[Registration]) -> None:
        """Record what the child found cached (files of the scope only), then read in-process the files on pairs
        it did not cover; if it failed, read the whole scope in-process instead."""
        try:
            for fid, pages in child.results(checkpoint=self.checkpoint):
                self.checkpoint()
                if fid in scope.files:
                    self._record_pages(fid, pages, state_regs)
        finally:
            child.close()
        if not child.complete:
            log.warning("the start-up snapshot's process failed (%s); reading residency in-process", child.error)
            self._snapshot(scope, None, state_regs)
            return
        rest = [pair for pair in scope.files.pairs() if pair not in child.pairs]
        if rest:
            self._snapshot(scope, scope.files.items(rest), state_regs)

    def _record(self, fid: FileId, fd: int, state_regs: list[Registration]) -> None:
        """One open file's residency into the shared state (left as it was if it cannot be read)."""
        try:
            pages = residency.cached_pages(fd)
        except OSError:
            return
        self._record_pages(fid, pages, state_regs)
        st = self.files.get(fid)
        if st is not None and st.modified:   # a resync after lost flush records: what the kernel wrote back is clean
            try:
                st.modified = residency.unwritten(fd, st.modified)
            except OSError:
                pass

    def _record_pages(self, fid: FileId, pages: BitMap, state_regs: list[Registration]) -> None:
        """A file's cached pages, as a snapshot read them, into the shared state."""
        st = self.files.get(fid)
        if st is None:
            if not pages:
                return
            st = self.files[fid] = FileState()
        st.exists = BitMap(pages)
        st.modified &= st.exists
        for reg in state_regs:
            reg.touched.add(fid)

    # -- fetching --------------------------------------------------------------------------------------------------
    def pump(self, force: bool = False) -> None:
        """Drain the source if the last drain is older than the interval (or ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_drain < self.interval:
            return
        self._last_drain = now
        self._apply(self.source.poll())
        if now - self._last_rescan > RESCAN_EVERY_S or (self._held and now - self._last_rescan > RESCAN_MIN_S):
            self._rescan()

    def fetch(self, reg: Registration) -> Batch:
        """Items for ``reg`` since its last fetch: event pages, or state changes, as runs of pages."""
        self.pump()
        fids: list[FileId] = []
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

        def add(fid: FileId, runs) -> None:
            if runs is not None:
                fids.append(fid)
                parts.append(runs)

        if reg.mask & EVENTS:
            pending, reg.pending = reg.pending, {}
            for fid, per_event in pending.items():
                add(fid, _runs([(ev & reg.mask, pages) for ev, pages in per_event.items()]))
        if reg.mask & STATES:
            touched, reg.touched = reg.touched, set()
            for fid in touched:
                add(fid, self._state_runs(reg, fid))
        resync, reg.resync = reg.resync, False
        if not parts:
            return Batch.empty(resync)
        file = np.repeat(np.arange(len(parts)), [len(p[0]) for p in parts])
        return Batch(fids, file, *(np.concatenate([p[k] for p in parts]) for k in range(3)), resync=resync)

    def drop(self, fid: FileId, gen: int) -> None:
        """No registration of this engine needs ``fid``'s events any more (every task is done with it): have the
        kernel drop them at the source, as Duet's per-task bitmaps did. ``gen`` is the inode generation."""
        pair = (fid.dev, fid.subvol)
        self.source.ignore(fid, gen)
        if pair not in self._dropped_pairs:
            self._dropped_pairs.add(pair)
            self._sync_kernel_scopes()

    def quiet(self, *regs: Registration | None) -> bool:
        """Nothing new for any of ``regs`` (None ones ignored) since their last fetch: no events, no state change,
        no resync. Drains the source first, as a fetch would; lets a caller skip its fetches in a busy loop."""
        self.pump()
        return not any(r is not None and (r.pending or r.touched or r.resync) for r in regs)

    def fetch_touched(self, reg: Registration) -> tuple[set[FileId], bool]:
        """For a state registration that reads the shared state itself (``engine.files``) instead of items: the
        files whose state may have changed since the last call, and the resync flag. Much cheaper than
        :meth:`fetch` when many files change; do not mix the two on one registration."""
        self.pump()
        touched, reg.touched = reg.touched, set()
        resync, reg.resync = reg.resync, False
        return touched, resync

    def _state_runs(self, reg: Registration, fid: FileId):
        st = self.files.get(fid)
        exists = st.exists if st else BitMap()
        modified = st.modified if st else BitMap()
        old_e, old_m = reg.reported.get(fid, (BitMap(), BitMap()))
        parts = []
        if reg.mask & Event.EXISTS:
            changed = exists ^ old_e
            if changed:
                parts += [(Event.EXISTS, exists & changed), (Event(0), changed - exists)]
        if reg.mask & Event.MODIFIED:
            changed = modified ^ old_m
            if changed:
                # Report the page's whole state, so an item's flags never contradict another item's.
                parts += [(Event.MODIFIED, modified & changed), (Event(0), changed - modified)]
                if reg.mask & Event.EXISTS:
                    parts.append((Event.EXISTS, exists & changed))
        if exists or modified:
            reg.reported[fid] = (BitMap(exists), BitMap(modified))
        else:
            reg.reported.pop(fid, None)
        return _runs(parts)

    def path_of(self, reg: Registration, fid: FileId) -> str | None:
        """The file's path, only if it is still inside ``reg``'s scope and still that file (like Duet's get_path)."""
        rel = reg.scope.files.get(fid)
        if rel is None:
            return None
        path = os.path.join(reg.scope.root, rel)
        try:
            if os.path.realpath(os.path.dirname(path)) != os.path.dirname(path) or file_id(path) != fid:
                return None
        except OSError:
            return None
        return path

    # -- applying changes ------------------------------------------------------------------------------------------
    def _owners(self, fid: FileId) -> list[Registration]:
        return [r for r in self.regs.values() if fid in r.scope.files]

    def _apply(self, ch: Changes) -> None:
        self.counters["drains"] += 1
        self.counters["records"] += len(ch.keys)
        # Flushes first: a page dirtied, written back and then evicted within one drain must be seen flushed
        # before its REMOVED ends MODIFIED; dirtying after a flush is recognised by time (FileState.last_flush_ns).
        held_flushes = []
        for fl in ch.flushes:
            if self._owners(fl.fid):
                self._apply_flush(fl.fid, fl.ts_ns, fl.exact)
            else:
                held_flushes.append(fl)
        if len(ch.keys):
            self._apply_records(ch.keys, ch.vals)
        if held_flushes:
            self._hold(np.empty(0, ch.keys.dtype), np.empty(0, ch.vals.dtype), held_flushes)
        if ch.lost or ch.lost_all:
            self._resync(None if ch.lost_all else set(ch.lost))

    def _apply_records(self, keys: np.ndarray, vals: np.ndarray) -> None:
        # Group the records by file: a stable sort on (dev, subvol, ino), then the places where the file changes
        # (np.unique over rows sorts them as a whole and costs several times more).
        # Within a file, in chunk order: page lists come out sorted, and a BitMap is built from a sorted list
        # several times faster. A drain of one file only (a large file read at random) needs no sort by file, and
        # mask_pages orders what it builds itself.
        dev, subvol, ino = keys["dev"], keys["subvol"], keys["ino"]
        if len(keys) > 1 and (dev == dev[0]).all() and (subvol == subvol[0]).all() and (ino == ino[0]).all():
            order = np.arange(len(keys))
        else:
            order = np.lexsort((keys["chunk"], ino, subvol, dev))
            dev, subvol, ino = dev[order], subvol[order], ino[order]
        starts = np.flatnonzero(np.concatenate(([True], (dev[1:] != dev[:-1]) | (subvol[1:] != subvol[:-1])
                                                | (ino[1:] != ino[:-1]))))
        bounds = np.append(starts, len(order)).tolist()
        unknown = []
        for i, (d, sv, n) in enumerate(zip(dev[starts].tolist(), subvol[starts].tolist(), ino[starts].tolist())):
            rows = order[bounds[i]:bounds[i + 1]]
            fid = FileId(d, sv, n)
            owners = self._owners(fid)
            if not owners:
                unknown.append(rows)
                continue
            self._apply_file(fid, owners, keys["chunk"][rows], vals[rows])
        if unknown:
            rows = np.concatenate(unknown)
            self._hold(keys[rows], vals[rows])

    def _apply_file(self, fid: FileId, owners: list[Registration], chunks: np.ndarray, v: np.ndarray) -> None:
        only_removed = not (v["added"].any() or v["dirtied"].any() or (v["present"] & v["removed"]).any())
        if only_removed and fid not in self.files and not any(reg.mask & Event.REMOVED for reg in owners):
            # Pages removed of a file with none known cached (a run evicting what it read itself: its own reads
            # are not reported): no state changes and no registration wants the event. A run's cache hygiene makes
            # one of these per file it reads, so this is the common case, kept cheap.
            self.counters["pages_removed"] += int(np.bitwise_count(v["removed"]).sum())
            return
        added = mask_pages(chunks, v["added"])
        removed = mask_pages(chunks, v["removed"])
        # Nothing removed (pages only read in): the pages present are those added — the common case, one decode.
        # Shared, not copied: none of the three is changed in place below.
        present = added if not removed else mask_pages(chunks, v["present"] & (v["added"] | v["removed"]))
        dirtied = mask_pages(chunks, v["dirtied"])
        self.counters["pages_added"] += len(added)
        self.counters["pages_removed"] += len(removed)
        self.counters["pages_dirtied"] += len(dirtied)
        st = self.files.get(fid)
        if st is None:
            st = self.files[fid] = FileState()
        gone = (added | removed) - present
        st.exists -= gone
        st.exists |= present
        st.modified -= gone          # a page no longer cached cannot be dirty (truncated)
        flushed = BitMap()
        if len(dirtied):
            st.last_dirty_ns = max(st.last_dirty_ns, int(v["last_dirty_ns"].max()))
            # A chunk dirtied before the file's last exact flush was written back already: the flush record
            # travels on the ring and can overtake the merged dirty bits.
            already = v["last_dirty_ns"] < st.last_flush_ns
            if already.any():
                flushed = mask_pages(chunks[already], v["dirtied"][already])
            live = ~already & (v["dirtied"] != 0)
            st.modified |= mask_pages(chunks[live], v["dirtied"][live]) & st.exists
            for c, ns in zip(chunks[live].tolist(), v["last_dirty_ns"][live].tolist()):
                if ns > st.dirty_ns.get(c, 0):
                    st.dirty_ns[c] = ns
        events = {Event.ADDED: added, Event.REMOVED: removed, Event.DIRTIED: dirtied}
        self.counters["pages_flushed"] += len(flushed)
        for reg in owners:
            if reg.mask & EVENTS:
                pend = reg.pending.setdefault(fid, {})
                for ev, pages in events.items():
                    if reg.mask & ev and pages:
                        if ev in pend:
                            pend[ev] |= pages
                        else:
                            pend[ev] = BitMap(pages)   # a copy: this registration's own, updated in place later
                if reg.mask & Event.FLUSHED and flushed:
                    pend.setdefault(Event.FLUSHED, BitMap()).update(flushed)
            if reg.mask & STATES:
                reg.touched.add(fid)
        if not st.exists and not st.modified:
            del self.files[fid]

    def _apply_flush(self, fid: FileId, ts: int, exact: bool) -> None:
        if not exact:
            # btrfs reports some episodes while pages are still dirty; a later exact one will follow.
            self.counters["flushes_partial"] += 1
            return
        st = self.files.get(fid)
        if st is None:
            if self._owners(fid):
                self.files[fid] = FileState(last_flush_ns=ts)
            return
        st.last_flush_ns = max(st.last_flush_ns, ts)
        flushed = BitMap()
        for chunk, ns in list(st.dirty_ns.items()):
            if ns < ts:
                flushed |= st.modified.intersection(BitMap(range(chunk * 64, chunk * 64 + 64)))
                del st.dirty_ns[chunk]
        if not flushed:
            return
        st.modified -= flushed
        self.counters["pages_flushed"] += len(flushed)
        for reg in self._owners(fid):
            if reg.mask & Event.FLUSHED:
                reg.pending.setdefault(fid, {}).setdefault(Event.FLUSHED, BitMap()).update(flushed)
            if reg.mask & STATES:
                reg.touched.add(fid)

    # -- unknown files, rescans, resyncs ---------------------------------------------------------------------------
    def _hold(self, keys: np.ndarray, vals: np.ndarray, flushes=()) -> None:
        """Keep records of files not (yet) in any scope until the next rescan says where they belong."""
        if self._held_records + len(keys) + len(flushes) > MAX_HELD:
            pairs = {(int(d), int(s)) for d, s in zip(keys["dev"], keys["subvol"])}
            self._resync(pairs | {(fl.fid.dev, fl.fid.subvol) for fl in flushes})
            return
        self._held.append(Changes(keys, vals, list(flushes)))
        self._held_records += len(keys) + len(flushes)

    def rescan(self) -> None:
        """Bring every scope up to date now (new and removed files), instead of waiting for the next rescan."""
        self._rescan()

    def _rescan(self) -> None:
        self._last_rescan = time.monotonic()
        added: set[FileId] = set()
        removed: set[FileId] = set()
        for scope in self.scopes.values():
            diff = scope.rescan()
            added.update(found.fid for found in diff.added)
            removed.update(fid for fid, _rel in diff.removed)
            if self.on_rescan and (diff.added or diff.removed):
                self.on_rescan(scope, diff)
        if added:
            self.source.unignore(added)
        for fid in removed - added:
            if not self._owners(fid):
                self.files.pop(fid, None)
                for reg in self.regs.values():
                    reg.pending.pop(fid, None)
                    reg.reported.pop(fid, None)
                    reg.touched.discard(fid)
        self._sync_kernel_scopes()
        held, self._held, self._held_records = self._held, [], 0
        for ch in held:
            ids = list(zip(ch.keys["dev"].tolist(), ch.keys["subvol"].tolist(), ch.keys["ino"].tolist()))
            known = np.array([bool(self._owners(FileId(*i))) for i in ids], bool)
            outside = {(FileId(*x), g) for x, g, k in zip(ids, ch.keys["gen"].tolist(), known) if not k}
            for fl in ch.flushes:
                if self._owners(fl.fid):
                    self._apply_flush(fl.fid, fl.ts_ns, fl.exact)
                else:
                    outside.add((fl.fid, fl.gen))
            if known.any():
                self._apply_records(ch.keys[known], ch.vals[known])
            for fid, gen in outside:
                # Outside every scope (or deleted): the kernel drops this file's events from now on. The
                # generation keeps a new file that reuses the inode number from being ignored with it.
                self.source.ignore(fid, gen)
                self.counters["unknown_ignored"] += 1

    def _resync(self, pairs: set[tuple[int, int]] | None) -> None:
        """Events were lost for ``pairs`` (None: anywhere): re-read residency and tell the registrations."""
        self.counters["resyncs"] += 1
        for reg in self.regs.values():
            if pairs is None or set(reg.scope.pairs()) & pairs:
                reg.resync = True
        for scope in self.scopes.values():
            owners = [r for r in self.regs.values() if r.scope is scope]
            if owners:
                self._snapshot(scope, ((f, rel) for f, rel in scope.files.items()
                                       if pairs is None or (f.dev, f.subvol) in pairs), owners)

    # -- teardown --------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {**self.counters, **{f"kernel_{k}": v for k, v in self.source.stats().items()}}

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _runs(parts: list[tuple[Event, BitMap]]):
    """(first pages, counts, flags) arrays of the runs of consecutive pages with equal flags, from (flags, pages)
    parts that may overlap; None if there are no pages."""
    pages_l, flags_l = [], []
    for flags, pages in parts:
        arr = np.frombuffer(pages.to_array(), np.uint32).astype(np.int64)
        if len(arr):
            pages_l.append(arr)
            flags_l.append(np.full(len(arr), int(flags), np.int64))
    if not pages_l:
        return None
    pages = np.concatenate(pages_l)
    flags = np.concatenate(flags_l)
    if len(pages_l) > 1:
        order = np.argsort(pages, kind="stable")
        pages, flags = pages[order], flags[order]
        starts = np.flatnonzero(np.r_[True, pages[1:] != pages[:-1]])
        pages, flags = pages[starts], np.bitwise_or.reduceat(flags, starts)
    brk = np.flatnonzero(np.r_[True, (pages[1:] != pages[:-1] + 1) | (flags[1:] != flags[:-1])])
    ends = np.r_[brk[1:], len(pages)]
    return pages[brk], ends - brk, flags[brk]
