"""duet gc: space reclamation — the counterpart of Duet's log-structured garbage collection.

Two jobs, either or both in one run (docs/gc.md):

* **Deduplication** over the scope: files of equal size are hashed (blake3 of the whole file — reused from
  ``ctx.shared`` when another task of this or an earlier run already hashed this very version, so a
  ``duet run backup gc`` reads each file once), cached files first as the scheduler hands them over. The first file
  seen with a given (filesystem, size, hash) becomes that content's *representative*, remembered in the task's
  state across runs; every later file with the same content is made to share the representative's extents with
  ``FIDEDUPERANGE``, where the kernel compares the bytes itself. Nothing is copied or replaced. On filesystems
  without dedupe (ext4...) gc only reports what could be reclaimed.
* **Retention** over a backup target (``--target T --keep-… N [--prune]``), restic ``forget`` semantics, in
  ``duet_finish`` — after the tasks listed before gc (a backup) have published their snapshot. A dry run unless
  ``--prune``.

Safety: a file is deduplicated only if neither it nor its representative changed since they were hashed (size,
mtime, ctime and inode compared right before the ioctl), and the representative is opened beneath the scope
without following symlinks. The newest snapshot is never removed.
"""

from __future__ import annotations

import errno
import os
import sys
from collections import Counter
from typing import Any

import blake3
from pyroaring import BitMap

from duet_core import Event, ItemResult, TaskOption, TaskSpec, hookimpl, residency
from duet_core.errors import DuetError
from duet_core.filesystems import fs_magic
from duet_core.identity import file_id
from duet_core.scheduler import runs_of
from duet_core.scope import open_regular
from duet_core.units import format_bytes
from duet_gc import extents
from duet_gc.retention import RULES, Policy, Target, run_retention

HASH = "blake3"                  # the shared-result name every task uses for a whole-file blake3 hex digest
READ_CHUNK = 1 << 20
# FIDEDUPERANGE errors that mean "this filesystem (or this file) will not dedupe": reported, not failures.
REFUSALS = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EROFS, errno.EPERM, errno.EACCES, errno.EXDEV,
            errno.ETXTBSY, errno.EBUSY}


def say(line: str) -> None:
    """One line for the user on stderr (stdout is the run summary, one JSON line with --json)."""
    print(f"duet: gc: {line}", file=sys.stderr, flush=True)


def policy_of(options: dict[str, Any]) -> Policy:
    return Policy(**{rule: options.get(f"keep_{rule}") or 0 for rule in RULES},
                  within=options.get("keep_within") or 0.0)


class Gc:
    """The gc task. One instance serves every run of the process; per-run data is keyed by run id."""

    def __init__(self) -> None:
        self._sizes: dict[int, tuple[Counter, BitMap]] = {}   # run id -> (files per size, the ids counted)
        self._refused: set[int] = set()          # runs whose retention options were refused in duet_plan
        # Twins still to come, to keep a representative cached until its last same-size candidate was compared:
        self._left: dict[int, Counter] = {}      # run id -> planned files per size not processed yet
        self._kept: dict[int, dict[int, list[int]]] = {}   # run id -> size -> file ids kept cached

    @hookimpl
    def duet_task(self) -> TaskSpec:
        keep = tuple(TaskOption(f"keep_{rule}", "int", default=0,
                                help=("keep the N newest snapshots" if rule == "last" else
                                      f"keep the newest snapshot of each of the last N {rule} buckets") +
                                " (-1: all)") for rule in RULES)
        return TaskSpec(
            "gc", "reclaim space: dedupe identical files (btrfs, xfs); snapshot retention with --target",
            events=Event.EXISTS,
            options=(
                TaskOption("dedupe", "bool", default=True, help="deduplicate identical files of the scope"),
                TaskOption("min_size", "size", default=4096, help="ignore files smaller than this"),
                TaskOption("target", "path", help="backup target whose snapshots/ retention applies to"),
                *keep,
                TaskOption("keep_within", "duration", default=0,
                           help="keep every snapshot made within this long of the newest one, e.g. 30d"),
                TaskOption("prune", "bool", default=False,
                           help="remove the snapshots the policy drops (default: dry run, list them)"),
            ),
            api_version=1)

    @hookimpl
    def duet_check(self, root, options):
        """Bad retention counts and a --target that is no directory refuse the run before anything is written
        (whether it holds snapshots/ is checked in duet_plan: a backup in the same run may create it)."""
        if options.get("target"):
            policy_of(options)
            if not os.path.isdir(options["target"]):
                raise DuetError(f"backup target {options['target']} is not an existing directory")

    # -- planning: only files that have a same-size twin in the scope ------------------------------------------
    @hookimpl
    def duet_plan(self, run, files):
        opts = run.options
        if opts.get("target"):
            try:
                policy_of(opts)          # a bad count is bad input: said now (once, by duet), before any work
                Target(opts["target"])   # and so is a target that is not one
            except DuetError:
                self._refused.add(run.run_id)
                raise
        if not opts.get("dedupe", True):
            return []
        if run.run_id not in self._sizes:
            every = list(run.files())
            self._sizes[run.run_id] = (Counter(f.size for f in every), BitMap(f.id for f in every))
        sizes, counted = self._sizes[run.run_id]
        for f in files:              # files that appeared during the run are planned one by one: count them too
            if f.id not in counted:
                counted.add(f.id)
                sizes[f.size] += 1
        min_size = max(1, opts.get("min_size") or 1)
        chosen = [f for f in files if f.size >= min_size and sizes[f.size] >= 2]
        self._left.setdefault(run.run_id, Counter()).update(f.size for f in chosen)
        return [f.id for f in chosen]

    # -- one file: hash it, then share its extents with its representative --------------------------------------
    @hookimpl
    def duet_process(self, ctx):
        try:
            return self._process(ctx)
        finally:
            self._one_less(ctx.run, ctx.file.size)

    def _one_less(self, run, size: int) -> None:
        """One file fewer of ``size`` to come in this run: with none left, its representatives need not stay cached."""
        left = self._left.get(run.run_id)
        if left is None or left[size] <= 0:
            return
        left[size] -= 1
        if left[size] == 0 and run.release_cached:
            for file_id in self._kept.get(run.run_id, {}).pop(size, []):
                run.release_cached(file_id)

    def _process(self, ctx):
        f = ctx.file
        digest = ctx.shared.get(f, HASH)
        counters: Counter = Counter()
        if digest is None:
            digest = self._hash(ctx)
            if not _unchanged(ctx.fd, f):
                return ItemResult(done=False, counters={"changed_while_hashing": 1},
                                  message=f"{f.relpath} changed while it was hashed: left for the next round")
            ctx.shared.put(f, HASH, digest)
            counters["hashed_files"] += 1
        else:
            counters["hash_reused_files"] += 1
        key = f"rep|{ctx.run.root}|{f.fid.dev}|{f.size}|{digest}"
        rep = ctx.state.get(key)
        if rep is None or rep["relpath"] == f.relpath:
            ctx.state.put(key, _version(f))
            # The representative: twins still to come are compared with it, so keep what was read of it cached
            # (the kernel's compare would otherwise read it again from the device).
            keep = self._left.get(ctx.run.run_id, Counter())[f.size] > 1
            if keep:
                self._kept.setdefault(ctx.run.run_id, {}).setdefault(f.size, []).append(f.id)
            return ItemResult(counters=dict(counters), keep_cached=keep)
        counters.update(self._share(ctx, key, rep))
        return ItemResult(counters=dict(counters))

    def _hash(self, ctx) -> str:
        h = blake3.blake3()
        off = 0
        while chunk := os.pread(ctx.fd, READ_CHUNK, off):
            ctx.checkpoint()     # the rate limit, and a stop: the hash is abandoned, the file hashed next run
            h.update(chunk)
            off += len(chunk)
            ctx.progress.advance(len(chunk))
        return h.hexdigest()

    def _share(self, ctx, key: str, rep: dict) -> Counter:
        """Make ``ctx.file`` share the extents of its representative ``rep`` (same size and hash)."""
        f = ctx.file
        out: Counter = Counter()
        try:
            rep_fd = _open_in_scope(ctx.run.root, rep["relpath"])
        except OSError:
            ctx.state.put(key, _version(f))     # the representative is gone: this file takes its place
            out["stale_representatives"] += 1
            return out
        try:
            if not _matches(rep_fd, rep):
                ctx.state.put(key, _version(f))  # changed since it was hashed: never dedupe against it
                out["stale_representatives"] += 1
                return out
            kind = extents.DEDUPE_FILESYSTEMS.get(fs_magic(ctx.fd))
            if kind is None:
                out["duplicate_files"] += 1
                out["reclaimable_bytes"] += f.size
                return out
            src_ext, dst_ext = extents.fiemap(rep_fd, f.size), extents.fiemap(ctx.fd, f.size)
            already = extents.same_physical_bytes(src_ext, dst_ext, f.size)
            if already >= f.size:
                out["already_shared_files"] += 1
                return out
            blk = os.fstat(ctx.fd).st_blksize or 4096
            freed = extents.exclusive_bytes(dst_ext, -(-f.size // blk) * blk)   # whole blocks are freed
            if not _unchanged(ctx.fd, f):
                out["changed_before_dedupe"] += 1
                say(f"{f.relpath} changed since it was hashed: not deduplicated")
                return out
            before = residency.resident_pages(rep_fd, f.size)
            # The kernel's compare reads what is not cached one page at a time; read ahead in large I/Os instead.
            os.posix_fadvise(rep_fd, 0, f.size, os.POSIX_FADV_WILLNEED)
            try:
                deduped, differs = extents.dedupe(rep_fd, ctx.fd, f.size, ctx.checkpoint)
            except OSError as exc:
                if exc.errno not in REFUSALS:
                    raise
                out["dedupe_refused_files"] += 1
                say(f"{f.relpath}: {kind} refused to dedupe it: {exc.strerror}")
                return out
            finally:
                _evict_new(rep_fd, f.size, before)   # the kernel read the representative to compare: cache hygiene
            if differs:
                out["differed_files"] += 1           # changed under us (or a hash collision): the kernel refused
                return out
            out["duplicate_files"] += 1
            out["deduped_files"] += 1
            out["deduped_bytes"] += deduped - already
            out["reclaimed_bytes"] += freed if deduped == f.size else min(freed, deduped)
            return out
        finally:
            os.close(rep_fd)

    # -- the end of the run: retention ------------------------------------------------------------------------
    @hookimpl
    def duet_finish(self, run, report):
        self._sizes.pop(run.run_id, None)
        self._left.pop(run.run_id, None)
        self._kept.pop(run.run_id, None)       # duet evicts what is still kept at the end of the run
        c = report.counters
        extra: dict[str, Any] = {}
        if run.options.get("dedupe", True):
            done = c.get("deduped_files", 0)
            if done or c.get("reclaimable_bytes"):
                say(f"{done} file(s) deduplicated, {format_bytes(c.get('reclaimed_bytes', 0))} reclaimed"
                    + (f"; {c.get('duplicate_files', 0)} duplicate file(s) ({format_bytes(c['reclaimable_bytes'])}) "
                       "could be reclaimed on a filesystem that dedupes" if c.get("reclaimable_bytes") else ""))
        target = run.options.get("target")
        if target and run.run_id in self._refused:
            self._refused.discard(run.run_id)    # already said, by duet, when duet_plan refused it
        elif target and run.stopping():
            say(f"retention on {target} left for the next run: this one was stopped")
        elif target:
            try:
                rep = run_retention(target, policy_of(run.options), bool(run.options.get("prune")), say)
            except (OSError, DuetError) as exc:
                report.items_failed += 1
                report.errors.append(f"retention: {exc}")
                say(f"retention on {target} failed: {exc}")
                return extra
            extra["retention"] = rep.as_dict()
            if rep.errors:                      # make the run exit 1, with the reasons in its report
                report.items_failed += len(rep.errors)
                report.errors.extend(f"retention: {e}" for e in rep.errors)
            verb = "removed" if rep.pruned else "would remove"
            gone = rep.removed if rep.pruned else rep.remove
            say(f"retention on {rep.target} ({rep.policy}): keeping {len(rep.keep)}, {verb} {len(gone)}"
                + ("" if rep.pruned or not gone else " (dry run: add --prune)"))
        return extra


def _version(f) -> dict:
    return {"relpath": f.relpath, "fid": list(f.fid), "size": f.size, "mtime_ns": f.mtime_ns,
            "ctime_ns": f.ctime_ns}


def _unchanged(fd: int, f) -> bool:
    """Whether the open file is still the version ``f`` describes (inode, size, mtime, ctime)."""
    st = os.fstat(fd)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (f.fid.ino, f.size, f.mtime_ns, f.ctime_ns)


def _matches(fd: int, rep: dict) -> bool:
    """Whether the open file is the very file and version recorded as a representative."""
    st = os.fstat(fd)
    if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (rep["size"], rep["mtime_ns"], rep["ctime_ns"]):
        return False
    return list(file_id(fd)) == rep["fid"]


def _open_in_scope(root: str, relpath: str) -> int:
    """Open a representative by its recorded path, as :func:`~duet_core.scope.open_regular` opens a scanned name:
    only a regular file, never through a symlink, never out of the scope. It was recorded by an earlier item or run,
    and its name may hold a fifo by now (a blocking open would hang the run) or a device (opened as data)."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_regular(root_fd, relpath)
    finally:
        os.close(root_fd)


def _evict_new(fd: int, size: int, before) -> None:
    """Evict the pages of ``fd`` that were not cached ``before`` (what gc itself brought in)."""
    for first, count in runs_of(residency.resident_pages(fd, size) - before):
        residency.evict(fd, first * residency.PAGE_SIZE, count * residency.PAGE_SIZE)


plugin = Gc()
