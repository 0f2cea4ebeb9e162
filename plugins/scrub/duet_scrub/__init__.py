"""duet's scrub task: find silent data corruption, skipping what the system already verified for free.

On **btrfs** every read from the device is checked against the data checksums, so a page a foreground program read
into the page cache during the run (ADDED by a read, not written) has been verified — if the read succeeded, which
``duet_observe`` confirms by reading the page back from the cache without I/O (``RWF_NOWAIT``). Pages the run itself
just read for another task (``ctx.fresh``) are read back from the cache the same way. What is left is read from the
device (:mod:`duet_scrub.reader`): uncached pages with ordinary reads (read-ahead keeps the device busy; duet evicts
them afterwards), pages cached before the run with O_DIRECT — they may have been read long ago, so they do not
answer for the device. An ``EIO`` is narrowed down to the bad 4 KiB sectors.

When the files left are cold and most of a btrfs filesystem, and no other task of the run needs them, the run
hands them to **the kernel's scrub** instead (``duet_device_pass``, :mod:`duet_scrub.kscrub`): ``BTRFS_IOC_SCRUB``
reads every device in device order with many reads in flight and checks every copy (both mirrors of RAID1, where a
read checks one), several times faster than a cold tree of small files is read file by file. It repairs from a good
copy as ``btrfs scrub start`` does (read-only on a read-only mount). A clean pass marks every file that existed
when it began verified; a stop or the ``--for`` budget cancels it and the next run resumes it where it was
(``last_physical``, per device); errors it could not repair send every file through the file-by-file path, which
names the damaged ones (errors in metadata or outside the scope's files are reported as such).

On **ext4, xfs and others** nothing verifies reads, so the scrub keeps a manifest: per file version (size, mtime,
ctime, inode) the blake3 of the whole file and of each 256 KiB chunk (:mod:`duet_scrub.manifest`). A file whose
content no longer matches while its metadata is unchanged is silent corruption, reported with the chunks that
differ. Pages foreground programs (or the run, for another task) read during the run are hashed from the cache
(fresh from the device, no extra I/O); the rest is read from the device as above. The whole-file hash is published
for the other tasks (``"blake3"``).

A file verified within the scrub period (option ``every``, default 30 days) is not read again. Corrupt files make
``duet run`` exit 6 and are listed under ``"corrupt"`` in the task's summary (``duet run --json``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from pyroaring import BitMap

from duet_core import Event, ItemResult, PassResult, TaskOption, TaskSpec, hookimpl
from duet_core.events import PAGE_SIZE
from duet_core.fiemap import FIEMAP_EXTENT_DATA_INLINE, extents
from duet_core.identity import parse_mountinfo
from duet_core.residency import pages_of, resident_pages, runs_of
from duet_core.scope import open_regular
from duet_core.tasks import FileInfo, ItemContext, RunInfo, TaskReport
from duet_scrub import kscrub
from duet_scrub.manifest import Hasher, Record, differing_ranges, key, version
from duet_scrub.reader import DirectBuffer, FileReader

DAY = 86400.0
DEFAULT_PERIOD = 30 * DAY
# The kernel's scrub verifies the whole filesystem: used only when the files left to verify are most of it.
KERNEL_PASS_MIN_SHARE = 0.8


class _GiveWay(Exception):
    """The run asked the kernel's scrub to end early (its budget, or other programs reading the scope)."""


def _runs(pages: BitMap, kind: str) -> list[tuple[int, int, str]]:
    """Page set -> sorted (first, count, kind) runs."""
    return [(first, count, kind) for first, count in runs_of(pages)]


@dataclass
class ReadResult:
    bad: list[tuple[int, int]] = field(default_factory=list)
    nbytes: int = 0              # bytes covered
    from_device: int = 0         # of them, read from the device now


def read_verified(ctx: ItemContext, reader: FileReader, want: BitMap, observed: BitMap, sink=None) -> ReadResult:
    """Make sure the pages ``want`` of the file were read from the device during this run, in file order.

    Pages fresh in the cache — ``observed`` (others read them during the run) and ``ctx.fresh`` (the run read them
    for this item: its prefetch, or a task before this one) — are read from the cache: a page is resident as soon as
    its read *starts*, and stays resident, not up to date, when the read fails, so only reading it proves that it
    came in whole (a failed one is read again and fails again). Of the others, pages cached before the run are read
    with O_DIRECT and uncached ones with ordinary reads. ``sink`` gets every byte of ``want`` in order (b"" for a
    piece with a bad sector). The run's own reads count as from the device, others' as from the cache.
    """
    size = ctx.file.size
    by_run = pages_of(ctx.fresh)
    trusted = observed | by_run
    resident = resident_pages(ctx.fd, size) if ctx.cached else BitMap()
    segments = sorted(_runs(want & observed - by_run, "observed") + _runs(want & by_run, "run")
                      + _runs((want & resident) - trusted, "stale") + _runs(want - resident - trusted, "cold"))
    out = ReadResult()
    for first, count, kind in segments:
        start, end = first * PAGE_SIZE, min(size, (first + count) * PAGE_SIZE)
        if start >= end:
            continue
        out.nbytes += end - start
        direct_before = reader.direct_bytes
        pieces = reader.direct(start, end) if kind == "stale" else reader.buffered(start, end, keep=bool(sink))
        for piece in pieces:
            ctx.checkpoint()      # between reads of a large file: the rate limit, and a stop (the item is redone)
            out.bad += piece.bad
            if kind in ("cold", "run"):
                out.from_device += piece.size
            if sink:
                sink(piece.data)
        out.from_device += reader.direct_bytes - direct_before
    return out


CONFIRM_RETRIES = 3        # passes over pages still being read when the event arrived ...
CONFIRM_WAIT_S = 0.02      # ... this long apart


def confirm_cached(fd: int, ranges) -> BitMap:
    """The pages of ``ranges`` that are in the page cache and up to date, found without any device I/O.

    ``RWF_NOWAIT`` reads return ``EAGAIN`` (or stop short) at a page that is missing, locked for a read still in
    flight, or left not up to date by a failed read. An ADDED event can arrive while its read is still in flight,
    so pages not confirmed are tried again a few times, briefly; a failed read never confirms.
    """
    confirmed, todo = BitMap(), pages_of(ranges)
    buf = bytearray(1 << 20)
    for attempt in range(CONFIRM_RETRIES):
        if attempt:
            time.sleep(CONFIRM_WAIT_S)
        for first, count in runs_of(todo):
            page, stop = first, first + count
            while page < stop:
                n = min(stop - page, len(buf) // PAGE_SIZE)
                try:
                    got = os.preadv(fd, [memoryview(buf)[: n * PAGE_SIZE]], page * PAGE_SIZE, os.RWF_NOWAIT)
                except OSError:
                    got = 0                     # EAGAIN: this page is not ready
                whole = min(n, -(-got // PAGE_SIZE))
                if whole:
                    confirmed.add_range(page, page + whole)
                page += whole if whole == n else whole + 1   # skip the page that was not ready
        todo -= confirmed
        if not todo:
            break
    return confirmed


class Scrub:
    """The scrub task. One instance serves one run at a time; its in-memory state is reset when a new run starts."""

    def __init__(self):
        self._run_id: int | None = None
        self._fstypes: dict[int, str] = {}
        self._observed: dict[int, BitMap] = {}   # btrfs: file id -> pages verified by foreground reads this run
        self._fresh: dict[int, BitMap] = {}      # file id -> pages others read into the cache this run
        self._round_started = 0.0
        self._buffer: DirectBuffer | None = None
        self._root: tuple[str, int] | None = None    # the scope's root directory, to open files beneath it
        self._kernel: tuple[dict[str, int], int] | None = None   # this run's kernel scrub: its counters, its errors

    def _reader(self, fd: int) -> FileReader:
        if self._buffer is None:
            self._buffer = DirectBuffer()
        return FileReader(fd, self._buffer)

    # -- per run, per scope ------------------------------------------------------------------------------------------
    def _begin(self, run: RunInfo) -> None:
        """Start of a run (any hook may come first): reset memory; at a new round, note its start, forget its
        corrupt list. The task's store is shared by all scopes, so round keys name the scope."""
        if run.run_id == self._run_id:
            return
        self._run_id = run.run_id
        self._observed.clear()
        self._fresh.clear()
        self._kernel = None
        if self._root is not None:
            os.close(self._root[1])
            self._root = None
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
        """Remember and report a corrupt file: its absolute path and the byte ranges ``[start, end)``. Its record
        keeps the last good hashes, marked bad, so every round checks it again."""
        rec = Record.load(ctx.state.get(key(ctx.file))) or Record(version(ctx.file), 0.0)
        rec.bad = True
        ctx.state.put(key(ctx.file), rec.dump())
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
                                help="scrub period: a file verified this recently is not read again (e.g. 30d)"),),
            api_version=1)

    @hookimpl
    def duet_plan(self, run: RunInfo, files) -> list[int]:
        """Files never verified, changed since, found corrupt, or verified longer ago than the period."""
        self._begin(run)
        period, now = run.options["every"], time.time()
        chosen = []
        records = run.state.get_many([key(f) for f in files])
        for f in files:
            rec = Record.load(records.get(key(f)))
            if rec is None or rec.bad or rec.v != version(f) or now - rec.at >= period:
                chosen.append(f.id)
        return chosen

    @hookimpl
    def duet_observe(self, run: RunInfo, file: FileInfo, added):
        """Pages someone else read into the cache during the run.

        btrfs: a page read from the device was checked against its checksum — if the read succeeded. A page is
        ADDED when its read starts, and a page whose read failed stays in the cache, not up to date; so the pages
        are read back from the cache here with RWF_NOWAIT, which never goes to the device and refuses a page that
        is not up to date. Those that come back whole are done; the rest are read when the file is processed.
        Elsewhere the pages are remembered, to be hashed from the cache instead of read again."""
        self._begin(run)
        pages = pages_of(added)
        self._fresh.setdefault(file.id, BitMap()).update(pages)
        if self._fstype(file) != "btrfs":
            return None
        confirmed = self._confirm_cached(run, file, added)
        seen = self._observed.setdefault(file.id, BitMap())
        seen |= confirmed
        if file.pages and len(seen) >= file.pages:
            self._verified(run, file)
        return runs_of(confirmed)

    def _confirm_cached(self, run: RunInfo, file: FileInfo, ranges) -> BitMap:
        """The pages of ``ranges`` that are in the cache and up to date (read without any device I/O)."""
        try:   # only that very regular file: the name may hold a fifo by now, whose open would block the run
            fd = open_regular(self._root_fd(run), file.relpath, file.fid.ino)
        except OSError:
            return BitMap()                     # gone or replaced: the scheduler finds out when it opens the file
        try:
            return confirm_cached(fd, ranges)
        finally:
            os.close(fd)

    def _root_fd(self, run: RunInfo) -> int:
        if self._root is None or self._root[0] != run.root:
            if self._root is not None:
                os.close(self._root[1])
            self._root = (run.root, os.open(run.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        return self._root[1]

    @hookimpl
    def duet_device_pass(self, run: RunInfo, pending, give_way, progress) -> PassResult | None:
        """The files left, cold, are most of one btrfs filesystem: let the kernel's scrub verify it in device
        order (module docstring). Declined (None) for anything else."""
        self._begin(run)
        first, total, devs = None, 0, set()
        for i, f in enumerate(pending()):
            if not i % 4096:
                run.checkpoint()
            first = first or f
            total += f.size
            devs.add(f.fid.dev)
        if first is None or len(devs) != 1 or self._fstype(first) != "btrfs":
            return None
        # The ioctls go to the filesystem the files are on, through one of them: not necessarily the scope root's
        # (another btrfs mounted inside the scope, whose files alone are left, must not be vouched for by a scrub of
        # the root's filesystem).
        root_fd = self._root_fd(run)
        try:
            fd = open_regular(root_fd, first.relpath, first.fid.ino)
        except OSError:
            return None
        try:
            # Data not yet committed is not counted as used, nor seen by a scrub: commit it first — but not to
            # decline (a commit writes back every dirty file of the filesystem).
            if total < KERNEL_PASS_MIN_SHARE * kscrub.used_bytes(fd):
                return None
            started_ns = time.time_ns()      # files changed after this are not vouched for by the pass
            readonly = bool(os.fstatvfs(fd).f_flag & os.ST_RDONLY)
            if not readonly:                 # read-only: nothing to commit, and the scrub repairs nothing
                kscrub.commit(fd)
            if total < KERNEL_PASS_MIN_SHARE * kscrub.used_bytes(fd):
                return None
            return self._kernel_scrub(run, fd, root_fd, pending, give_way, progress, started_ns, readonly)
        finally:
            os.close(fd)

    def _kernel_scrub(self, run: RunInfo, fd: int, root_fd: int, pending, give_way, progress, started_ns: int,
                      readonly: bool) -> PassResult:
        """Run (or resume) the kernel's scrub of the filesystem of ``fd`` and judge what it found. What a resume
        needs — which filesystem, where each device got to, and the counters so far (errors found before a stop
        must not be forgotten) — is kept in the task's store until the pass is over. ``root_fd``: the scope's root,
        beneath which the files are opened."""
        state_key = f"kernel-pass:{run.root}"
        saved = run.state.get(state_key)
        fsid = kscrub.fsid(fd)
        if not saved or saved.get("round") != run.round or saved.get("fsid") != fsid:
            saved = {"round": run.round, "fsid": fsid, "started_ns": started_ns, "resume": {}, "totals": {}}
        ks = kscrub.KernelScrub(fd, {int(d): p for d, p in saved["resume"].items()}, readonly=readonly)
        ks.start()

        def poll() -> None:
            run.checkpoint()              # a stop: Stopped cancels the scrub (wait), the next run resumes it
            if give_way():
                raise _GiveWay()
            progress(ks.scrubbed_bytes())

        gave_way = False
        try:
            ks.wait(poll)
        except _GiveWay:
            gave_way = True
        except BaseException:
            self._save_resume(run, state_key, saved, ks)
            raise
        this_run = ks.totals()
        nbytes = this_run.get("data_bytes_scrubbed", 0) + this_run.get("tree_bytes_scrubbed", 0)
        failed = [d for d in ks.devs if d.error is not None]
        if failed:
            why = "; ".join(f"device {d.devid}: {d.error.strerror or d.error}" for d in failed)
            run.state.delete(state_key)
            return PassResult(from_device=nbytes, message=f"the kernel's scrub could not run ({why}): "
                                                          "each file is read instead")
        totals = self._save_resume(run, state_key, saved, ks)     # with the counters of earlier runs' parts
        bad = kscrub.errors(totals, readonly)
        counters = {"kernel_scrub_bytes": nbytes}
        if bad:
            run.state.delete(state_key)
            self._kernel = (totals, bad)
            counters["kernel_scrub_errors"] = bad
            return PassResult(from_device=nbytes, counters=counters,
                              message=f"the kernel's scrub found {bad} error(s) it could not repair: "
                                      "reading each file to name the damaged ones")
        if gave_way:
            done = self._covered_so_far(run, fd, root_fd, pending, saved)
            counters["kernel_scrub_gave_way"] = 1
            return PassResult(done=done, from_device=nbytes, counters=counters,
                              message=f"the kernel's scrub gave way (budget, or other programs reading) with "
                                      f"{len(done)} file(s) verified; the rest are read one by one")
        # Every device done (kept as such: a stop while the files are marked leaves the next run nothing to read).
        self._kernel = (totals, 0)
        counters["kernel_scrub"] = 1
        if totals.get("corrected_errors"):
            counters["kernel_corrected_errors"] = totals["corrected_errors"]
        done = []
        for i, f in enumerate(pending()):
            if not i % 4096:
                run.checkpoint()
            if f.ctime_ns < saved["started_ns"]:       # written since the pass began: read the file itself
                self._verified(run, f)
                done.append(f.id)
        run.state.delete(state_key)
        message = None
        if totals.get("corrected_errors"):
            message = f"the kernel's scrub repaired {totals['corrected_errors']} error(s) from good copies"
        return PassResult(done=done, from_device=nbytes, counters=counters, message=message)

    def _covered_so_far(self, run: RunInfo, fd: int, root_fd: int, pending, saved: dict) -> list[int]:
        """Files a cancelled pass verified: every extent, in some copy, below where its device's scrub got to
        (over this round's runs: they resume one another). Inline and striped (RAID0/10/5/6) data is not placed
        this way: those files are read one by one."""
        reached = {int(d): p for d, p in saved["resume"].items()}
        if not any(reached.values()):
            return []
        chunks = kscrub.chunk_map(fd)
        done = []
        for i, f in enumerate(pending()):
            if not i % 1024:
                run.checkpoint()
            if f.ctime_ns >= saved["started_ns"]:
                continue
            try:
                ffd = open_regular(root_fd, f.relpath, f.fid.ino)
            except OSError:
                continue
            try:
                ext = extents(ffd, f.size)
            except OSError:
                continue
            finally:
                os.close(ffd)
            if all(not e.unplaced and not e.flags & FIEMAP_EXTENT_DATA_INLINE
                   and chunks.covered(e.physical, e.length, reached) for e in ext):
                self._verified(run, f)
                done.append(f.id)
        return done

    @staticmethod
    def _save_resume(run: RunInfo, state_key: str, saved: dict, ks: "kscrub.KernelScrub") -> dict[str, int]:
        """Keep where each device's scrub got to (a finished device: its end) and the counters so far, for the
        next run of this round; returns those counters."""
        for d in ks.devs:
            if d.counters:
                saved["resume"][str(d.devid)] = (1 << 64) - 1 if d.finished else d.counters["last_physical"]
        totals = saved.setdefault("totals", {})
        for k, v in ks.totals().items():
            totals[k] = totals.get(k, 0) + v
        run.state.put(state_key, saved)
        return totals

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
        out = {"corrupt": corrupt, "verified_from_cache_bytes": report.bytes_from_cache,
               "verified_from_device_bytes": report.bytes_from_device}
        if self._kernel is not None:
            totals, bad = self._kernel
            out["kernel_scrub"] = totals
            if bad and not corrupt and report.complete:
                # Every file of the scope read back clean: the damage is in metadata or in other files.
                report.items_damaged = max(report.items_damaged, 1)
                out["kernel_scrub_note"] = ("the kernel's scrub found errors outside the scope's files (metadata "
                                            "or other files of the filesystem): see the kernel log and "
                                            "btrfs device stats")
        return out

    # -- btrfs: the kernel verifies checksums on every read ------------------------------------------------------------
    def _scrub_checksummed(self, ctx: ItemContext) -> ItemResult | None:
        if ctx.cached_only:
            # Nothing from the device now (watch, a run waiting for other programs, the second process of a run):
            # the item is done only if everything left of it was read during the run — by others, or by the run
            # itself (ctx.fresh: its read-ahead, or the leading process of --jobs 2) — and came in whole.
            want = pages_of(ctx.ranges)
            by_run = pages_of(ctx.fresh) & want
            if want - confirm_cached(ctx.fd, runs_of(want & (self._fresh.get(ctx.file.id, BitMap()) | by_run))):
                return ItemResult(done=False)
            self._fresh.pop(ctx.file.id, None)
            ctx.progress.advance(min(ctx.file.size, len(want) * PAGE_SIZE),
                                 from_device=min(ctx.file.size, len(by_run) * PAGE_SIZE))
            self._verified(ctx.run, ctx.file)
            return None
        with self._reader(ctx.fd) as rd:
            res = read_verified(ctx, rd, pages_of(ctx.ranges), self._fresh.pop(ctx.file.id, BitMap()))
        ctx.progress.advance(res.nbytes, from_device=res.from_device)
        if res.bad:
            return self._corrupt(ctx, res.bad, "checksum error (EIO)")
        self._verified(ctx.run, ctx.file)
        return None

    # -- elsewhere: content hashes per file version --------------------------------------------------------------------
    def _scrub_hashed(self, ctx: ItemContext) -> ItemResult | None:
        f, fd = ctx.file, ctx.fd
        fresh = self._fresh.pop(f.id, BitMap())
        if fresh:
            fresh &= resident_pages(fd, f.size)
        if ctx.cached_only and len(fresh) < f.pages:
            return ItemResult(done=False)      # a hash needs the whole file: only when others read it all
        before = os.fstat(fd)
        hasher = Hasher()
        with self._reader(fd) as rd:
            res = read_verified(ctx, rd, BitMap(range(f.pages)) if f.pages else BitMap(), fresh,
                                sink=hasher.update)
        ctx.progress.advance(res.nbytes, from_device=res.from_device)
        after = os.fstat(fd)
        if not _same_version(f, before) or not _same_version(f, after):
            return ItemResult(counters={"changed_while_scrubbed": 1})   # a new version: checked next round
        if res.bad:
            return self._corrupt(ctx, res.bad, "read error (EIO)")
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
