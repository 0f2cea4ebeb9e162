"""duet's scrub task: find silent data corruption, skipping what the system already verified for free.

On **btrfs** every read from the device is checked against the data checksums, so a page a foreground program read
into the page cache during the run (ADDED by a read, not written) has been verified: ``duet_observe`` counts it as
scrubbed. What is left is read with O_DIRECT, which verifies the same way without filling the page cache; an
``EIO`` is narrowed down to the bad 4 KiB sectors. Pages that were already cached when the run started are *not*
trusted (they may have been read long ago): they are read from the device like the rest.

On **ext4, xfs and others** nothing verifies reads, so the scrub keeps a manifest: per file version (size, mtime,
ctime, inode) the blake3 of the whole file and of each 256 KiB chunk (:mod:`duet_scrub.manifest`). A file whose
content no longer matches while its metadata is unchanged is silent corruption, reported with the chunks that
differ. Pages foreground programs read during the run are hashed from the cache (fresh from the device, no extra
I/O); the rest is read with O_DIRECT. The whole-file hash is published for the other tasks (``"blake3"``).

A file verified within the scrub period (option ``every``, default 30 days) is not read again. Corrupt files make
``duet run`` exit 6 and are listed under ``"corrupt"`` in the task's summary (``duet run --json``).
"""

from __future__ import annotations

import os
import time

from pyroaring import BitMap

from duet_core import Event, ItemResult, TaskOption, TaskSpec, hookimpl
from duet_core.events import PAGE_SIZE
from duet_core.identity import parse_mountinfo
from duet_core.residency import resident_pages
from duet_core.tasks import FileInfo, ItemContext, RunInfo, TaskReport
from duet_scrub.manifest import Hasher, Record, differing_ranges, key, version
from duet_scrub.reader import READ_SIZE, DeviceReader

DAY = 86400.0
DEFAULT_PERIOD = 30 * DAY


def _pages(ranges) -> BitMap:
    bm = BitMap()
    for first, count in ranges:
        bm.add_range(first, first + count)
    return bm


class Scrub:
    """The scrub task. One instance serves one run at a time; its in-memory state is reset when a new run starts."""

    def __init__(self):
        self._run_id: int | None = None
        self._fstypes: dict[int, str] = {}
        self._observed: dict[int, BitMap] = {}   # btrfs: file id -> pages verified by foreground reads this run
        self._fresh: dict[int, BitMap] = {}      # elsewhere: file id -> pages read from the device this run
        self._round_started = 0.0

    # -- per run, per scope ------------------------------------------------------------------------------------------
    def _begin(self, run: RunInfo) -> None:
        """Start of a run (any hook may come first): reset memory; at a new round, note its start, forget its
        corrupt list. The task's store is shared by all scopes, so round keys name the scope."""
        if run.run_id == self._run_id:
            return
        self._run_id = run.run_id
        self._observed.clear()
        self._fresh.clear()
        current = run.state.get(f"round:{run.root}")
        if current is None or current["n"] != run.round:
            current = {"n": run.round, "started": time.time()}
            run.state.put(f"round:{run.root}", current)
            run.state.put(f"corrupt:{run.root}", {})
        self._round_started = current["started"]

    def _fstype(self, f: FileInfo) -> str:
        """The filesystem type of the file's superblock (FileId.dev is the superblock device, as in mountinfo)."""
        dev = f.fid.dev
        if dev not in self._fstypes:
            with open("/proc/self/mountinfo", "rb") as fh:
                for m in parse_mountinfo(fh.read()).values():
                    self._fstypes[m.dev] = m.fstype
        return self._fstypes.get(dev, "unknown")

    def _verified(self, run: RunInfo, f: FileInfo, b3: str | None = None, chunks: str | None = None) -> None:
        run.state.put(key(f), Record(version(f), self._round_started, b3, chunks).dump())

    def _corrupt(self, ctx: ItemContext, ranges: list[tuple[int, int]], why: str) -> ItemResult:
        """Remember and report a corrupt file: its absolute path and the byte ranges ``[start, end)``."""
        entry = {"path": ctx.path, "ranges": [[s, e] for s, e in ranges], "error": why}
        found = ctx.run.state.get(f"corrupt:{ctx.run.root}", {})
        found[ctx.file.relpath] = entry
        ctx.run.state.put(f"corrupt:{ctx.run.root}", found)
        where = ", ".join(f"{s}-{e}" for s, e in ranges)
        return ItemResult(damaged=True, counters={"corrupt_files": 1}, message=f"CORRUPT ({why}): bytes {where}")

    # -- hooks -------------------------------------------------------------------------------------------------------
    @hookimpl
    def duet_task(self) -> TaskSpec:
        return TaskSpec(
            "scrub", "find silent data corruption (btrfs checksums; blake3 manifest elsewhere), cached data first",
            events=Event.EXISTS | Event.ADDED, granularity="range",
            options=(TaskOption("every", "duration", default=DEFAULT_PERIOD,
                                help="scrub period: a file verified this recently is not read again (e.g. 30d)"),))

    @hookimpl
    def duet_plan(self, run: RunInfo, files) -> list[int]:
        """Files never verified, changed since, or verified longer ago than the period."""
        self._begin(run)
        period, now = run.options["every"], time.time()
        chosen = []
        for f in files:
            rec = Record.load(run.state.get(key(f)))
            if rec is None or rec.v != version(f) or now - rec.at >= period:
                chosen.append(f.id)
        return chosen

    @hookimpl
    def duet_observe(self, run: RunInfo, file: FileInfo, added):
        """btrfs: pages read into the cache were checked against their checksums, so they are done. Elsewhere they
        are remembered, to be hashed from the cache instead of read again."""
        self._begin(run)
        pages = _pages(added)
        if self._fstype(file) == "btrfs":
            seen = self._observed.setdefault(file.id, BitMap())
            seen |= pages
            if file.pages and len(seen) >= file.pages:
                self._verified(run, file)
            return added
        self._fresh.setdefault(file.id, BitMap()).update(pages)
        return None

    @hookimpl
    def duet_process(self, ctx: ItemContext) -> ItemResult | None:
        self._begin(ctx.run)
        if self._fstype(ctx.file) == "btrfs":
            return self._scrub_checksummed(ctx)
        return self._scrub_hashed(ctx)

    @hookimpl
    def duet_finish(self, run: RunInfo, report: TaskReport) -> dict:
        """The corrupt files of this round (also those found by earlier runs of it, which keep the exit code 6)."""
        self._begin(run)
        corrupt = list(run.state.get(f"corrupt:{run.root}", {}).values())
        report.items_damaged = max(report.items_damaged, len(corrupt))
        return {"corrupt": corrupt, "verified_from_cache_bytes": report.bytes_from_cache,
                "verified_from_device_bytes": report.bytes_from_device}

    # -- btrfs: the kernel verifies checksums on every read ------------------------------------------------------------
    def _scrub_checksummed(self, ctx: ItemContext) -> ItemResult | None:
        if ctx.run.mode == "watch":
            return ItemResult(done=False)      # watch reads nothing: only foreground reads verify (duet_observe)
        bad: list[tuple[int, int]] = []
        nbytes = 0
        with DeviceReader(ctx.fd) as rd:
            for first, count in ctx.ranges:
                start, end = first * PAGE_SIZE, min(ctx.file.size, (first + count) * PAGE_SIZE)
                for piece in rd.pieces(start, end):
                    bad += piece.bad
                nbytes += max(0, end - start)
            ctx.progress.advance(nbytes, from_device=rd.bytes_read if rd.direct else None)
        if bad:
            return self._corrupt(ctx, bad, "checksum error (EIO)")
        self._verified(ctx.run, ctx.file)
        return None

    # -- elsewhere: content hashes per file version --------------------------------------------------------------------
    def _scrub_hashed(self, ctx: ItemContext) -> ItemResult | None:
        f, fd = ctx.file, ctx.fd
        fresh = self._fresh.pop(f.id, BitMap())
        if fresh:
            fresh &= resident_pages(fd, f.size)
        if ctx.run.mode == "watch" and len(fresh) < f.pages:
            return ItemResult(done=False)      # watch hashes only files read whole by someone else
        before = os.fstat(fd)
        hasher, bad = Hasher(), []
        with DeviceReader(fd) as rd:
            for off in range(0, f.size, READ_SIZE):
                end = min(f.size, off + READ_SIZE)
                first, stop = off // PAGE_SIZE, (end + PAGE_SIZE - 1) // PAGE_SIZE
                if fresh.range_cardinality(first, stop) == stop - first:
                    hasher.update(os.pread(fd, end - off, off))   # just read from the device by someone else
                    continue
                for piece in rd.pieces(off, end):
                    bad += piece.bad
                    hasher.update(piece.data)
            ctx.progress.advance(f.size, from_device=rd.bytes_read if rd.direct else None)
        after = os.fstat(fd)
        if not _same_version(f, before) or not _same_version(f, after):
            return ItemResult(counters={"changed_while_scrubbed": 1})   # a new version: checked next round
        if bad:
            return self._corrupt(ctx, bad, "read error (EIO)")
        whole, chunks = hasher.finish()
        ctx.shared.put(f, "blake3", whole)
        rec = Record.load(ctx.state.get(key(f)))
        if rec and rec.v == version(f) and rec.b3 and rec.b3 != whole:
            ranges = list(differing_ranges(rec.chunks or "", chunks, f.size)) or [(0, f.size)]
            return self._corrupt(ctx, ranges, "content changed, metadata did not")
        self._verified(ctx.run, f, whole, chunks)
        return None


def _same_version(f: FileInfo, st: os.stat_result) -> bool:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == (f.size, f.mtime_ns, f.ctime_ns, f.fid.ino)


plugin = Scrub()
