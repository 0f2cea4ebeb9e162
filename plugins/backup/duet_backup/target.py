"""The backup target: its layout, its lock, its manifests and how a snapshot is published.

Layout (shared with the gc task, which reads ``snapshots/``)::

    TARGET/snapshots/<YYYY-MM-DDTHHMMSSZ>/     published snapshots: plain directory trees mirroring the scope
    TARGET/.duet/                              backup's internals (0700)
        mirror/        btrfs: the mirror subvolume every snapshot is taken from
        incomplete/    other filesystems: the snapshot being built (hard links to the previous one + new copies)
        manifests/<timestamp>.json             one per snapshot, written and fsynced before it is published
        journal        files copied in the round not yet published (one JSON line each)
        tree-of        btrfs: the name of the snapshot the mirror still is exactly (gone from a run's first write
                       to the mirror until the next snapshot is published from it)
        lock           flock: one backup writes to a target at a time
        verified/<timestamp>.json              what the last ``duet verify`` of that snapshot found (removed by gc
                                               with the snapshot)

A snapshot's name exists only once it is complete: on btrfs a read-only snapshot of the mirror is created under
it; elsewhere the finished ``incomplete`` tree is renamed to it. A run killed at any point leaves the published
snapshots as they were, and the next run continues with ``mirror``/``incomplete`` and the journal.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import re
import time
from dataclasses import dataclass

from duet_backup.fsops import syncfs
from duet_core.errors import DuetError
from duet_core.filesystems import BTRFS_SUPER_MAGIC, fs_magic
from duet_core.identity import mounts, open_beneath, statx

SNAPSHOTS = "snapshots"
INTERNAL = ".duet"
TREE_OF = "tree-of"
VERIFIED = "verified"       # .duet/verified/<name>.json: what the last duet verify of a snapshot found
NAME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{6}Z$")
NAME_FORMAT = "%Y-%m-%dT%H%M%SZ"

# A file version as manifests and the journal record it: [inode, size, mtime ns, ctime ns, blake3 hex].
Record = list


class TargetBusy(DuetError):
    """Another backup is writing to this target."""

    exit_code = 4


def inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _where(path: str) -> tuple[int, str]:
    """Where the directory ``path`` (a real path) lies: its filesystem's device and its path within that
    filesystem — the same for every mount of that filesystem it can be reached through (a bind mount, a second
    mount of the device, a btrfs subvolume mounted elsewhere)."""
    mount = mounts().get(statx(path).mnt_id)
    return mount.dev, os.path.normpath(os.path.join(mount.root, os.path.relpath(path, mount.mount_point)))


def _tree(path: str) -> list[tuple[int, str]]:
    """Every (filesystem, path within it) the tree below the directory ``path`` reaches: its own, and that of each
    mount below it (a walk of the tree crosses into them)."""
    return [_where(path)] + [(m.dev, m.root) for m in mounts()
                             if m.mount_point != path and inside(m.mount_point, path)]


def _reaches(tree: list[tuple[int, str]], where: tuple[int, str]) -> bool:
    return any(dev == where[0] and inside(where[1], root) for dev, root in tree)


def in_tree(path: str, top: str) -> bool:
    """The directory ``path`` lies in the tree below the directory ``top`` (both real paths): by path, or through
    a mount."""
    return inside(path, top) or _reaches(_tree(top), _where(path))


def snapshot_name(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.timezone.utc).strftime(NAME_FORMAT)


def write_atomic(dir_fd: int, name: str, data: bytes) -> None:
    """Write ``name`` in ``dir_fd`` through a temporary file: fsync it, rename, fsync the directory."""
    tmp = f".{name}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def check_target(path: str, scope: str | None = None) -> str:
    """The real path of a usable target for ``scope``, or a DuetError saying why not; opens and writes nothing
    (``duet_check`` runs it before the run touches anything)."""
    real = os.path.realpath(path)
    if scope is not None:
        scope = os.path.realpath(scope)
        if inside(real, scope):
            raise DuetError(f"backup target {real} is inside the scope {scope}",
                            hint="a backup cannot be stored in the tree it backs up")
        if inside(scope, real):
            raise DuetError(f"the scope {scope} is inside the backup target {real}",
                            hint="choose a target outside the tree being backed up")
    if not os.path.isdir(real):
        raise DuetError(f"backup target {path} is not an existing directory")
    if scope is not None and os.path.isdir(scope):
        # The same, through mounts: a bind mount of the target (or of a directory above it) inside the scope would
        # have every run back up the snapshots before it, and the scope under the target the other way round.
        try:
            if in_tree(real, scope):
                raise DuetError(f"backup target {real} can be reached inside the scope {scope} through a mount",
                                hint="a backup cannot be stored in the tree it backs up: unmount it there, or "
                                     "choose another target")
            if in_tree(scope, real):
                raise DuetError(f"the scope {scope} can be reached inside the backup target {real} through a mount",
                                hint="choose a target outside the tree being backed up")
        except OSError as exc:
            raise DuetError(f"cannot tell where the backup target {real} lies: {exc.strerror or exc}") from None
    return real


@dataclass
class Snapshot:
    name: str
    manifest: dict | None    # None when the manifest is missing (a snapshot made by hand, or damaged)


class Target:
    """An open backup target. ``path`` must be an existing directory outside the scope (and not containing it)."""

    def __init__(self, path: str, scope: str | None = None, create: bool = True):
        real = check_target(path, scope)
        self.path = real
        self.fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.btrfs = fs_magic(self.fd) == BTRFS_SUPER_MAGIC
        self.tree_name = "mirror" if self.btrfs else "incomplete"
        self._lock_fd: int | None = None
        if create:
            self.internal = self._subdir(self.fd, INTERNAL, 0o700)
            os.fchmod(self.internal, 0o700)
            self.manifests = self._subdir(self.internal, "manifests", 0o700)
            self.snapshots = self._subdir(self.fd, SNAPSHOTS, 0o755)
        else:
            self.internal = self._open_existing(self.fd, INTERNAL)
            self.manifests = self._open_existing(self.internal, "manifests") if self.internal >= 0 else -1
            self.snapshots = self._open_existing(self.fd, SNAPSHOTS)

    def close(self) -> None:
        for fd in (self._lock_fd, self.manifests, self.snapshots, self.internal, self.fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._lock_fd = None

    @staticmethod
    def _subdir(parent: int, name: str, mode: int) -> int:
        try:
            os.mkdir(name, mode, dir_fd=parent)
        except FileExistsError:
            pass
        try:
            return open_beneath(parent, name, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise DuetError(f"cannot use the backup target: {name} is not a directory ({exc.strerror})") from None

    @staticmethod
    def _open_existing(parent: int, name: str) -> int:
        if parent < 0:
            return -1
        try:
            return open_beneath(parent, name, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return -1

    # -- lock --------------------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the target's lock until :meth:`close` (or the process ends)."""
        fd = open_beneath(self.internal, "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TargetBusy(f"another backup is writing to {self.path}",
                             hint="try again when it has finished") from None
        self._lock_fd = fd

    # -- the tree being built ----------------------------------------------------------------------------------
    def open_tree(self) -> int:
        """The mirror subvolume (btrfs) or the staging tree, created if missing; returns a directory fd."""
        try:
            return open_beneath(self.internal, self.tree_name, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            pass
        if self.btrfs:
            import btrfsutil

            btrfsutil.create_subvolume(f"/proc/self/fd/{self.internal}/{self.tree_name}")
        else:
            os.mkdir(self.tree_name, 0o700, dir_fd=self.internal)
        return open_beneath(self.internal, self.tree_name, os.O_RDONLY | os.O_DIRECTORY)

    def mark_tree_changed(self) -> None:
        """Forget, durably, which snapshot the tree is (before the first write of a run to it): a run killed after
        that leaves no claim behind, so the next run never takes the tree for a published snapshot."""
        try:
            os.unlink(TREE_OF, dir_fd=self.internal)
        except FileNotFoundError:
            return
        os.fsync(self.internal)

    def tree_is(self, name: str) -> bool:
        """Whether the tree is still exactly the published snapshot ``name``: it was published from the tree, and
        nothing was written to the tree since (btrfs; a hard-link tree is renamed to its snapshot)."""
        try:
            fd = open_beneath(self.internal, TREE_OF)
        except FileNotFoundError:
            return False
        with os.fdopen(fd, "rb") as fh:
            return fh.read() == name.encode()

    # -- snapshots ---------------------------------------------------------------------------------------------
    def snapshot_names(self) -> list[str]:
        if self.snapshots < 0:
            return []
        with os.scandir(self.snapshots) as it:
            return sorted(e.name for e in it if NAME_RE.match(e.name) and e.is_dir(follow_symlinks=False))

    def manifest(self, name: str) -> dict | None:
        _check_name(name)
        return _read_json(self.manifests, name + ".json")

    def latest(self) -> Snapshot | None:
        """The newest published snapshot that has a manifest (the base of the next incremental run)."""
        for name in reversed(self.snapshot_names()):
            m = self.manifest(name)
            if m is not None:
                return Snapshot(name, m)
        return None

    def record_verified(self, name: str, record: dict) -> None:
        """Keep what ``duet verify`` found in snapshot ``name`` (``.duet/verified/<name>.json``, 0600), for
        ``duet snapshots`` to show. OSError if the target cannot be written (mounted read-only)."""
        _check_name(name)
        if self.internal < 0:
            raise OSError(errno.ENOENT, "no .duet directory", self.path)
        fd = self._subdir(self.internal, VERIFIED, 0o700)
        try:
            write_atomic(fd, name + ".json", json.dumps(record, separators=(",", ":")).encode())
        finally:
            os.close(fd)

    def verified(self, name: str) -> dict | None:
        """What the last ``duet verify`` of snapshot ``name`` found, or None if it was never verified."""
        _check_name(name)
        try:
            return _read_json(self.internal, f"{VERIFIED}/{name}.json")
        except ValueError:      # a record cut short: as if never verified
            return None

    def open_snapshot(self, name: str) -> int:
        _check_name(name)
        try:
            return open_beneath(self.snapshots, name, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise DuetError(f"no snapshot {name} in {self.path}", hint="see duet snapshots --target") from None

    def new_name(self) -> str:
        """A name for the snapshot about to be published: now (UTC), after every existing one."""
        now = time.time()
        names = self.snapshot_names()
        name = snapshot_name(now)
        while names and name <= names[-1] or _exists(self.snapshots, name):
            now += 1
            name = snapshot_name(now)
        return name

    def publish(self, name: str, manifest: dict) -> None:
        """Write the manifest, then make the snapshot appear under ``snapshots/<name>`` in one step."""
        write_atomic(self.manifests, name + ".json",
                     json.dumps(manifest, separators=(",", ":")).encode())
        if self.btrfs:
            import btrfsutil

            btrfsutil.create_snapshot(f"/proc/self/fd/{self.internal}/{self.tree_name}",
                                      f"/proc/self/fd/{self.snapshots}/{name}", read_only=True)
        else:
            syncfs(self.fd)   # every copy and link of the tree is durable before its name appears
            os.rename(self.tree_name, name, src_dir_fd=self.internal, dst_dir_fd=self.snapshots)
        os.fsync(self.snapshots)
        self.clear_journal()
        if self.btrfs:
            # The mirror is this snapshot until the next write to it. Not fsynced: lost in a crash, it only costs
            # the next run its no-change shortcut (and an older name left in its place does not match the newest).
            tmp = f".{TREE_OF}.tmp.{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self.internal)
            try:
                os.write(fd, name.encode())
            finally:
                os.close(fd)
            os.rename(tmp, TREE_OF, src_dir_fd=self.internal, dst_dir_fd=self.internal)

    # -- journal -----------------------------------------------------------------------------------------------
    def journal_add(self, relpath: str, record: Record) -> None:
        """Note that the tree now holds this version of ``relpath`` (appended; read back by the next run)."""
        self.journal_add_many([(relpath, record)])

    def journal_add_many(self, entries: list[tuple[str, Record]]) -> None:
        data = "".join(json.dumps([rel, *rec], separators=(",", ":")) + "\n" for rel, rec in entries).encode()
        fd = open_beneath(self.internal, "journal", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def journal(self) -> dict[str, Record]:
        """relpath -> the version the tree holds, for files copied since the last snapshot was published. A line
        cut short by a crash is ignored."""
        try:
            fd = open_beneath(self.internal, "journal")
        except FileNotFoundError:
            return {}
        out: dict[str, Record] = {}
        with os.fdopen(fd, "rb") as fh:
            for line in fh:
                try:
                    rel, *record = json.loads(line)
                except ValueError:
                    continue
                out[rel] = record
        return out

    def clear_journal(self) -> None:
        try:
            os.unlink("journal", dir_fd=self.internal)
        except FileNotFoundError:
            pass


def _read_json(dir_fd: int, relpath: str) -> dict | None:
    """The JSON file ``relpath`` beneath ``dir_fd`` (-1: a directory that does not exist), or None if it is not
    there."""
    if dir_fd < 0:
        return None
    try:
        fd = open_beneath(dir_fd, relpath)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with os.fdopen(fd, "rb") as fh:
        return json.loads(fh.read())


def _check_name(name: str) -> None:
    """A snapshot name from the user (``--snapshot``) is a timestamp, never a path."""
    if not NAME_RE.match(name):
        raise DuetError(f"bad snapshot name {name!r}", hint="names look like 2026-11-26T041500Z")


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
