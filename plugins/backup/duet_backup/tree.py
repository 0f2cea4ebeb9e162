"""The sync pass: make a tree an exact mirror of the source tree, reusing every file copy it can trust.

``duet_process`` copies changed files into the tree cache-first as the scheduler hands them over; this pass, run by
``duet_finish``, walks the whole source once and does the rest: directories (their owner, mode, xattrs/ACLs and
mtimes set last, deepest first), symlinks (as links), hard links inside the scope (one inode in the tree, linked
under every name), deletions, special files (fifos, sockets, devices: recreated with mknod, never opened), stray
temporary files of killed runs, and any regular file whose copy in the tree is not the current version (created
after the scan, or a copy that failed) — so the tree is complete whatever the scheduler did or did not hand over.

A regular file's copy is trusted when a record says which source version ``(inode, size, mtime, ctime)`` it was
made from and the tree's file still has that size and mtime: ``staged`` (the journal of copies made since the last
snapshot) or ``published`` (the last snapshot's manifest). With ``prev_fd`` (hard-link snapshots on filesystems
other than btrfs) an unchanged file is linked from the previous snapshot instead of being copied.

The pass records the version of every other entry too (directories, symlinks, special files: ``entries``), so the
next run can tell with :func:`unchanged` — one ``stat`` per entry, no directory listing — that nothing at all
changed since, and skip this pass (see ``BackupTask._publish``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from duet_backup.fsops import (
    CannotClone,
    clone_metadata_change,
    copy_file,
    copy_xattrs,
    open_dir,
    refresh_metadata,
    replace,
    sig,
    tmp_name,
)
from duet_core.exclude import NOTHING, Exclusions
from duet_core.filesystems import remove_tree_at
from duet_core.identity import DevMap, open_beneath
from duet_core.scope import open_regular

Record = list   # [inode, size, mtime ns, ctime ns, blake3 hex]
MAX_LISTED = 100


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def open_source(dir_fd: int, name: str, rel: str) -> int:
    """Open the source file ``name`` (an entry of ``dir_fd`` listed as a regular file) for reading, through
    :func:`~duet_core.scope.open_regular`: never through a symlink, and never a fifo or a device — the name may have
    been renamed over since it was listed, and a blocking open of a fifo would hang the run (as root), opening a
    device could act on it. Anything but a regular file now is FileNotFoundError: gone from under that name, like a
    deleted file (the next pass finds what replaced it)."""
    try:
        return open_regular(dir_fd, name)
    except OSError as exc:
        if exc.errno == errno.EINVAL:     # open_regular: not a regular file (any more)
            raise FileNotFoundError(errno.ENOENT, f"replaced since listed: {exc.strerror}", rel) from None
        raise


@dataclass
class SyncResult:
    """What the pass found and did; ``files`` is the manifest of regular files: relpath -> Record."""

    files: dict[str, Record] = field(default_factory=dict)
    # relpath -> [inode, mtime ns, ctime ns] of every directory ("" is the root), symlink and special file, as
    # stat'ed before it was listed or copied: what :func:`unchanged` compares with.
    entries: dict[str, list[int]] = field(default_factory=dict)
    copied: int = 0
    copied_bytes: int = 0
    metadata_only: int = 0    # copies brought up to date in place: only the source's metadata had changed
    linked: int = 0
    dirs: int = 0
    symlinks: int = 0
    vanished: int = 0
    changed: list[str] = field(default_factory=list)    # changed while copied (copy kept, flagged)
    special: list[str] = field(default_factory=list)    # fifos, sockets, devices (recreated, never opened)
    errors: list[str] = field(default_factory=list)
    unchanged: bool = False   # no pass was needed: nothing changed since the last snapshot (BackupTask._unchanged)


@dataclass
class _Member:
    reldir: str
    name: str
    st: os.stat_result

    @property
    def rel(self) -> str:
        return join(self.reldir, self.name)


class TreeSync:
    """Mirror the tree below ``src_fd`` into ``tree_fd``. See the module docstring."""

    def __init__(self, src_fd: int, tree_fd: int, staged: dict[str, Record] | None = None,
                 published: dict[str, Record] | None = None, prev_fd: int | None = None,
                 on_copy: Callable[[str, Record], None] | None = None,
                 fatal: Callable[[OSError], bool] | None = None,
                 checkpoint: Callable[[], None] | None = None,
                 exclude: Exclusions = NOTHING, one_file_system: bool = False, clones: bool = True):
        self.src_fd, self.tree_fd, self.prev_fd = src_fd, tree_fd, prev_fd
        # What the scope leaves out (RunInfo.exclude, .one_file_system): not copied, and removed from the tree.
        self.exclude, self.one_file_system = exclude, one_file_system
        self._devmap = DevMap()
        self._root_dev = self._devmap.info(os.fstat(src_fd).st_dev, src_fd).dev if one_file_system else 0
        self._sealed: set[str] = set()    # directories on another filesystem (-x): kept, as if empty (not listed)
        self.staged, self.published = staged or {}, published or {}
        self.on_copy = on_copy or (lambda rel, rec: None)
        # An error that is the tree's, not one entry's (the target is full, read-only, gone): the pass stops.
        self.fatal = fatal or (lambda exc: False)
        # Called before each directory and each chunk of a copy: it raises to end the pass (the run is stopping);
        # the tree is then part way to the source, and the next pass goes on from there.
        self.checkpoint = checkpoint or (lambda: None)
        self.result = SyncResult()
        self._dirs: list[tuple[str, os.stat_result]] = []
        self._groups: dict[tuple[int, int], list[_Member]] = {}
        # The target may share extents between files (FICLONE), until it refuses once (the run's own path may have
        # found out already: ``clones=False``).
        self._clones = clones

    def run(self) -> SyncResult:
        root = os.fstat(self.src_fd)
        self._dirs.append(("", root))
        self.result.entries[""] = entry_sig(root)
        stack = [""]
        while stack:
            self.checkpoint()
            self._sync_dir(stack.pop(), stack)
        for members in self._groups.values():
            self._sync_links(members)
        for reldir, st in reversed(self._dirs):
            self._dir_metadata(reldir, st)
        return self.result

    # -- one directory -----------------------------------------------------------------------------------------
    def _sync_dir(self, reldir: str, stack: list[str]) -> None:
        try:
            src_dir = open_beneath(self.src_fd, reldir or ".", os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            self._dir_gone(reldir)   # deleted, or replaced by a file, fifo or symlink, since its parent was listed
            return
        tree_dir = prev_dir = -1
        try:
            tree_dir = open_dir(self.tree_fd, reldir, create=True)
            prev_dir = self._open_prev(reldir)
            entries = [] if reldir in self._sealed else self._listing(src_dir, reldir)
            have = {}
            with os.scandir(tree_dir) as it:
                for e in it:
                    have[e.name] = e
            kinds = {name: stat.S_IFMT(st.st_mode) for name, st in entries}
            for name, e in have.items():
                if name not in kinds or not _same_kind(e, kinds[name]):
                    remove_tree_at(tree_dir, name)
            for name, st in entries:
                rel = join(reldir, name)
                try:
                    if stat.S_ISDIR(st.st_mode):
                        if name not in have or not have[name].is_dir(follow_symlinks=False):
                            os.mkdir(name, 0o700, dir_fd=tree_dir)
                        self._dirs.append((rel, st))
                        self.result.dirs += 1
                        self.result.entries[rel] = entry_sig(st)
                        if self._foreign(st, src_dir, name):
                            self._sealed.add(rel)   # the mount point is kept (as rsync -x does), not what is on it
                        stack.append(rel)
                    elif stat.S_ISLNK(st.st_mode):
                        self._sync_symlink(src_dir, tree_dir, name, st)
                        self.result.entries[rel] = entry_sig(st)
                    elif stat.S_ISREG(st.st_mode):
                        if st.st_nlink > 1:
                            self._groups.setdefault((st.st_dev, st.st_ino), []).append(_Member(reldir, name, st))
                        else:
                            self._sync_file(src_dir, tree_dir, prev_dir, reldir, name, st, name in have)
                    else:
                        self._sync_special(tree_dir, name, st)
                        self.result.entries[rel] = entry_sig(st)
                        if len(self.result.special) < MAX_LISTED:
                            self.result.special.append(rel)
                except FileNotFoundError:
                    self.result.vanished += 1   # deleted since we listed it: not an error
                except OSError as exc:
                    if self.fatal(exc):
                        raise
                    self.result.errors.append(f"{rel}: {exc.strerror or exc}")
        finally:
            for fd in (src_dir, tree_dir, prev_dir):
                if fd >= 0:
                    os.close(fd)

    def _listing(self, src_dir: int, reldir: str) -> list[tuple[str, os.stat_result]]:
        """The source directory's entries with their ``lstat``, less what the scope excludes."""
        entries = []
        exclude = self.exclude
        with os.scandir(src_dir) as it:
            for e in it:
                if exclude and exclude.excluded(join(reldir, e.name), e.name, e.is_dir(follow_symlinks=False)):
                    continue
                try:
                    entries.append((e.name, e.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    self.result.vanished += 1
        return entries

    def _foreign(self, st: os.stat_result, src_dir: int, name: str) -> bool:
        """A directory on another filesystem than the root's (a nested btrfs subvolume is the same one), when the
        scope stays on one filesystem."""
        if not self.one_file_system:
            return False
        return self._devmap.info(st.st_dev, name, src_dir).dev != self._root_dev

    def _dir_gone(self, reldir: str) -> None:
        """A directory its parent's listing showed is no longer one: it is left out, like a file deleted since it
        was listed — its copy in the tree (made from that listing, or by an earlier pass) is removed and it is not
        recorded, so no snapshot holds it half synced. The next pass finds whatever took its name."""
        self.result.vanished += 1
        self.result.dirs -= 1
        del self.result.entries[reldir]
        self._dirs = [(rel, st) for rel, st in self._dirs if rel != reldir]
        parent, _, name = reldir.rpartition("/")
        tree_parent = open_dir(self.tree_fd, parent)
        try:
            remove_tree_at(tree_parent, name)
        finally:
            os.close(tree_parent)

    def _open_prev(self, reldir: str) -> int:
        if self.prev_fd is None:
            return -1
        try:
            return open_beneath(self.prev_fd, reldir or ".", os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return -1

    # -- regular files -----------------------------------------------------------------------------------------
    def _trusted(self, tree_dir: int, prev_dir: int, name: str, rel: str, st: os.stat_result,
                 in_tree: bool = True) -> Record | None:
        """The record of a copy of this very version already in the tree (linked there from the previous
        snapshot if need be), or None. ``in_tree`` False: the tree's listing has no such name (saves a stat)."""
        want = list(sig(st))
        rec = self.staged.get(rel)
        if in_tree and rec and rec[:4] == want and _holds(tree_dir, name, st):
            return rec
        rec = self.published.get(rel)
        if not rec or rec[:4] != want:
            return None
        if prev_dir < 0:   # btrfs mirror: the tree still holds what the last snapshot holds
            return rec if in_tree and _holds(tree_dir, name, st) else None
        if not _holds(prev_dir, name, st):
            return None
        if in_tree and _same_inode(prev_dir, tree_dir, name):
            return rec
        link_into(prev_dir, name, tree_dir, name)
        self.result.linked += 1
        return rec

    def _sync_file(self, src_dir: int, tree_dir: int, prev_dir: int, reldir: str, name: str,
                   st: os.stat_result, in_tree: bool = True) -> Record | None:
        rel = join(reldir, name)
        rec = self._trusted(tree_dir, prev_dir, name, rel, st, in_tree)
        if rec is None:
            fd = open_source(src_dir, name, rel)
            try:
                copied = None
                if in_tree and (digest := self._same_data(rel, st)) is not None:
                    # Durable now, as the pass's copies are: on_copy journals it below.
                    copied = refresh_metadata(fd, tree_dir, name, digest, self.checkpoint, durable=True)
                elif prev_dir >= 0 and (digest := self._prev_data(rel, st)) is not None:
                    try:
                        copied = clone_metadata_change(fd, prev_dir, tree_dir, name, digest, self.checkpoint,
                                                       durable=True)
                    except CannotClone:
                        self._clones = False
                if copied is not None:
                    self.result.metadata_only += 1
                if copied is None:
                    copied = copy_file(fd, tree_dir, name, checkpoint=self.checkpoint)
                    self.result.copied += 1
                    self.result.copied_bytes += copied.nbytes
            finally:
                os.close(fd)
            rec = [*copied.sig, copied.blake3]
            self.on_copy(rel, rec)
            if copied.changed:
                self.result.changed.append(rel)
        self.result.files[rel] = rec
        return rec

    def _same_data(self, rel: str, st: os.stat_result) -> str | None:
        """The blake3 of the tree's copy when only the file's metadata may have changed since it was made (same
        inode, size and mtime) and the copy is the tree's own to change in place — no earlier snapshot's hard links
        (``prev_fd``) can share it. See :func:`~duet_backup.fsops.refresh_metadata`."""
        if self.prev_fd is not None:
            return None
        return same_data(self.staged, self.published, rel, st.st_ino, st.st_size, st.st_mtime_ns)

    def _prev_data(self, rel: str, st: os.stat_result) -> str | None:
        """The blake3 of the previous snapshot's copy (hard-link snapshots) when only metadata can have changed
        since: cloned, not copied, where the target shares extents
        (:func:`~duet_backup.fsops.clone_metadata_change`)."""
        if not self._clones:
            return None
        return same_data({}, self.published, rel, st.st_ino, st.st_size, st.st_mtime_ns)

    def _sync_links(self, members: list[_Member]) -> None:
        """A file with several names in the scope: one inode in the tree, linked under each name."""
        primary, rec = None, None
        for m in members:
            try:
                with _Dirs(self, m.reldir) as (src_dir, tree_dir, prev_dir):
                    rec = self._trusted(tree_dir, prev_dir, m.name, m.rel, m.st)
            except OSError:
                continue
            if rec is not None:
                primary = m
                break
        if primary is None:
            for m in members:
                try:
                    with _Dirs(self, m.reldir) as (src_dir, tree_dir, prev_dir):
                        rec = self._sync_file(src_dir, tree_dir, -1, m.reldir, m.name, m.st)
                    primary = m
                    break
                except FileNotFoundError:
                    self.result.vanished += 1
                except OSError as exc:
                    if self.fatal(exc):
                        raise
                    self.result.errors.append(f"{m.rel}: {exc.strerror or exc}")
            if primary is None:
                return
        self.result.files[primary.rel] = rec
        pdir = open_dir(self.tree_fd, primary.reldir)
        try:
            for m in members:
                if m is primary:
                    continue
                tdir = open_dir(self.tree_fd, m.reldir, create=True)
                try:
                    if not _same_inode(pdir, tdir, primary.name, m.name):
                        link_into(pdir, primary.name, tdir, m.name)
                        self.on_copy(m.rel, rec)
                        self.result.linked += 1
                finally:
                    os.close(tdir)
                self.result.files[m.rel] = rec
        finally:
            os.close(pdir)

    # -- symlinks and directories ------------------------------------------------------------------------------
    def _sync_symlink(self, src_dir: int, tree_dir: int, name: str, st: os.stat_result) -> None:
        target = os.readlink(name, dir_fd=src_dir)
        try:
            same = os.readlink(name, dir_fd=tree_dir) == target
        except OSError:
            same = False
        if not same:
            tmp = tmp_name()
            os.symlink(target, tmp, dir_fd=tree_dir)
            replace(tree_dir, tmp, name)
        have = os.stat(name, dir_fd=tree_dir, follow_symlinks=False)
        if (have.st_uid, have.st_gid) != (st.st_uid, st.st_gid):
            os.chown(name, st.st_uid, st.st_gid, dir_fd=tree_dir, follow_symlinks=False)
        if have.st_mtime_ns != st.st_mtime_ns or not same:
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=tree_dir, follow_symlinks=False)
        self.result.symlinks += 1

    def _sync_special(self, tree_dir: int, name: str, st: os.stat_result) -> None:
        """A fifo, socket or device node: made again with mknod (same type and device number), owner, mode and
        times set by name. Neither the source nor the copy is ever opened."""
        try:
            have = os.stat(name, dir_fd=tree_dir, follow_symlinks=False)
        except FileNotFoundError:
            have = None
        if have is None or stat.S_IFMT(have.st_mode) != stat.S_IFMT(st.st_mode) or have.st_rdev != st.st_rdev:
            tmp = tmp_name()
            os.mknod(tmp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=tree_dir)
            replace(tree_dir, tmp, name)
            have = os.stat(name, dir_fd=tree_dir, follow_symlinks=False)
        if (have.st_uid, have.st_gid) != (st.st_uid, st.st_gid):
            os.chown(name, st.st_uid, st.st_gid, dir_fd=tree_dir, follow_symlinks=False)
        if stat.S_IMODE(have.st_mode) != stat.S_IMODE(st.st_mode) or have.st_uid != st.st_uid:
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=tree_dir)   # fchmodat: no open
        if have.st_mtime_ns != st.st_mtime_ns:
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=tree_dir, follow_symlinks=False)

    def _dir_metadata(self, reldir: str, st: os.stat_result) -> None:
        """Owner, mode, xattrs/ACLs and times of a directory, after everything inside it is done."""
        try:
            src = open_beneath(self.src_fd, reldir or ".", os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            tree = open_dir(self.tree_fd, reldir)
            try:
                have = os.fstat(tree)
                if (have.st_uid, have.st_gid) != (st.st_uid, st.st_gid):
                    os.fchown(tree, st.st_uid, st.st_gid)
                if stat.S_IMODE(have.st_mode) != stat.S_IMODE(st.st_mode):
                    os.fchmod(tree, stat.S_IMODE(st.st_mode))
                copy_xattrs(src, tree)
                os.utime(tree, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(tree)
        except OSError as exc:
            if self.fatal(exc):
                raise
            self.result.errors.append(f"{reldir or '.'}: {exc.strerror or exc}")
        finally:
            os.close(src)


class _Dirs:
    """The source, tree and previous-snapshot directory fds of one relative directory, closed together."""

    def __init__(self, sync: TreeSync, reldir: str):
        self.sync, self.reldir = sync, reldir
        self.fds: list[int] = []

    def __enter__(self) -> tuple[int, int, int]:
        s = self.sync
        self.fds.append(open_beneath(s.src_fd, self.reldir or ".", os.O_RDONLY | os.O_DIRECTORY))
        self.fds.append(open_dir(s.tree_fd, self.reldir, create=True))
        self.fds.append(s._open_prev(self.reldir))
        return self.fds[0], self.fds[1], self.fds[2]

    def __exit__(self, *exc) -> None:
        for fd in self.fds:
            if fd >= 0:
                os.close(fd)


def same_data(staged: dict[str, Record], published: dict[str, Record], rel: str, ino: int, size: int,
              mtime_ns: int) -> str | None:
    """The blake3 recorded for the tree's copy of ``rel`` (this round's copy if any, else the last snapshot's) when
    that copy was made from the same inode with the same size and mtime — so what changed since can be metadata
    alone (a new ctime: chmod, chown, xattrs, ACLs). None otherwise."""
    rec = staged.get(rel) or published.get(rel)
    if rec is None or len(rec) < 5 or rec[:3] != [ino, size, mtime_ns]:
        return None
    return rec[4]


def entry_sig(st: os.stat_result) -> list[int]:
    """The version of a directory, symlink or special file as :func:`unchanged` compares it."""
    return [st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def unchanged(src_fd: int, files: dict[str, Record], entries: dict[str, list[int]],
              checkpoint: Callable[[], None] = lambda: None) -> bool:
    """Whether the tree below ``src_fd`` is still exactly what a sync pass recorded (``SyncResult.files`` and
    ``.entries``): every directory, symlink, special file and regular file has the same version.

    One ``stat`` per entry, by name below its directory (opened without following any symlink); no directory is
    listed. A directory's mtime and ctime change whenever a name is added to it, removed or renamed, and any entry's
    ctime changes with its contents, owner, mode, xattrs or link count: so when every directory is unchanged, the
    recorded names are all the names there are, and when every entry is unchanged, a new pass would find nothing
    to do. Any difference, or any error, answers False (the caller then runs the full pass). ``checkpoint`` is
    called before each directory; what it raises (a stop) ends the check."""
    names: dict[str, list[tuple[str, list]]] = {"": []}   # the root is checked even when it is empty
    for rel, rec in files.items():
        reldir, _, name = rel.rpartition("/")
        names.setdefault(reldir, []).append((name, [rec[0], rec[2], rec[3], rec[1]]))
    for rel, rec in entries.items():
        if rel:
            reldir, _, name = rel.rpartition("/")
            names.setdefault(reldir, []).append((name, rec))
    if names.keys() - entries.keys():
        return False      # a name in a directory the record does not know: not a record to trust
    try:
        for reldir, members in names.items():   # an empty directory is checked as a member of its parent
            checkpoint()
            fd = open_beneath(src_fd, reldir or ".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                if entry_sig(os.fstat(fd)) != entries[reldir]:
                    return False
                for name, want in members:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    have = entry_sig(st) if len(want) == 3 else [*entry_sig(st), st.st_size]
                    if have != want:
                        return False
            finally:
                os.close(fd)
    except OSError:
        return False
    return True


def _same_kind(entry: os.DirEntry, kind: int) -> bool:
    if kind == stat.S_IFDIR:
        return entry.is_dir(follow_symlinks=False)
    if kind == stat.S_IFLNK:
        return entry.is_symlink()
    if kind == stat.S_IFREG:
        return entry.is_file(follow_symlinks=False)
    return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode) == kind   # fifo, socket, device


def _holds(dir_fd: int, name: str, st: os.stat_result) -> bool:
    """The directory has a regular file ``name`` with ``st``'s size and mtime."""
    try:
        have = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(have.st_mode) and (have.st_size, have.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def _same_inode(dir_a: int, dir_b: int, name_a: str, name_b: str | None = None) -> bool:
    try:
        a = os.stat(name_a, dir_fd=dir_a, follow_symlinks=False)
        b = os.stat(name_b or name_a, dir_fd=dir_b, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def link_into(src_dir: int, src_name: str, dst_dir: int, dst_name: str) -> None:
    """Hard-link ``src_name`` as ``dst_name`` (replacing what is there, atomically)."""
    try:
        os.link(src_name, dst_name, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
        return
    except FileExistsError:
        pass
    tmp = tmp_name()
    os.link(src_name, tmp, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
    replace(dst_dir, tmp, dst_name)
