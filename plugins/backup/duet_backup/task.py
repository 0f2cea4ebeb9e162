"""The backup task's work, hook by hook (:mod:`duet_backup` declares the task and forwards its hooks here).

``duet run backup --path /home --target /mnt/backup``:

* ``duet_plan`` validates the target (not inside the scope, not containing it), takes its lock and returns the
  files whose version ``(inode, size, mtime, ctime)`` differs from the last snapshot's manifest (and from the
  journal of copies already made for the next one): unchanged files are never read.
* ``duet_process`` copies each changed file into the tree being built — the btrfs mirror subvolume, or the staging
  tree on other filesystems — as the scheduler hands it over, cached files first and sharing its device read with
  the other tasks of the run. Each copy is exact (holes, owner, mode, xattrs and ACLs, ns times), hashed with
  blake3 on the way (published as the shared result ``blake3`` for scrub and gc), made durable in a batch and
  renamed into place, and noted in the journal; a file that changes while it is copied is copied again, and flagged
  if it keeps changing.
* ``duet_finish`` runs the sync pass over the whole scope (:mod:`duet_backup.tree`: directories, symlinks, hard
  links, deletions, anything not handed over), writes the manifest and publishes the snapshot atomically — unless
  the run stopped early, in which case the next run resumes where this one stopped.

Layout of the target: :mod:`duet_backup.target`. ``duet snapshots`` and ``duet restore``: :mod:`duet_backup.commands`.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import stat
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from duet_backup.fsops import CannotClone, clone_metadata_change, copy_file, open_dir, refresh_metadata, replace, syncfs
from duet_backup.target import Snapshot, Target
from duet_backup.tree import SyncResult, TreeSync, same_data, unchanged
from duet_core import ItemResult, units
from duet_core.errors import DuetError, Stopped, printable
from duet_core.identity import open_beneath
from duet_core.tasks import FileInfo

MANIFEST_FORMAT = 1


def say(line: str) -> None:
    """One line for the user on stderr (stdout is the run summary, one JSON line with --json)."""
    print(printable(f"duet: backup: {line}"), file=sys.stderr, flush=True)


# Copies are made durable in batches: one syncfs, then each is renamed into place and journaled.
BATCH_FILES = 1000
BATCH_BYTES = 64 << 20
BATCH_SECONDS = 1.0
DIR_CACHE = 64     # tree directories kept open by duet_process
# Errors only the target can cause (the source is only read): the target is full or read-only.
TARGET_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@dataclass
class _Pending:
    reldir: str
    tmp: str | None       # None: the tree's file was updated in place (only its metadata had changed)
    name: str
    relpath: str
    record: list
    nbytes: int


@dataclass
class _Open:
    """One run's hold on its target: the lock, the tree being built, what the last snapshot and journal hold, and
    the copies not yet durable (under temporary names)."""

    target: Target
    tree_fd: int
    latest: Snapshot | None
    published: dict[str, list]
    staged: dict[str, list]
    pending: list[_Pending] = field(default_factory=list)
    pending_bytes: int = 0
    flushed_at: float = field(default_factory=time.monotonic)
    _dirs: dict[str, int] = field(default_factory=dict)
    _committer: ThreadPoolExecutor | None = None
    _commits: list[Future] = field(default_factory=list)
    broken: str | None = None     # why the target cannot be written any more (full, read-only, gone)
    clones: bool = True           # hard-link target: may share extents (FICLONE) until it refuses once
    _prev_fd: int | None = None   # hard-link target: the previous snapshot, opened on first use
    marked: bool = False          # this run noted that the tree is about to change (Target.mark_tree_changed)

    def mark_changed(self) -> None:
        if not self.marked:
            self.target.mark_tree_changed()
            self.marked = True

    def target_failed(self, exc: OSError) -> bool:
        """Whether ``exc`` means the target itself failed, not one source file; remembers why. An error of the
        target alone (full, read-only) says so; any other error (EIO: the source or the target?) is settled by
        asking the target to sync its internal directory — a target whose device went away fails that too."""
        if self.broken is None:
            if exc.errno in TARGET_ERRNOS:
                self.broken = exc.strerror or str(exc)
            else:
                try:
                    os.fsync(self.target.internal)
                except OSError as probe:
                    self.broken = probe.strerror or str(probe)
        return self.broken is not None

    def broken_message(self) -> str:
        return (f"the backup target {self.target.path} cannot be written ({self.broken}): no snapshot published, "
                "the snapshots already there are intact; the next run resumes once the target is writable")

    def add(self, p: _Pending) -> None:
        self.pending.append(p)
        self.pending_bytes += p.nbytes
        if (len(self.pending) >= BATCH_FILES or self.pending_bytes >= BATCH_BYTES
                or time.monotonic() - self.flushed_at >= BATCH_SECONDS):
            self.flush(wait=False)

    def flush(self, wait: bool = True) -> None:
        """Make the pending copies durable (one syncfs of the target), then rename each into place and journal it.

        The batch is committed by a background thread while the next files are copied (syncfs and the renames
        overlap with the copying); ``wait`` waits for every batch handed over so far. A run killed before a batch
        is committed leaves only temporary names (removed by the next sync pass), and those files are copied again:
        a name in the tree always points at data that is on disk."""
        self.flushed_at = time.monotonic()
        if self.pending:
            if self._committer is None:
                self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backup-commit")
            self._commits.append(self._committer.submit(self._commit, list(self.pending)))
            self.pending.clear()
            self.pending_bytes = 0
        if wait:
            commits, self._commits = self._commits, []
            for c in commits:
                c.result()

    def _commit(self, batch: list[_Pending]) -> None:
        syncfs(self.tree_fd)
        dirs: dict[str, int] = {}
        committed = []
        try:
            for p in batch:
                try:
                    if p.tmp is not None:
                        if p.reldir not in dirs:
                            dirs[p.reldir] = open_dir(self.tree_fd, p.reldir, create=True)
                        replace(dirs[p.reldir], p.tmp, p.name)
                except (FileNotFoundError, NotADirectoryError):
                    # Its temporary copy went with a directory that an earlier copy of this batch replaced (a file
                    # that became a directory holding this one, then a file again): neither in the tree nor
                    # journaled; the sync pass copies what is at that name now.
                    continue
                self.staged[p.relpath] = p.record
                committed.append(p)
            self.target.journal_add_many([(p.relpath, p.record) for p in committed])
        finally:
            for fd in dirs.values():
                os.close(fd)

    def tree_dir(self, reldir: str) -> int:
        """The tree's directory ``reldir`` (created if missing), kept open while files of it keep coming (the
        scheduler hands files over in scan order, a directory at a time, except for cached ones)."""
        fd = self._dirs.get(reldir)
        if fd is None:
            if len(self._dirs) >= DIR_CACHE:
                for old in self._dirs.values():
                    os.close(old)
                self._dirs.clear()
            fd = self._dirs[reldir] = open_dir(self.tree_fd, reldir, create=True)
        return fd

    def current(self, f: FileInfo) -> bool:
        """The tree or the last snapshot already holds this version of the file."""
        want = [f.fid.ino, f.size, f.mtime_ns, f.ctime_ns]
        return any((rec := recs.get(f.relpath)) is not None and rec[:4] == want
                   for recs in (self.staged, self.published))

    def same_data(self, f: FileInfo) -> str | None:
        """The blake3 of the tree's copy of this file, when the only change since that copy could be metadata
        (same inode, size and mtime; another ctime: a chmod, chown, xattr or ACL change) and the copy may be
        changed in place: the tree is the btrfs mirror (snapshots are subvolumes of their own), or there is no
        earlier snapshot whose hard links it could share. None otherwise."""
        if not (self.target.btrfs or self.latest is None):
            return None
        return same_data(self.staged, self.published, f.relpath, f.fid.ino, f.size, f.mtime_ns)

    def prev_data(self, f: FileInfo) -> str | None:
        """On a hard-link target, the blake3 of the previous snapshot's copy of this file when only metadata can have
        changed since (same inode, size and mtime): that copy can be cloned, not copied. None otherwise."""
        if self.target.btrfs or self.latest is None or not self.clones:
            return None
        return same_data({}, self.published, f.relpath, f.fid.ino, f.size, f.mtime_ns)

    def clone(self, ctx, tree_dir: int, reldir: str, name: str, digest: str):
        """:func:`~duet_backup.fsops.clone_metadata_change` from the previous snapshot; None: copy instead."""
        try:
            if self._prev_fd is None:
                self._prev_fd = self.target.open_snapshot(self.latest.name)
            prev_dir = open_beneath(self._prev_fd, reldir or ".", os.O_RDONLY | os.O_DIRECTORY)
        except (OSError, DuetError):     # the previous snapshot or its directory is gone (removed by hand)
            return None
        try:
            return clone_metadata_change(ctx.fd, prev_dir, tree_dir, name, digest, ctx.checkpoint)
        except CannotClone:
            self.clones = False       # ext4: no extent sharing; every later one is copied without trying
            return None
        finally:
            os.close(prev_dir)

    def staged_in_tree(self, f: FileInfo, tree_dir: int, name: str) -> bool:
        """The journal says this version was copied into the tree, and the tree's file agrees (size, mtime)."""
        rec = self.staged.get(f.relpath)
        if rec is None or rec[:4] != [f.fid.ino, f.size, f.mtime_ns, f.ctime_ns]:
            return False
        try:
            st = os.stat(name, dir_fd=tree_dir, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (f.size, f.mtime_ns)

    def close(self) -> None:
        if self._committer is not None:
            self._committer.shutdown(wait=True)
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self._prev_fd is not None:
            os.close(self._prev_fd)
        os.close(self.tree_fd)
        self.target.close()


class BackupTask:
    """The backup task (see the module docstring): one per process, holding each run's target while it runs."""

    def __init__(self) -> None:
        self._open: dict[int, _Open] = {}

    def _hold(self, run) -> _Open:
        """Open, check and lock the target once per run."""
        held = self._open.get(run.run_id)
        if held is None:
            try:
                target = Target(run.options["target"], scope=run.root)
            except OSError as exc:    # read-only, gone, not ours to write: the run is refused in one line
                raise DuetError(f"cannot use the backup target {run.options['target']}: {exc.strerror or exc}",
                                hint="a backup target must be a writable directory") from None
            try:
                target.lock()
                latest = target.latest()
                held = _Open(target, target.open_tree(), latest, latest.manifest.get("files", {}) if latest else {},
                             target.journal())
            except OSError as exc:
                target.close()
                raise DuetError(f"cannot use the backup target {target.path}: {exc.strerror or exc}",
                                hint="a backup target must be a writable directory") from None
            except BaseException:
                target.close()
                raise
            self._open[run.run_id] = held
        return held

    def plan(self, run, files):
        held = self._hold(run)
        return [f.id for f in files if not held.current(f)]

    def process(self, ctx):
        held = self._hold(ctx.run)
        held.mark_changed()
        f = ctx.file
        reldir, _, name = f.relpath.rpartition("/")
        tree_dir = held.tree_dir(reldir)
        if held.staged_in_tree(f, tree_dir, name):
            # Copied by an earlier run of this round that was killed before its progress was committed.
            return ItemResult(counters={"already_copied": 1})
        if held.broken is not None:
            return ItemResult(done=False)      # left for the next run: the target failed (said once, below)
        try:
            copied = None
            if (digest := held.same_data(f)) is not None:
                copied = refresh_metadata(ctx.fd, tree_dir, name, digest, ctx.checkpoint)
                counters = {"metadata_only": 1}
            elif (digest := held.prev_data(f)) is not None:
                copied = held.clone(ctx, tree_dir, reldir, name, digest)
                counters = {"metadata_only": 1}
            if copied is None:
                copied = copy_file(ctx.fd, tree_dir, name, durable=False, checkpoint=ctx.checkpoint)
                counters = {"copied": 1, "copied_bytes": copied.nbytes}
        except OSError as exc:
            if not held.target_failed(exc):
                raise
            return ItemResult(done=False, message=held.broken_message())
        record = [*copied.sig, copied.blake3]
        held.add(_Pending(reldir, copied.tmp, name, f.relpath, record, copied.nbytes))
        ctx.progress.advance(copied.nbytes)   # holes are not read
        if copied.changed:
            counters["changed_during_backup"] = 1
            return ItemResult(counters=counters, message="changed while being copied: the copy may mix versions")
        ino, size, mtime_ns, ctime_ns = copied.sig
        if ino == f.fid.ino:
            ctx.shared.put(FileInfo(f.id, f.fid, f.relpath, size, mtime_ns, ctime_ns), "blake3", copied.blake3)
        return ItemResult(counters=counters)

    def finish(self, run, report):
        out = self._finish(run, report)
        if out.get("snapshot"):
            c = report.counters
            copied = c.get("copied", 0) + out.get("copied_at_finish", 0)
            refreshed = c.get("metadata_only", 0) + out.get("metadata_only_at_finish", 0)
            say(f"snapshot {out['snapshot']} published: {out['path']} ({out['files']} files, "
                f"{units.format_bytes(out['bytes'])}; {copied} copied"
                + (f", {refreshed} with new metadata only" if refreshed else "")
                + (", nothing changed" if out.get("unchanged") else "") + ")")
        elif "note" in out:
            say(out["note"])
        return out

    def _finish(self, run, report):
        held = self._hold(run)
        del self._open[run.run_id]
        target = held.target
        try:
            try:
                held.flush()
                stopped = {"snapshot": None, "target": target.path,
                           "note": "stopped early: no snapshot published; the next run resumes"}
                if held.broken is None and (run.stopping() or
                                            report.items_done + report.items_failed < report.items_total):
                    return stopped
                if held.broken is None:
                    try:
                        return self._publish(run, report, held)
                    except Stopped:     # SIGTERM during the sync pass: the next run's pass goes on from here
                        return stopped
            except OSError as exc:
                if not held.target_failed(exc):
                    raise
            # The target failed: nothing is published; the run fails with one line saying why.
            report.items_failed += 1
            report.errors.append(held.broken_message())
            return {"snapshot": None, "target": target.path, "error": held.broken_message()}
        finally:
            held.close()

    def _publish(self, run, report, held: _Open) -> dict:
        target = held.target
        src_fd = os.open(run.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            result = self._unchanged(run, held, src_fd)
            if result is None:
                result = self._sync(run, held, src_fd)
        finally:
            os.close(src_fd)
        name = target.new_name()
        kind = "btrfs" if target.btrfs else "hardlink"
        manifest = {
            "format": MANIFEST_FORMAT, "snapshot": name, "scope": run.root, "kind": kind,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "base": held.latest.name if held.latest else None,
            "exclude": run.exclude.record(), "one_file_system": run.one_file_system,
            "files": result.files, "entries": result.entries,
            "bytes": sum(rec[1] for rec in result.files.values()),
            "changed_during_backup": result.changed, "special_files": result.special, "errors": result.errors,
        }
        target.publish(name, manifest)
        if result.errors:   # the snapshot is published without these entries: the run reports them and exits 1
            report.items_failed += len(result.errors)
            report.errors.extend(result.errors)
        return {"snapshot": name, "path": os.path.join(target.path, "snapshots", name), "kind": kind,
                "files": len(result.files), "bytes": manifest["bytes"], "copied_at_finish": result.copied,
                "metadata_only_at_finish": result.metadata_only,
                "linked": result.linked, "vanished": result.vanished,
                "changed_during_backup": result.changed, "special_files": result.special,
                "unchanged": result.unchanged}

    def _sync(self, run, held: _Open, src_fd: int) -> SyncResult:
        """The sync pass over the whole scope (:class:`~duet_backup.tree.TreeSync`): the tree becomes the scope."""
        held.mark_changed()
        prev_fd = None
        if not held.target.btrfs and held.latest is not None:
            prev_fd = held.target.open_snapshot(held.latest.name)
        try:
            return TreeSync(src_fd, held.tree_fd, held.staged, held.published, prev_fd,
                            on_copy=held.target.journal_add, fatal=held.target_failed,
                            checkpoint=run.checkpoint, exclude=run.exclude,
                            one_file_system=run.one_file_system, clones=held.clones).run()
        finally:
            if prev_fd is not None:
                os.close(prev_fd)

    def _unchanged(self, run, held: _Open, src_fd: int) -> SyncResult | None:
        """Nothing changed since the last snapshot, and the btrfs mirror is still exactly that snapshot: the new
        snapshot is taken of the mirror as it is, without the sync pass (the result is the last manifest's).
        None when that cannot be shown, and the full pass runs.

        "Nothing changed" is checked entry by entry (:func:`~duet_backup.tree.unchanged`: one ``stat`` each, no
        listing), against the versions the last pass recorded; "the mirror is that snapshot" holds when the target
        says so (``Target.tree_is``: it was published from the mirror, and no run has written to the mirror since —
        not a newer snapshot deleted by hand, not a killed run's stray copies), no copy is journaled, and the last
        snapshot is complete (no errors, nothing that changed while copied), made with the same exclusions and
        ``one_file_system`` as this run. On other filesystems every snapshot is
        a new tree of links, so there the full pass always runs."""
        latest = held.latest.manifest if held.latest else None
        if (not held.target.btrfs or not latest or "entries" not in latest or latest.get("scope") != run.root
                or latest.get("exclude") != run.exclude.record()
                or latest.get("one_file_system", False) != run.one_file_system
                or latest.get("errors") or latest.get("changed_during_backup") or held.staged
                or held.marked or not held.target.tree_is(held.latest.name)):
            return None
        if not unchanged(src_fd, latest["files"], latest["entries"], run.checkpoint):
            return None
        return SyncResult(files=latest["files"], entries=latest["entries"],
                          special=list(latest.get("special_files", [])), unchanged=True)


