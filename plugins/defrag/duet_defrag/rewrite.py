"""Rewriting a file's data into fewer extents, one way per filesystem — never changing a byte of it.

* btrfs: ``BTRFS_IOC_DEFRAG_RANGE`` on exactly the logical ranges worth rewriting (so extents shared with a
  snapshot or reflink outside those ranges stay shared), as ``btrfs filesystem defragment`` does per file.
* ext4: ``EXT4_IOC_MOVE_EXT``, as e4defrag does: a donor file (an unnamed ``O_TMPFILE`` in the same directory) is
  given the file's size with ``fallocate``; if the allocator found fewer extents for it, the file's data blocks are
  exchanged with the donor's, under the kernel's inode locks, and the donor (now holding the old blocks) is closed
  and freed.
* xfs: ``xfs_fsr`` on the single file (argument list, no shell), run from inside the file's directory.

Every function takes descriptors the caller opened safely (``open_beneath``) and checked to be the expected inode.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
from collections.abc import Callable

from duet_core.errors import DuetError
from duet_defrag import fiemap

# struct btrfs_ioctl_defrag_range_args {u64 start, len, flags; u32 extent_thresh, compress_type, unused[4];}
BTRFS_DEFRAG_ARGS = struct.Struct("=QQQII16x")
BTRFS_IOC_DEFRAG_RANGE = 0x40309410          # _IOW(0x94, 16, struct btrfs_ioctl_defrag_range_args)
BTRFS_DEFRAG_RANGE_START_IO = 0x2            # start writing the rewritten range back at once

# struct move_extent {u32 reserved, donor_fd; u64 orig_start, donor_start, len, moved_len;}  (units: blocks)
EXT4_MOVE_EXTENT = struct.Struct("=IIQQQQ")
EXT4_IOC_MOVE_EXT = 0xC028660F               # _IOWR('f', 15, struct move_extent)


class NotImproved(Exception):
    """The filesystem could not find a better layout (free space too fragmented); nothing was changed."""


def _pieces(start: int, end: int, step: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut at the multiples of ``step`` (a filesystem's largest extent, so the cuts cost no
    extent the ideal layout does not have anyway)."""
    cuts = list(range((start // step + 1) * step, end, step))
    return list(zip([start, *cuts], [*cuts, end]))


def btrfs_defrag(fd: int, runs: tuple[tuple[int, int], ...], checkpoint: Callable[[], None] = lambda: None) -> None:
    """Defragment the logical ``runs`` ``(start, end)`` of a btrfs file; other ranges are not touched.

    ``extent_thresh`` is btrfs's largest data extent, so every smaller extent in a run is a candidate to merge.
    A run is rewritten one largest extent (128 MiB) at a time, with ``checkpoint`` before each: what it raises (a
    stop) leaves the file part rewritten — its bytes the same, as always.
    """
    step = fiemap.MAX_EXTENT["btrfs"]
    for run_start, run_end in runs:
        for start, end in _pieces(run_start, run_end, step):
            checkpoint()
            args = bytearray(BTRFS_DEFRAG_ARGS.pack(start, end - start, BTRFS_DEFRAG_RANGE_START_IO, step, 0))
            fcntl.ioctl(fd, BTRFS_IOC_DEFRAG_RANGE, args, True)


def ext4_defrag(fd: int, dir_fd: int, size: int, extents_now: int,
                checkpoint: Callable[[], None] = lambda: None) -> None:
    """Move the ext4 file open as ``fd`` (read-write) onto freshly allocated blocks, if they are fewer extents.

    ``dir_fd`` is the file's directory (the donor is created there, on the same filesystem, with no name).
    Raises :class:`NotImproved` when the allocator cannot beat ``extents_now``.
    """
    if size == 0:
        return
    block = os.fstatvfs(fd).f_bsize
    blocks = -(-size // block)
    os.fdatasync(fd)            # delayed-allocation data gets its blocks first: only placed blocks can be moved
    donor = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            os.posix_fallocate(donor, 0, blocks * block)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise NotImproved("no free space for a donor file") from None
            raise
        donor_extents = fiemap.layout(fiemap.extents(donor), "ext4").extents
        if donor_extents >= extents_now:
            raise NotImproved(f"free space allows no better layout ({donor_extents} extents)")
        moved = 0
        step = fiemap.MAX_EXTENT["ext4"] // block    # one largest extent a call, a checkpoint before each
        while moved < blocks:
            checkpoint()
            args = bytearray(EXT4_MOVE_EXTENT.pack(0, donor, moved, moved, min(step, blocks - moved), 0))
            fcntl.ioctl(fd, EXT4_IOC_MOVE_EXT, args, True)
            step = EXT4_MOVE_EXTENT.unpack(args)[5]
            if step == 0:
                break           # the file shrank meanwhile: nothing left to move
            moved += step
    finally:
        os.close(donor)


def xfs_defrag(dir_fd: int, name: str) -> None:
    """Run ``xfs_fsr`` on one file, by its name inside the directory ``dir_fd`` (no path from the user is
    resolved through a symlink on the way there); xfs_fsr itself keeps the old layout if it cannot improve it."""
    proc = subprocess.run(["xfs_fsr", "./" + name], cwd=f"/proc/self/fd/{dir_fd}", pass_fds=(dir_fd,),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DuetError(f"xfs_fsr failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
