"""File identity as the kernel sees it, computed from user space.

The page-cache tracepoints name a file by its superblock device (kernel encoding ``MAJOR << 20 | MINOR``) and inode
number. That is ambiguous on btrfs, where inode numbers repeat in every subvolume and snapshot, so duet keys files by
:class:`~duet_core.events.FileId` ``(dev, subvol, ino)``. ``stat()`` cannot give that key: on btrfs ``st_dev`` is a
per-subvolume anonymous device that never equals the superblock's. This module computes it the way the kernel does:

* ``statx`` (raw syscall, so the new fields are visible) for the inode, the mount id and, on kernels >= 6.10, the
  btrfs subvolume id;
* ``/proc/self/mountinfo`` for the superblock device behind a mount id;
* the ``BTRFS_IOC_INO_LOOKUP`` ioctl for the subvolume id on kernels without ``STATX_SUBVOL``.

It also provides :func:`open_beneath`, the one way duet opens user files: never through a symlink, never outside the
directory it was given.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import select
import stat
import struct
import threading
from collections.abc import Iterator
from typing import NamedTuple

from duet_core.errors import DuetError
from duet_core.events import FileId

PathArg = str | bytes | os.PathLike

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# x86_64 syscall numbers.
SYS_STATX = 332
SYS_OPENAT2 = 437

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000

STATX_TYPE = 0x1
STATX_MODE = 0x2
STATX_INO = 0x100
STATX_SIZE = 0x200
STATX_MNT_ID = 0x1000
STATX_SUBVOL = 0x8000
STATX_WANTED = STATX_TYPE | STATX_MODE | STATX_INO | STATX_SIZE | STATX_MNT_ID | STATX_SUBVOL

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

# _IOWR(0x94, 18, struct btrfs_ioctl_ino_lookup_args): {u64 treeid; u64 objectid; char name[4080]} = 4096 bytes.
BTRFS_IOC_INO_LOOKUP = 0xD0009412
BTRFS_FIRST_FREE_OBJECTID = 256


def kdev(st_dev: int) -> int:
    """glibc's ``st_dev`` → the kernel's internal encoding ``MAJOR << 20 | MINOR`` used by tracepoints."""
    return os.major(st_dev) << 20 | os.minor(st_dev)


def _raise_errno(path: object = None) -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), path)


# ----------------------------------------------------------------------------------------------------------- statx


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("_reserved", ctypes.c_int32)]


class _StructStatx(ctypes.Structure):
    """``struct statx`` from include/uapi/linux/stat.h (256 bytes; ``stx_subvol`` at offset 0xa0)."""

    _fields_ = [
        ("stx_mask", ctypes.c_uint32),
        ("stx_blksize", ctypes.c_uint32),
        ("stx_attributes", ctypes.c_uint64),
        # 0x10
        ("stx_nlink", ctypes.c_uint32),
        ("stx_uid", ctypes.c_uint32),
        ("stx_gid", ctypes.c_uint32),
        ("stx_mode", ctypes.c_uint16),
        ("_spare0", ctypes.c_uint16),
        # 0x20
        ("stx_ino", ctypes.c_uint64),
        ("stx_size", ctypes.c_uint64),
        ("stx_blocks", ctypes.c_uint64),
        ("stx_attributes_mask", ctypes.c_uint64),
        # 0x40
        ("stx_atime", _StatxTimestamp),
        ("stx_btime", _StatxTimestamp),
        ("stx_ctime", _StatxTimestamp),
        ("stx_mtime", _StatxTimestamp),
        # 0x80
        ("stx_rdev_major", ctypes.c_uint32),
        ("stx_rdev_minor", ctypes.c_uint32),
        ("stx_dev_major", ctypes.c_uint32),
        ("stx_dev_minor", ctypes.c_uint32),
        # 0x90
        ("stx_mnt_id", ctypes.c_uint64),
        ("stx_dio_mem_align", ctypes.c_uint32),
        ("stx_dio_offset_align", ctypes.c_uint32),
        # 0xa0
        ("stx_subvol", ctypes.c_uint64),
        ("stx_atomic_write_unit_min", ctypes.c_uint32),
        ("stx_atomic_write_unit_max", ctypes.c_uint32),
        # 0xb0
        ("stx_atomic_write_segments_max", ctypes.c_uint32),
        ("stx_dio_read_offset_align", ctypes.c_uint32),
        ("stx_atomic_write_unit_max_opt", ctypes.c_uint32),
        ("_spare2", ctypes.c_uint32),
        # 0xc0
        ("_spare3", ctypes.c_uint64 * 8),
    ]


assert ctypes.sizeof(_StructStatx) == 256 and _StructStatx.stx_subvol.offset == 0xA0


class Statx(NamedTuple):
    """The fields of one ``statx`` call that duet uses.

    ``subvol`` is None when the kernel did not fill it (not btrfs, or a kernel before 6.10). ``dev`` is the
    ``st_dev`` glibc would report (``os.makedev`` encoding), ``mask`` what the kernel says it filled.
    """

    ino: int
    mode: int
    size: int
    mnt_id: int
    subvol: int | None
    mask: int
    dev: int


def statx(path: PathArg | int, dir_fd: int | None = None, mask: int = STATX_WANTED) -> Statx:
    """``statx`` of ``path`` (relative to ``dir_fd`` if given) or of an open fd; never follows a symlink.

    Raises OSError as ``os.stat`` would.
    """
    if isinstance(path, int):
        dirfd, name, flags = path, b"", AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH
    else:
        dirfd = AT_FDCWD if dir_fd is None else dir_fd
        name, flags = os.fsencode(path), AT_SYMLINK_NOFOLLOW
    buf = _StructStatx()
    rc = _syscall(
        ctypes.c_long(SYS_STATX),
        ctypes.c_long(dirfd),
        ctypes.c_char_p(name),
        ctypes.c_long(flags),
        ctypes.c_long(mask),
        ctypes.byref(buf),
    )
    if rc < 0:
        _raise_errno(path)
    return Statx(
        ino=buf.stx_ino,
        mode=buf.stx_mode,
        size=buf.stx_size,
        mnt_id=buf.stx_mnt_id,
        subvol=buf.stx_subvol if buf.stx_mask & STATX_SUBVOL else None,
        mask=buf.stx_mask,
        dev=os.makedev(buf.stx_dev_major, buf.stx_dev_minor),
    )


# ------------------------------------------------------------------------------------------------------ mountinfo


class Mount(NamedTuple):
    """One line of /proc/self/mountinfo. ``dev`` is the superblock's device in kernel encoding."""

    mnt_id: int
    parent_id: int
    dev: int
    root: str
    mount_point: str
    options: str
    fstype: str
    source: str
    super_options: str


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space, ``\\134`` for a backslash) and decode as a path."""
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_mountinfo(data: bytes) -> dict[int, Mount]:
    """Parse the text of /proc/<pid>/mountinfo into ``{mount id: Mount}`` (see proc(5) for the format)."""
    mounts = {}
    for line in data.splitlines():
        fields = line.split(b" ")
        sep = fields.index(b"-", 6)  # optional fields (shared:N, master:N, ...) sit between field 6 and "-"
        major, minor = fields[2].split(b":")
        mount = Mount(
            mnt_id=int(fields[0]),
            parent_id=int(fields[1]),
            dev=int(major) << 20 | int(minor),
            root=_unescape(fields[3]),
            mount_point=_unescape(fields[4]),
            options=fields[5].decode(),
            fstype=fields[sep + 1].decode(),
            source=_unescape(fields[sep + 2]),
            super_options=fields[sep + 3].decode() if len(fields) > sep + 3 else "",
        )
        mounts[mount.mnt_id] = mount
    return mounts


class MountTable:
    """A cached view of /proc/self/mountinfo that re-reads itself when the mount table has changed.

    Mount ids are reused after an unmount, so a cache without invalidation would hand out a dead mount's device.
    The kernel flags an open mountinfo file with POLLPRI whenever the namespace's mount table changes; checking that
    costs one ``poll`` per lookup and keeps the cache exact without re-reading the file each time. Thread-safe.
    """

    def __init__(self, path: str = "/proc/self/mountinfo"):
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLPRI)
        self._lock = threading.Lock()
        self._mounts: dict[int, Mount] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the mount table now."""
        with self._lock:
            self._read()

    def _read(self) -> None:
        self._poll.poll(0)  # consume a pending change notice: what we read next is at least that new
        chunks = []
        os.lseek(self._fd, 0, os.SEEK_SET)
        while chunk := os.read(self._fd, 1 << 16):
            chunks.append(chunk)
        self._mounts = parse_mountinfo(b"".join(chunks))

    def _refresh_if_changed(self) -> None:
        with self._lock:
            if self._poll.poll(0):
                self._read()

    def get(self, mnt_id: int) -> Mount:
        """The mount with this id; raises DuetError when it is not (or no longer) in the mount table."""
        self._refresh_if_changed()
        try:
            return self._mounts[mnt_id]
        except KeyError:
            raise DuetError(f"mount id {mnt_id} is not in /proc/self/mountinfo", "was it just unmounted?") from None

    def __iter__(self) -> Iterator[Mount]:
        self._refresh_if_changed()
        return iter(list(self._mounts.values()))

    def close(self) -> None:
        """Close the mountinfo file; the table must not be used afterwards."""
        os.close(self._fd)


_mount_table: MountTable | None = None


def mounts() -> MountTable:
    """The process-wide :class:`MountTable`, created on first use."""
    global _mount_table
    if _mount_table is None:
        _mount_table = MountTable()
    return _mount_table


# ------------------------------------------------------------------------------------------------------- subvolume


def btrfs_ino_lookup_subvol(fd: int) -> int:
    """The btrfs subvolume id of the inode open on ``fd``, via ``BTRFS_IOC_INO_LOOKUP``.

    With treeid 0 the kernel fills in the fd's own tree; objectid 256 makes it skip the path lookup, so no
    CAP_SYS_ADMIN is needed. This is the fallback for kernels without ``STATX_SUBVOL`` (before 6.10).
    """
    args = bytearray(4096)
    struct.pack_into("QQ", args, 0, 0, BTRFS_FIRST_FREE_OBJECTID)
    fcntl.ioctl(fd, BTRFS_IOC_INO_LOOKUP, args)
    return struct.unpack_from("Q", args, 0)[0]


def _subvol_by_ioctl(path: PathArg | int, dir_fd: int | None, mode: int) -> int:
    """Open something that lives in the same subvolume as ``path`` and ask btrfs for its subvolume.

    Only directories can be subvolume roots, so for anything that is neither a directory nor a regular file
    (symlinks, devices, fifos – opening those could block, follow or have side effects) the parent directory
    answers instead. So it does for the empty placeholder directory (inode 2) that stands where a snapshot's
    source had a nested subvolume: it is a bare in-memory inode without btrfs ioctls, and the kernel hangs it on
    its parent's subvolume.
    """
    if isinstance(path, int):
        return btrfs_ino_lookup_subvol(path)
    parent = os.path.dirname(os.fsdecode(path)) or "."
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        try:
            return _ioctl_subvol_at(path, dir_fd)
        except OSError as e:
            if e.errno != errno.ENOTTY:
                raise
    return _ioctl_subvol_at(parent, dir_fd)


def _ioctl_subvol_at(path: PathArg, dir_fd: int | None) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        return btrfs_ino_lookup_subvol(fd)
    finally:
        os.close(fd)


def _subvol(st: Statx, fstype: str, path: PathArg | int, dir_fd: int | None) -> int:
    if fstype != "btrfs":
        return 0
    if st.subvol is not None:
        return st.subvol
    return _subvol_by_ioctl(path, dir_fd, st.mode)


def _mount_of(st: Statx, path: object) -> Mount:
    if not st.mask & STATX_MNT_ID:
        raise DuetError(f"statx gave no mount id for {path!r}", "duet needs Linux 5.8 or newer")
    return mounts().get(st.mnt_id)


def subvol_of(path: PathArg | int, dir_fd: int | None = None) -> int:
    """The btrfs subvolume id of a path or open fd (never following a symlink); 0 on other filesystems."""
    st = statx(path, dir_fd)
    return _subvol(st, _mount_of(st, path).fstype, path, dir_fd)


def file_id(path: PathArg | int, dir_fd: int | None = None) -> FileId:
    """The key the kernel's page-cache events carry for ``path`` (or an open fd); a symlink is not followed.

    ``dev`` is the superblock's device from mountinfo (on btrfs this is *not* ``st_dev``), ``subvol`` the btrfs
    subvolume id or 0, ``ino`` the inode number.
    """
    st = statx(path, dir_fd)
    mount = _mount_of(st, path)
    return FileId(mount.dev, _subvol(st, mount.fstype, path, dir_fd), st.ino)


# ---------------------------------------------------------------------------------------------------------- DevMap


class DevInfo(NamedTuple):
    """What every file with a given ``st_dev`` shares: superblock device (kernel encoding), subvolume, fs type."""

    dev: int
    subvol: int
    fstype: str


class DevMap:
    """``st_dev`` → :class:`DevInfo`, learnt by one ``statx`` per distinct ``st_dev``.

    Every btrfs subvolume has its own ``st_dev`` and ``st_ino`` is the kernel's inode number, so a tree walk that
    already has ``(st_dev, st_ino)`` from ``lstat`` / ``DirEntry.inode()`` needs one statx per subvolume or mount
    rather than one per file. Anonymous devices are reused once a subvolume or mount is gone, so an entry is only
    trustworthy for as long as the tree is not reorganised: call :meth:`clear` before each new walk.
    """

    def __init__(self) -> None:
        self._map: dict[int, DevInfo] = {}
        self.misses = 0  # statx calls made, for diagnostics and tests

    def info(self, st_dev: int, path: PathArg | int, dir_fd: int | None = None) -> DevInfo:
        """The DevInfo for ``st_dev``; ``path`` (relative to ``dir_fd``) or an fd is statx-ed if it is new.

        Raises OSError (ESTALE) if ``path`` no longer has that ``st_dev`` – it was replaced meanwhile.
        """
        found = self._map.get(st_dev)
        if found is None:
            self.misses += 1
            st = statx(path, dir_fd)
            if st.dev != st_dev:
                raise OSError(errno.ESTALE, "changed while being examined", path)
            mount = _mount_of(st, path)
            found = self._map[st_dev] = DevInfo(mount.dev, _subvol(st, mount.fstype, path, dir_fd), mount.fstype)
        return found

    def file_id(self, st_dev: int, st_ino: int, path: PathArg | int, dir_fd: int | None = None) -> FileId:
        """The FileId of a file whose ``lstat`` gave ``(st_dev, st_ino)``; see :meth:`info` for ``path``."""
        found = self.info(st_dev, path, dir_fd)
        return FileId(found.dev, found.subvol, st_ino)

    def clear(self) -> None:
        """Forget everything learnt (subvolumes or mounts may have come and gone)."""
        self._map.clear()


# ------------------------------------------------------------------------------------------------------ openat2


def open_beneath(root_fd: int, relpath: PathArg, flags: int = os.O_RDONLY, mode: int = 0) -> int:
    """Open ``relpath`` below the directory ``root_fd`` with ``openat2``; returns the new fd.

    No symlink is followed, in any component, and ``..`` or an absolute path cannot leave ``root_fd``
    (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS); O_NOFOLLOW | O_CLOEXEC are always added.
    Mount points below ``root_fd`` are crossed. Raises OSError: ELOOP for a symlink, EXDEV for an escape, ENOSYS
    before Linux 5.6. ``mode`` is only allowed with O_CREAT / O_TMPFILE.
    """
    how = struct.pack(
        "QQQ",
        flags | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    )
    rc = _syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_long(root_fd),
        ctypes.c_char_p(os.fsencode(relpath)),
        ctypes.c_char_p(how),
        ctypes.c_long(len(how)),
    )
    if rc < 0:
        _raise_errno(relpath)
    return rc


FS_IOC_GETVERSION = 0x80087601   # _IOR('v', 1, long): the inode's generation (ext4, btrfs, xfs)


def inode_generation(fd: int) -> int | None:
    """``i_generation`` of an open file — what the kernel side keys its ignore set with — or None if the
    filesystem does not report it."""
    import array

    buf = array.array("l", [0])
    try:
        fcntl.ioctl(fd, FS_IOC_GETVERSION, buf, True)
    except OSError:
        return None
    return buf[0] & 0xFFFFFFFF
