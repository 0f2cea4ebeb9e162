"""What tasks need to know about the filesystem a file is on, and how to remove a tree from it safely.

``fstatfs``'s ``f_type`` tells btrfs, ext4 and xfs apart (the ioctls each task may use differ); :func:`remove_tree_at`
is the one way a task deletes a directory tree it owns (a backup's stale entries, a snapshot in the trash): through
file descriptors only, never through a symlink, never into another mounted filesystem.
"""

from __future__ import annotations

import ctypes
import os
import stat

from duet_core.errors import DuetError
from duet_core.identity import BTRFS_FIRST_FREE_OBJECTID

BTRFS_SUPER_MAGIC = 0x9123683E
EXT4_SUPER_MAGIC = 0xEF53          # ext2 and ext3 share it
XFS_SUPER_MAGIC = 0x58465342
NAMES = {BTRFS_SUPER_MAGIC: "btrfs", EXT4_SUPER_MAGIC: "ext4", XFS_SUPER_MAGIC: "xfs"}

_libc = ctypes.CDLL(None, use_errno=True)


def fs_magic(fd: int) -> int:
    """``f_type`` of the filesystem holding the open ``fd`` (``fstatfs``): its magic number."""
    buf = ctypes.create_string_buffer(128)      # struct statfs is 120 bytes on x86_64; f_type (a long) comes first
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int.from_bytes(buf.raw[:8], "little") & 0xFFFFFFFF


def fs_name(fd: int) -> str | None:
    """'btrfs', 'ext4' or 'xfs' for a file on one of them, else None."""
    return NAMES.get(fs_magic(fd))


def remove_tree_at(parent_fd: int, name: str, dev: int | None = None) -> None:
    """Remove ``name`` below the directory ``parent_fd`` and everything in it, through file descriptors only.

    Never follows a symlink (they are unlinked as entries) and never leaves the filesystem ``dev`` (by default the
    parent's): a mount point inside is an error, not something to empty — except a btrfs subvolume, which is
    deleted as a whole. So nothing outside the tree can be reached, whatever was planted inside it.
    """
    if dev is None:
        dev = os.fstat(parent_fd).st_dev
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        here = os.fstat(fd)
        if here.st_dev != dev:
            if fs_magic(fd) == BTRFS_SUPER_MAGIC and here.st_ino == BTRFS_FIRST_FREE_OBJECTID:
                import btrfsutil

                btrfsutil.delete_subvolume(f"/proc/self/fd/{parent_fd}/{name}")
                return
            raise DuetError(f"refusing to remove {name!r}: another filesystem is mounted there")
        for entry in os.listdir(fd):
            remove_tree_at(fd, entry, dev)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)
