"""duet's defrag task: find fragmented files with FIEMAP and rewrite them into fewer extents, cached files first.

Why cached files first: the filesystem must read a file to rewrite it; a file already in the page cache costs no
read at all (the original Duet's defrag picked the file with the largest share in memory). duet's scheduler hands
files over in that order. A file written during the run is handed over again once it was (``Event.MODIFIED``), so
it is re-checked: fragmentation is often caused by the very writes that happen while maintenance runs.

Per file: measure (:mod:`duet_defrag.fiemap`), decide (more than ``threshold`` times the ideal number of extents,
and extents averaging less than ``extent_size``), rewrite (:mod:`duet_defrag.rewrite`), measure again. Content is
never changed — the kernel moves the data — and extents shared with snapshots or reflink copies are left alone
unless ``allow_unshare`` is set, because rewriting them would silently double the space they take.

The rewrite itself dirties the file's pages, which requeues it too: a file is rewritten again in the same run only
if someone else wrote to it since (its size or mtime changed; a rewrite changes neither), so a file the filesystem
cannot improve is not rewritten over and over.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Any

from duet_core import Event, ItemResult, TaskOption, TaskSpec, hookimpl
from duet_core.errors import DuetError
from duet_core.filesystems import fs_name
from duet_core.identity import file_id, open_beneath
from duet_core.scope import open_regular
from duet_defrag import fiemap, rewrite

__version__ = "0.1.0"

MiB = 1 << 20
REPORT_FILES = 50         # the most fragmented files listed by name in the run's report

# What happened to a file, as the report calls it.
OK = "ok"                            # not fragmented
FRAGMENTED = "fragmented"            # fragmented, left as it is (dry run, or a filesystem duet only reports on)
DEFRAGMENTED = "defragmented"
SKIPPED_SHARED = "skipped_shared"    # its fragmented extents are shared with a snapshot or reflink
NO_GAIN = "no_gain"                  # the filesystem found no better layout (free space too fragmented)
BUSY = "busy"                        # could not be opened for writing (a running executable: ETXTBSY)
VANISHED = "vanished"                # deleted or replaced (renamed over) after the scheduler handed it over


@dataclass
class FileReport:
    """One file's outcome in this run: extents when first checked, after the last check, and what was done."""

    path: str
    ideal: int
    before: int
    after: int
    outcome: str
    shared: int


@dataclass
class RunState:
    """What the task remembers during one run: the scope's directory and every file it checked."""

    root_fd: int
    files: dict[int, FileReport] = field(default_factory=dict)
    rewritten: dict[int, tuple[int, int]] = field(default_factory=dict)   # file id -> (size, mtime) at it
    rechecks: int = 0
    fstypes: dict[int, str | None] = field(default_factory=dict)   # superblock device -> fs_name (one fstatfs)


class Defrag:
    """The ``defrag`` task (entry point ``duet.tasks: defrag``)."""

    def __init__(self) -> None:
        self._runs: dict[int, RunState] = {}

    @hookimpl
    def duet_task(self) -> TaskSpec:
        return TaskSpec(
            "defrag",
            "defragment fragmented files (btrfs, ext4, xfs), most-cached first, keeping shared extents shared",
            events=Event.EXISTS | Event.MODIFIED,
            options=(
                TaskOption("threshold", "float", default=2.0,
                           help="fragmented: at least this many times the ideal number of extents"),
                TaskOption("extent_size", "size", default=32 * MiB,
                           help="files whose extents average at least this size are left alone"),
                TaskOption("allow_unshare", "bool", default=False,
                           help="also rewrite extents shared with snapshots or reflinks (takes more space)"),
                TaskOption("dry_run", "bool", default=False, help="only report fragmentation, change nothing"),
            ),
            reads_data=False,        # FIEMAP for every file; the kernel reads only the files it rewrites
            api_version=1,
        )

    @hookimpl
    def duet_check(self, root, options):
        """A threshold under 1 (fewer extents than the ideal) or an extent size of 0 would make every file, or
        none, fragmented: refused as bad input."""
        if options["threshold"] < 1:
            raise DuetError(f"--threshold {options['threshold']:g}: use 1 or more (times the ideal number of "
                            "extents; the default is 2)")
        if options["extent_size"] <= 0:
            raise DuetError("--extent-size 0: use a size, like 32MiB (the default)")

    # -- one file --------------------------------------------------------------------------------------------------
    @hookimpl
    def duet_process(self, ctx) -> ItemResult | None:
        state = self._state(ctx.run)
        opts = ctx.options
        f = ctx.file
        dev = f.fid.dev
        if dev not in state.fstypes:
            state.fstypes[dev] = fs_name(ctx.fd)
        fstype = state.fstypes[dev]
        lay = fiemap.layout(fiemap.extents(ctx.fd), fstype or "ext4", opts["allow_unshare"])
        known = state.files.get(f.id)
        if known is not None:
            state.rechecks += 1
        # A re-check (the file was written during the run) keeps the count from the first check, and what was done.
        rep = FileReport(f.relpath, lay.ideal, known.before if known else lay.extents, lay.extents,
                         known.outcome if known and known.outcome == DEFRAGMENTED else OK, lay.shared)
        state.files[f.id] = rep
        st = os.fstat(ctx.fd)
        if state.rewritten.get(f.id) == (st.st_size, st.st_mtime_ns):
            return None                           # requeued by the writes of our own rewrite
        if not self._fragmented(lay, opts):
            return None
        rep.outcome = FRAGMENTED
        if fstype is None or opts["dry_run"]:
            return ItemResult(message=f"fragmented: {lay.extents} extents, ideal {lay.ideal}")
        if lay.unplaced:                         # being written: let the filesystem place the dirty data first
            lay = fiemap.layout(fiemap.extents(ctx.fd, sync=True), fstype, opts["allow_unshare"])
        if lay.shared and not opts["allow_unshare"] and (fstype != "btrfs" or not lay.runs):
            rep.outcome = SKIPPED_SHARED
            return ItemResult(message=f"{lay.extents} extents, {lay.shared} shared with a snapshot or reflink: "
                                      "left alone (--allow-unshare to rewrite them)")
        if not lay.runs:
            rep.outcome = NO_GAIN
            return ItemResult(message=f"{lay.extents} extents, none a rewrite could merge")
        st = os.fstat(ctx.fd)         # before the rewrite: a write from now on must make the re-check rewrite again
        try:
            self._rewrite(state, ctx, fstype, lay)
        except rewrite.NotImproved as exc:
            rep.outcome = NO_GAIN
            return ItemResult(message=f"{lay.extents} extents, left alone: {exc}")
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ESTALE, errno.ENOTDIR):
                # Its name now leads nowhere or to another file (an editor saving by rename): nothing to rewrite,
                # and not a failure — a new file at that name is another item, for the next round.
                rep.outcome = VANISHED
                return ItemResult(counters={"vanished": 1}, message="deleted or replaced while being checked: "
                                                                    "not rewritten")
            if exc.errno != errno.ETXTBSY:
                raise
            rep.outcome = BUSY
            return ItemResult(message="in use as a running program: not rewritten")
        state.rewritten[f.id] = (st.st_size, st.st_mtime_ns)
        after = fiemap.layout(fiemap.extents(ctx.fd, sync=True), fstype, opts["allow_unshare"])
        rep.after, rep.shared = after.extents, after.shared
        rep.outcome = DEFRAGMENTED if after.extents < lay.extents else NO_GAIN
        return ItemResult(message=f"{lay.extents} → {after.extents} extents")

    @staticmethod
    def _fragmented(lay: fiemap.Layout, opts: dict[str, Any]) -> bool:
        """More extents than the ideal by the ``threshold`` factor, and small ones on average."""
        return (lay.excess > 0 and lay.extents >= opts["threshold"] * lay.ideal
                and lay.data_bytes < opts["extent_size"] * lay.extents)

    def _rewrite(self, state: RunState, ctx, fstype: str, lay: fiemap.Layout) -> None:
        """Open the file ourselves (a writable descriptor where the filesystem needs one), check it is still the
        inode the scheduler handed over, and rewrite it.

        The name is opened as :func:`~duet_core.scope.open_regular` opens it — only a regular file, so a fifo renamed
        over it since the scheduler opened it cannot block the run, nor a device be opened — and reopened for
        writing through ``/proc/self/fd``: the same inode, whatever the name points to meanwhile."""
        parent, name = os.path.split(ctx.file.relpath)
        dir_fd = open_beneath(state.root_fd, parent or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            fd = open_regular(dir_fd, name, ctx.file.fid.ino)
            if fstype == "ext4":      # btrfs defragments through a read-only descriptor (as root), so running
                ro = fd               # programs can be defragmented; ext4 moves extents through a writable one
                try:
                    fd = os.open(f"/proc/self/fd/{ro}", os.O_RDWR | os.O_CLOEXEC)
                finally:
                    os.close(ro)
            try:
                if file_id(fd) != ctx.file.fid:
                    raise OSError(errno.ESTALE, "replaced while being checked", ctx.path)
                if fstype == "btrfs":
                    rewrite.btrfs_defrag(fd, lay.runs, ctx.checkpoint)
                elif fstype == "ext4":
                    rewrite.ext4_defrag(fd, dir_fd, os.fstat(fd).st_size, lay.extents, ctx.checkpoint)
                else:
                    rewrite.xfs_defrag(dir_fd, name)
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)

    def _state(self, run) -> RunState:
        state = self._runs.get(run.run_id)
        if state is None:
            root_fd = os.open(run.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            state = self._runs[run.run_id] = RunState(root_fd)
        return state

    # -- the report ------------------------------------------------------------------------------------------------
    @hookimpl
    def duet_finish(self, run, report) -> dict[str, Any]:
        state = self._runs.pop(run.run_id, None)
        files = state.files if state else {}
        if state:
            os.close(state.root_fd)
        done = [r for r in files.values() if r.outcome == DEFRAGMENTED]
        worst = sorted((r for r in files.values() if r.outcome != OK), key=lambda r: r.ideal - r.before)
        count = lambda outcome: sum(1 for r in files.values() if r.outcome == outcome)  # noqa: E731
        return {
            "dry_run": bool(run.options["dry_run"]),
            "files_checked": len(files),
            "rechecks": state.rechecks if state else 0,
            "fragmented": sum(1 for r in files.values() if r.outcome != OK),
            "defragmented": len(done),
            "extents_before": sum(r.before for r in done),
            "extents_after": sum(r.after for r in done),
            "skipped_shared": count(SKIPPED_SHARED),
            "no_gain": count(NO_GAIN),
            "busy": count(BUSY),
            "vanished": count(VANISHED),
            "files": [{"path": r.path, "extents_before": r.before, "extents_after": r.after, "ideal": r.ideal,
                       "shared": r.shared, "outcome": r.outcome} for r in worst[:REPORT_FILES]],
        }


plugin = Defrag()
