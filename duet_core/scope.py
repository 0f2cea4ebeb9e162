"""A scope: the regular files of one directory tree, keyed by the identity the kernel gives them.

The walk opens every directory with :func:`~duet_core.identity.open_beneath` relative to the root, so it never
follows a symlink and never leaves the tree, even if the tree changes under it. It descends into nested btrfs
subvolumes (they are part of the tree) and into other mounted filesystems unless ``one_file_system`` (rsync's
``-x``); a nested subvolume shares its parent's superblock, so it stays in scope either way.

Cost: one ``open``/``fstat`` per directory, one ``lstat`` per new regular file (for its size), and one ``statx`` per
distinct ``st_dev`` (subvolume or mount) via :class:`~duet_core.identity.DevMap`. A rescan re-lists only the
directories whose mtime (or identity) changed and ``lstat``s only the names it has not seen.

A file with several hard links in the scope is one file: it appears once, under one of its paths.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterator
from typing import NamedTuple

from duet_core.errors import DuetError
from duet_core.events import FileId
from duet_core.identity import DevMap, mounts, open_beneath, statx

# A directory modified this recently may change again within the same mtime tick; it is re-listed next time.
RACY_NS = 2_000_000_000
BTRFS_SUBVOL_ROOT_INO = 256


class ScannedFile(NamedTuple):
    """A regular file in the scope, with its size and times (ns) when it was found."""

    fid: FileId
    relpath: str
    size: int
    mtime_ns: int = 0
    ctime_ns: int = 0


class ScanDiff(NamedTuple):
    """What a :meth:`Scope.rescan` found: files new to the scope and files gone from it ``(fid, relpath)``."""

    added: list[ScannedFile]
    removed: list[tuple[FileId, str]]


class _Dir(NamedTuple):
    """What the last walk saw of one directory; ``mtime_ns`` -1 means "list it again next time"."""

    st_dev: int
    st_ino: int
    mtime_ns: int
    key: tuple[int, int]  # (superblock dev, subvol)
    names: tuple[str, ...]  # regular files ...
    fids: tuple[FileId, ...]  # ... and their ids, in the same order
    subdirs: tuple[str, ...]


class _Lost(NamedTuple):
    fid: FileId
    relpath: str


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class Scope:
    """The regular files under ``root``; :meth:`scan` once, then :meth:`rescan` to follow changes.

    ``files`` maps each FileId to a path relative to root. ``skipped`` counts the directories and entries the last
    walk could not read or that vanished while it ran; ``listed`` counts the directories it read.
    """

    def __init__(self, root: str, one_file_system: bool = False):
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise DuetError(f"scope root {root!r} is not an existing directory")
        self.one_file_system = one_file_system
        self.files: dict[FileId, str] = {}
        self.skipped = 0
        self.listed = 0
        self._dirs: dict[str, _Dir] = {}
        self._links: dict[FileId, int] = {}  # paths per file, only for files with more than one in scope
        self._devmap = DevMap()

    def __len__(self) -> int:
        return len(self.files)

    def devs(self) -> set[tuple[int, int]]:
        """The (superblock dev, subvol) pairs the scope covers, as of the last walk: the kernel-side filter."""
        return {d.key for d in self._dirs.values()}

    def pairs(self) -> dict[tuple[int, int], bool]:
        """Like :meth:`devs`, each with ``partial``: False when the scope holds the whole subvolume/filesystem.

        A pair is whole when a directory of the scope is its root: a btrfs subvolume root (inode 256), or the
        root of a mounted filesystem. Then every event on that pair is in scope and the kernel need not consult
        its ignore set.
        """
        out: dict[tuple[int, int], bool] = {}
        for rel, d in self._dirs.items():
            if out.get(d.key) is False:
                continue
            out[d.key] = not self._is_root_of(rel, d)
        return out

    def _is_root_of(self, rel: str, d: "_Dir") -> bool:
        if d.key[1]:
            return d.st_ino == BTRFS_SUBVOL_ROOT_INO
        path = os.path.join(self.root, rel) if rel else self.root
        try:
            mount = mounts().get(statx(path).mnt_id)
        except (OSError, DuetError):
            return False
        return mount.root == "/" and mount.mount_point == path

    def open(self, relpath: str) -> int:
        """Open a file of the scope read-only without following any symlink or leaving the scope."""
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                return open_beneath(root_fd, relpath, os.O_RDONLY | os.O_NOATIME)
            except PermissionError:
                return open_beneath(root_fd, relpath, os.O_RDONLY)
        finally:
            os.close(root_fd)

    def scan(self) -> Iterator[ScannedFile]:
        """Walk the whole tree afresh, yielding ``(fid, relpath, size)`` per regular file (each file once).

        The index (``files``, ``devs()``) is complete once the iterator is exhausted.
        """
        self.files, self._links, self._dirs = {}, {}, {}
        for change in self._walk():
            if self._add_link(change.fid, change.relpath):
                yield change

    def rescan(self) -> ScanDiff:
        """Bring the index up to date, re-listing only changed directories; return the files added and removed.

        Apply ``removed`` before ``added``: a file moved to another directory appears in both with the same
        FileId. A file deleted and re-created under the same name that happens to get the same inode number is
        the same FileId at the same path, and goes unnoticed here (its page-cache events still tell).
        """
        found: list[ScannedFile] = []
        lost: list[_Lost] = []
        for change in self._walk():
            (found if isinstance(change, ScannedFile) else lost).append(change)
        return self._reconcile(found, lost)

    # ------------------------------------------------------------------------------------------------ index

    def _add_link(self, fid: FileId, relpath: str) -> bool:
        """Count one more path of ``fid``; True if the file is new to the scope."""
        if fid not in self.files:
            self.files[fid] = relpath
            return True
        self._links[fid] = self._links.get(fid, 1) + 1
        return False

    def _drop_link(self, fid: FileId) -> None:
        """Count one path of ``fid`` less, forgetting the file with its last path."""
        links = self._links.pop(fid, 1) - 1
        if links > 1:
            self._links[fid] = links
        elif links == 0:
            del self.files[fid]

    def _reconcile(self, found: list[ScannedFile], lost: list[_Lost]) -> ScanDiff:
        """Apply a walk's found and lost paths to the index and say which files came and went.

        A file loses its place only with its last path (hard links). A FileId that lost a path and gained another
        in the same walk is reported as removed and added: it may be a rename, but it may just as well be a new
        file that was given the inode number of a deleted one, and FileId carries no generation to tell.
        """
        before = {c.fid: self.files[c.fid] for c in lost}
        renewed = {c.fid: c for c in found if c.fid in before}
        added = [c for c in found if self._add_link(c.fid, c.relpath)]
        for c in lost:
            self._drop_link(c.fid)
        removed = [(fid, path) for fid, path in before.items() if fid not in self.files or fid in renewed]
        for fid, c in renewed.items():
            self.files[fid] = c.relpath
            added.append(c)
        lost_paths = {(c.fid, c.relpath) for c in lost}
        for fid in before.keys() - renewed.keys():
            if fid in self.files and (fid, self.files[fid]) in lost_paths:
                self.files[fid] = self._find_path(fid)  # another hard link of it is still in scope
        return ScanDiff(added, removed)

    def _find_path(self, fid: FileId) -> str:
        """Some current path of ``fid`` (a hard link whose indexed path went away): a rare, linear search."""
        for rel, d in self._dirs.items():
            if fid in d.fids:
                return _join(rel, d.names[d.fids.index(fid)])
        raise AssertionError(f"{fid} is counted in the scope but in no directory")

    # ------------------------------------------------------------------------------------------------- walk

    def _walk(self) -> Iterator[ScannedFile | _Lost]:
        """Visit the tree, updating directory states; yield every path found or lost since the last walk."""
        self.skipped = self.listed = 0
        self._devmap.clear()
        try:
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise DuetError(f"cannot open scope root {self.root}: {e.strerror}") from None
        try:
            root_dev = self._devmap.info(os.fstat(root_fd).st_dev, root_fd).dev
            seen: set[tuple[int, int]] = set()
            stack = [""]
            while stack:
                rel = stack.pop()
                yield from self._visit(root_fd, root_dev, rel, seen, stack)
        finally:
            os.close(root_fd)

    def _visit(
        self, root_fd: int, root_dev: int, rel: str, seen: set[tuple[int, int]], stack: list[str]
    ) -> Iterator[ScannedFile | _Lost]:
        """Check one directory; re-list it if it changed; push its subdirectories onto ``stack``."""
        old = self._dirs.get(rel)
        try:
            fd = open_beneath(root_fd, rel or ".", os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            self.skipped += 1
            yield from self._drop(rel)
            return
        try:
            st = os.fstat(fd)
            info = self._devmap.info(st.st_dev, rel or ".", root_fd)
            if (st.st_dev, st.st_ino) in seen or (self.one_file_system and info.dev != root_dev):
                yield from self._drop(rel)  # a second view of a directory (bind mount), or another filesystem
                return
            seen.add((st.st_dev, st.st_ino))
            if old and (old.st_dev, old.st_ino, old.mtime_ns) == (st.st_dev, st.st_ino, st.st_mtime_ns):
                stack.extend(_join(rel, name) for name in old.subdirs)
                return
            yield from self._list(fd, st, (info.dev, info.subvol), root_fd, rel, old, stack)
        except OSError:
            self.skipped += 1
            yield from self._drop(rel)
        finally:
            os.close(fd)

    def _list(
        self,
        fd: int,
        st: os.stat_result,
        key: tuple[int, int],
        root_fd: int,
        rel: str,
        old: _Dir | None,
        stack: list[str],
    ) -> Iterator[ScannedFile | _Lost]:
        """Read a directory that is new or changed, compare it with what it held, and record its new state."""
        self.listed += 1
        known = dict(zip(old.names, old.fids)) if old else {}
        names: list[str] = []
        fids: list[FileId] = []
        subdirs: list[str] = []
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue  # symlinks, devices, fifos, sockets
                    fid = FileId(key[0], key[1], entry.inode())
                    if known.get(entry.name) != fid:
                        relpath = _join(rel, entry.name)
                        fid, fst = self._new_file(entry, st.st_dev, fid, root_fd, relpath)
                        yield ScannedFile(fid, relpath, fst.st_size, fst.st_mtime_ns, fst.st_ctime_ns)
                except OSError:
                    self.skipped += 1  # vanished while we looked
                    continue
                names.append(entry.name)
                fids.append(fid)
        if old:
            still = dict(zip(names, fids))
            for name, fid in zip(old.names, old.fids):
                if still.get(name) != fid:
                    yield _Lost(fid, _join(rel, name))
            for name in set(old.subdirs) - set(subdirs):
                yield from self._drop(_join(rel, name))
        racy = time.time_ns() - st.st_mtime_ns < RACY_NS
        self._dirs[rel] = _Dir(
            st.st_dev, st.st_ino, -1 if racy else st.st_mtime_ns, key, tuple(names), tuple(fids), tuple(subdirs)
        )
        stack.extend(_join(rel, name) for name in subdirs)

    def _new_file(
        self, entry: os.DirEntry, dir_dev: int, fid: FileId, root_fd: int, relpath: str
    ) -> tuple[FileId, os.stat_result]:
        """``lstat`` a file not seen before for its size and times, and check the id guessed from its directory entry.

        A file that is itself a mount point (a bind mount onto a file) has another device and inode than its
        directory entry says; it then gets its own id.
        """
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.ESTALE, "replaced while being examined", relpath)
        if (st.st_dev, st.st_ino) != (dir_dev, fid.ino):
            fid = self._devmap.file_id(st.st_dev, st.st_ino, relpath, root_fd)
        return fid, st

    def _drop(self, rel: str) -> Iterator[_Lost]:
        """Forget a directory and everything below it, yielding its files as lost."""
        pending = [rel]
        while pending:
            rel = pending.pop()
            d = self._dirs.pop(rel, None)
            if d is None:
                continue
            for name, fid in zip(d.names, d.fids):
                yield _Lost(fid, _join(rel, name))
            pending.extend(_join(rel, name) for name in d.subdirs)
