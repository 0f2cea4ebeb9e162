"""A scope: the regular files of one directory tree, keyed by the identity the kernel gives them.

The walk opens every directory with :func:`~duet_core.identity.open_beneath` relative to the root, so it never
follows a symlink and never leaves the tree, even if the tree changes under it. It descends into nested btrfs
subvolumes (they are part of the tree) and into other mounted filesystems unless ``one_file_system`` (rsync's
``-x``); a nested subvolume shares its parent's superblock, so it stays in scope either way.

Cost: one ``open``/``fstat`` per directory, one ``lstat`` per new regular file (for its size), and one ``statx`` per
distinct ``st_dev`` (subvolume or mount) via :class:`~duet_core.identity.DevMap`. A rescan re-lists only the
directories whose mtime (or identity) changed and ``lstat``s only the names it has not seen.

A file with several hard links in the scope is one file: it appears once, under one of its paths.

Memory: a million-file scope must not cost a Python object per file. Each directory keeps its file names as one
string and their inode numbers as an array; ``files`` is a :class:`FileIndex` — sorted numpy arrays from
(dev, subvol, inode) to (directory, position) — rebuilt after each walk that changed something. About 40 bytes
per file in all.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from array import array
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import numpy as np

from duet_core.errors import DuetError, printable
from duet_core.events import FileId
from duet_core.exclude import NOTHING, Exclusions
from duet_core.identity import DevMap, mounts, open_beneath, statx

log = logging.getLogger(__name__)

# A directory modified this recently may change again within the same mtime tick; it is re-listed next time.
RACY_NS = 2_000_000_000
BTRFS_SUBVOL_ROOT_INO = 256


def open_regular(root_fd: int, relpath: str, ino: int | None = None) -> int:
    """Open ``relpath`` beneath ``root_fd`` for reading, only if it is a regular file (OSError otherwise) — and,
    given ``ino``, only if it is still that inode (ESTALE otherwise: replaced since it was seen).

    A name the scan saw as a regular file may be a fifo, a socket or a device by the time it is opened (renamed
    over it meanwhile). Opening a fifo for reading blocks until a writer comes, and opening a device can act on
    it (a tape rewinds), so the name is first opened with ``O_PATH`` — which opens nothing — and only a regular file
    is then reopened for reading through ``/proc/self/fd``, the same inode, whatever the name points to meanwhile.
    A one-component name (an entry of ``root_fd`` itself) needs no ``openat2``: ``O_NOFOLLOW`` is enough there.
    """
    if "/" in relpath or relpath in (".", ".."):
        pfd = open_beneath(root_fd, relpath, os.O_PATH)
    else:
        pfd = os.open(relpath, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file (mode {stat.filemode(st.st_mode)})", relpath)
        if ino is not None and st.st_ino != ino:
            raise OSError(errno.ESTALE, "replaced since it was seen", relpath)
        return _reopen(pfd)
    finally:
        os.close(pfd)


def _reopen(pfd: int) -> int:
    """The regular file behind an ``O_PATH`` descriptor, opened for reading: the same inode, whatever its name
    points to meanwhile."""
    proc = f"/proc/self/fd/{pfd}"
    try:
        return os.open(proc, os.O_RDONLY | os.O_NOATIME | os.O_CLOEXEC)
    except PermissionError:   # O_NOATIME needs the file's owner or CAP_FOWNER
        return os.open(proc, os.O_RDONLY | os.O_CLOEXEC)


class ScannedFile(NamedTuple):
    """A regular file in the scope, with its size and times (ns) when it was found."""

    fid: FileId
    relpath: str
    size: int
    mtime_ns: int = 0
    ctime_ns: int = 0
    nlink: int = 1


class ScanDiff(NamedTuple):
    """What a :meth:`Scope.rescan` found: files new to the scope and files gone from it ``(fid, relpath)``."""

    added: list[ScannedFile]
    removed: list[tuple[FileId, str]]


class _Dir(NamedTuple):
    """What the last walk saw of one directory; ``mtime_ns`` -1 means "list it again next time".

    Its regular files are ``names`` joined by NUL (which no file name contains), starting at ``starts``, with
    their inode numbers in ``inos``, in the same order.
    """

    st_dev: int
    st_ino: int
    mtime_ns: int
    key: tuple[int, int]  # (superblock dev, subvol)
    names: str
    starts: array
    inos: array
    subdirs: tuple[str, ...]

    def name(self, pos: int) -> str:
        end = self.starts[pos + 1] - 1 if pos + 1 < len(self.starts) else len(self.names)
        return self.names[self.starts[pos]:end]

    def entries(self) -> Iterator[tuple[str, FileId]]:
        if self.inos:
            dev, subvol = self.key
            for name, ino in zip(self.names.split("\0"), self.inos):
                yield name, FileId(dev, subvol, ino)


def _pack_names(names: list[str]) -> tuple[str, array]:
    starts = array("I")
    pos = 0
    for name in names:
        starts.append(pos)
        pos += len(name) + 1
    return "\0".join(names), starts


def _open_entries(dir_fd: int, d: _Dir) -> Iterator[tuple[FileId, int]]:
    """:meth:`Scope.open_all` for one directory."""
    for name, fid in d.entries():
        try:
            fd = open_regular(dir_fd, name, fid.ino)
        except OSError:
            continue   # gone, or replaced since the walk (by a symlink, a device, another file)
        try:
            yield fid, fd
        finally:
            os.close(fd)


class _Lost(NamedTuple):
    fid: FileId
    relpath: str


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class FileIndex(Mapping):
    """The scope's files, FileId → path relative to the root, in sorted arrays rather than a dict.

    Built from the directories of one walk; a file with several hard links in the scope appears once, under the
    first of its paths in walk order. Lookups are a binary search within the file's (dev, subvol).
    """

    def __init__(self, dirs: dict[str, _Dir]):
        self._rels = list(dirs)
        self._dirs = [dirs[rel] for rel in self._rels]
        pair_ids: dict[tuple[int, int], int] = {}
        inos, dir_ix, pos, pair = [], [], [], []
        for di, d in enumerate(self._dirs):
            n = len(d.inos)
            if not n:
                continue
            inos.append(np.frombuffer(d.inos, dtype=np.uint64))
            dir_ix.append(np.full(n, di, dtype=np.uint32))
            pos.append(np.arange(n, dtype=np.uint32))
            pair.append(np.full(n, pair_ids.setdefault(d.key, len(pair_ids)), dtype=np.uint32))
        if not inos:
            self._ino = np.zeros(0, np.uint64)
            self._dir = self._pos = np.zeros(0, np.uint32)
            self._slices: dict[tuple[int, int], tuple[int, int]] = {}
            return
        ino_a, dir_a, pos_a, pair_a = (np.concatenate(x) for x in (inos, dir_ix, pos, pair))
        order = np.lexsort((pos_a, dir_a, ino_a, pair_a))
        ino_a, dir_a, pos_a, pair_a = ino_a[order], dir_a[order], pos_a[order], pair_a[order]
        first = np.ones(len(ino_a), dtype=bool)      # hard links: keep the first path of each file
        first[1:] = (ino_a[1:] != ino_a[:-1]) | (pair_a[1:] != pair_a[:-1])
        self._ino, self._dir, self._pos, pair_a = ino_a[first], dir_a[first], pos_a[first], pair_a[first]
        bounds = np.searchsorted(pair_a, np.arange(len(pair_ids) + 1))
        self._slices = {key: (int(bounds[i]), int(bounds[i + 1])) for key, i in pair_ids.items()}

    def _find(self, fid) -> int:
        try:
            lo, hi = self._slices[(fid[0], fid[1])]
        except (KeyError, TypeError, IndexError):
            return -1
        i = lo + int(self._ino[lo:hi].searchsorted(np.uint64(fid[2])))   # a uint64 key: no float promotion
        return i if i < hi and int(self._ino[i]) == fid[2] else -1

    def _path(self, i: int) -> str:
        di = int(self._dir[i])
        return _join(self._rels[di], self._dirs[di].name(int(self._pos[i])))

    def __getitem__(self, fid) -> str:
        i = self._find(fid)
        if i < 0:
            raise KeyError(fid)
        return self._path(i)

    def get(self, fid, default=None):
        i = self._find(fid)
        return default if i < 0 else self._path(i)

    def __contains__(self, fid) -> bool:
        return self._find(fid) >= 0

    def __len__(self) -> int:
        return len(self._ino)

    def __iter__(self) -> Iterator[FileId]:
        for (dev, subvol), (lo, hi) in self._slices.items():
            for ino in self._ino[lo:hi].tolist():
                yield FileId(dev, subvol, ino)

    def items(self, pairs=None):   # a generator, not a view: no per-file lookups
        """``(fid, relpath)`` of every file, or of the files on ``pairs`` (an iterable of (dev, subvol))."""
        for pair in self._slices if pairs is None else pairs:
            lo, hi = self._slices.get(pair, (0, 0))
            for ino, i in zip(self._ino[lo:hi].tolist(), range(lo, hi)):
                yield FileId(pair[0], pair[1], ino), self._path(i)

    def pairs(self) -> list[tuple[int, int]]:
        """The (dev, subvol) pairs the files are on."""
        return list(self._slices)

    def values(self):
        for _, path in self.items():
            yield path


class Scope:
    """The regular files under ``root``; :meth:`scan` once, then :meth:`rescan` to follow changes.

    ``files`` maps each FileId to a path relative to root. ``skipped`` counts the directories and entries the last
    walk could not read or that vanished while it ran; ``listed`` counts the directories it read. Entries that
    ``exclude`` leaves out are not in the scope, and an excluded directory is not entered.
    """

    def __init__(self, root: str, one_file_system: bool = False, exclude: Exclusions = NOTHING):
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise DuetError(f"scope root {root!r} is not an existing directory")
        self.one_file_system = one_file_system
        self.exclude = exclude
        self.files = FileIndex({})
        self.skipped = 0
        self.listed = 0
        self._dirs: dict[str, _Dir] = {}
        self._changed = False   # the last walk changed some directory: rebuild the index
        self._devmap = DevMap()

    def __len__(self) -> int:
        return len(self.files)

    def devs(self) -> set[tuple[int, int]]:
        """The (superblock dev, subvol) pairs the scope covers, as of the last walk: the kernel-side filter."""
        return {d.key for d in self._dirs.values()}

    def pairs(self) -> dict[tuple[int, int], bool]:
        """Like :meth:`devs`, each with ``partial``: False when the scope holds the whole subvolume/filesystem.

        A pair is whole when a directory of the scope is its root: a btrfs subvolume root (inode 256), or the
        root of a mounted filesystem — and nothing is excluded. Then every event on that pair is in scope and the
        kernel need not consult its ignore set.
        """
        out: dict[tuple[int, int], bool] = {}
        for rel, d in self._dirs.items():
            if out.get(d.key) is False:
                continue
            out[d.key] = bool(self.exclude) or not self._is_root_of(rel, d)   # excluded files are in it too
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
        """Open a regular file of the scope read-only without following any symlink or leaving the scope
        (:func:`open_regular`)."""
        with self.opener() as open_file:
            return open_file(relpath)

    @contextlib.contextmanager
    def opener(self) -> Iterator[Callable[[str], int]]:
        """:meth:`open` for many files: the scope's root stays open while the block runs."""
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

        def open_file(relpath: str) -> int:
            return open_regular(root_fd, relpath)

        try:
            yield open_file
        finally:
            os.close(root_fd)

    def open_all(self) -> Iterator[tuple[FileId, int]]:
        """Every file of the index, open for reading: ``(fid, fd)``, the fd closed when the iteration moves on.

        For a pass over the whole scope (the engine's start-up snapshot): each directory is opened once beneath the
        root, and each file relative to it by its one-component name, as :func:`open_regular` does (``O_PATH``, no
        symlink followed, reopened only if it is a regular file and still the inode the walk saw) — without a path
        to build and resolve per file. A file with several names in the scope may come once per name.
        """
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for rel, d in self._dirs.items():
                if not d.inos:
                    continue
                try:
                    dir_fd = open_beneath(root_fd, rel or ".", os.O_RDONLY | os.O_DIRECTORY)
                except OSError:
                    continue
                try:
                    yield from _open_entries(dir_fd, d)
                finally:
                    os.close(dir_fd)
        finally:
            os.close(root_fd)

    def scan(self) -> Iterator[ScannedFile]:
        """Walk the whole tree afresh, yielding ``(fid, relpath, size, ...)`` per regular file (each file once).

        The index (``files``, ``devs()``) is complete once the iterator is exhausted.
        """
        self._dirs = {}
        linked: set[FileId] = set()   # files with more than one link, seen once already
        for change in self._walk():
            if change.nlink > 1:
                if change.fid in linked:
                    continue
                linked.add(change.fid)
            yield change
        self.files = FileIndex(self._dirs)

    def rescan(self) -> ScanDiff:
        """Bring the index up to date, re-listing only changed directories; return the files added and removed.

        Apply ``removed`` before ``added``: a file moved to another directory appears in both with the same
        FileId. A file deleted and re-created under the same name that happens to get the same inode number is
        the same FileId at the same path, and goes unnoticed here (its page-cache events still tell).
        """
        found: list[ScannedFile] = []
        lost: list[_Lost] = []
        self._changed = False
        for change in self._walk():
            (found if isinstance(change, ScannedFile) else lost).append(change)
        if not self._changed:
            return ScanDiff([], [])
        old, self.files = self.files, FileIndex(self._dirs)
        return self._reconcile(old, found, lost)

    def _reconcile(self, old: FileIndex, found: list[ScannedFile], lost: list[_Lost]) -> ScanDiff:
        """Which files came and went, from a walk's found and lost paths and the index before and after.

        A file loses its place only with its last path (hard links). A FileId that lost a path and gained another
        in the same walk is reported as removed and added: it may be a rename, but it may just as well be a new
        file that was given the inode number of a deleted one, and FileId carries no generation to tell.
        """
        lost_path = {c.fid: c.relpath for c in lost}
        added: list[ScannedFile] = []
        seen: set[FileId] = set()
        for c in found:
            if c.fid in seen or c.fid not in self.files:
                continue
            if c.fid not in old or c.fid in lost_path:
                seen.add(c.fid)
                added.append(c)
        removed = [(fid, path) for fid, path in lost_path.items() if fid not in self.files or fid in seen]
        return ScanDiff(added, removed)

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
        except OSError as exc:
            self._skip(rel, exc)
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
        except OSError as exc:
            self._skip(rel, exc)
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
        self._changed = True
        # name -> inode of what the directory held; an entry with the same name and inode is the same file.
        known = dict(zip(old.names.split("\0"), old.inos)) if old and old.inos and old.key == key else {}
        names: list[str] = []
        inos = array("Q")
        subdirs: list[str] = []
        dev, subvol = key
        prefix = f"{rel}/" if rel else ""
        exclude = self.exclude
        # Once per file of the scope (a million in duet bench scale): kept lean.
        with os.scandir(fd) as entries:
            for entry in entries:
                name = entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if not (exclude and exclude.excluded(prefix + name, name, True)):
                            subdirs.append(name)
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue  # symlinks, devices, fifos, sockets
                    if exclude and exclude.excluded(prefix + name, name, False):
                        continue
                    ino = entry.inode()
                    if known.get(name) != ino:
                        relpath = prefix + name
                        fid, fst = self._new_file(entry, st.st_dev, dev, subvol, ino, root_fd, relpath)
                        yield ScannedFile(fid, relpath, fst.st_size, fst.st_mtime_ns, fst.st_ctime_ns, fst.st_nlink)
                        if (fid.dev, fid.subvol) != key:
                            continue  # a file bind-mounted over this entry: another filesystem's file, left out
                        ino = fid.ino   # not the entry's inode only for a file bind-mounted over it
                except OSError as exc:
                    self._skip(prefix + name, exc)  # vanished while we looked
                    continue
                names.append(name)
                inos.append(ino)
        if old:
            still = set(zip(names, inos))
            for name, fid in old.entries():
                if (name, fid.ino) not in still:
                    yield _Lost(fid, _join(rel, name))
            for name in set(old.subdirs) - set(subdirs):
                yield from self._drop(_join(rel, name))
        racy = time.time_ns() - st.st_mtime_ns < RACY_NS
        packed, starts = _pack_names(names)
        self._dirs[rel] = _Dir(st.st_dev, st.st_ino, -1 if racy else st.st_mtime_ns, key, packed, starts, inos,
                               tuple(subdirs))
        stack.extend(_join(rel, name) for name in subdirs)

    def _new_file(
        self, entry: os.DirEntry, dir_dev: int, dev: int, subvol: int, ino: int, root_fd: int, relpath: str
    ) -> tuple[FileId, os.stat_result]:
        """``lstat`` a file not seen before for its size and times, and check the id guessed from its directory entry
        (``dev``, ``subvol`` of the directory, ``ino`` of the entry).

        A file that is itself a mount point (a bind mount onto a file) has another device and inode than its
        directory entry says; it then gets its own id.
        """
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.ESTALE, "replaced while being examined", relpath)
        if st.st_dev != dir_dev or st.st_ino != ino:
            return self._devmap.file_id(st.st_dev, st.st_ino, relpath, root_fd), st
        return FileId(dev, subvol, ino), st

    def _skip(self, rel: str, exc: OSError) -> None:
        """Count an entry the walk could not read (unreadable, deeper than PATH_MAX, gone meanwhile); log it."""
        self.skipped += 1
        log.info("%s: skipped: %s", printable(rel or "."), exc.strerror or exc)

    def _drop(self, rel: str) -> Iterator[_Lost]:
        """Forget a directory and everything below it, yielding its files as lost."""
        pending = [rel]
        while pending:
            rel = pending.pop()
            d = self._dirs.pop(rel, None)
            if d is None:
                continue
            self._changed = True
            for name, fid in d.entries():
                yield _Lost(fid, _join(rel, name))
            pending.extend(_join(rel, name) for name in d.subdirs)
