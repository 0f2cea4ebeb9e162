"""The kernel side of deduplication: ``FIDEDUPERANGE`` to share identical data, ``FIEMAP`` to see what is shared.

``FIDEDUPERANGE`` (``ioctl_fideduperange(2)``) asks the filesystem to make a range of one file use the extents of
a range of another *if the bytes are identical*: the kernel locks both ranges, compares them and shares them in one
step, so a file written meanwhile is never corrupted — at worst the call reports ``FILE_DEDUPE_RANGE_DIFFERS`` and
changes nothing. It never copies data. btrfs and xfs (reflink=1) implement it; btrfs takes at most 16 MiB a call.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable

from duet_core.fiemap import Extent, extents
from duet_core.filesystems import BTRFS_SUPER_MAGIC, XFS_SUPER_MAGIC

FIDEDUPERANGE = 0xC0189436          # _IOWR(0x94, 54, struct file_dedupe_range)
FILE_DEDUPE_RANGE_DIFFERS = 1
DEDUPE_CHUNK = 16 << 20             # btrfs's BTRFS_MAX_DEDUPE_LEN: larger requests are cut short

_RANGE = struct.Struct("=QQHHI")               # src_offset, src_length, dest_count, reserved1, reserved2
_RANGE_INFO = struct.Struct("=qQQiI")          # dest_fd, dest_offset, bytes_deduped, status, reserved

# Filesystems (statfs f_type) whose FIDEDUPERANGE duet uses; elsewhere gc only reports.
DEDUPE_FILESYSTEMS = {BTRFS_SUPER_MAGIC: "btrfs", XFS_SUPER_MAGIC: "xfs"}


def fiemap(fd: int, size: int) -> list[Extent]:
    """The extents of the first ``size`` bytes of a file, after writing back its dirty pages (FIEMAP_FLAG_SYNC)."""
    return extents(fd, size, sync=True)


def same_physical_bytes(a: list[Extent], b: list[Extent], size: int) -> int:
    """Bytes of the first ``size`` bytes at which files ``a`` and ``b`` already use the very same disk blocks."""
    total, i = 0, 0
    for eb in b:
        while i < len(a) and a[i].logical + a[i].length <= eb.logical:
            i += 1
        j = i
        while j < len(a) and a[j].logical < eb.logical + eb.length:
            ea = a[j]
            if ea.physical - ea.logical == eb.physical - eb.logical and ea.physical:
                lo = max(ea.logical, eb.logical)
                hi = min(ea.logical + ea.length, eb.logical + eb.length, size)
                total += max(0, hi - lo)
            j += 1
    return total


def exclusive_bytes(extents: list[Extent], limit: int) -> int:
    """Bytes below offset ``limit`` (the file's size rounded up to whole blocks) in extents no other file or
    snapshot refers to: what sharing them with another file's extents frees."""
    return sum(max(0, min(e.logical + e.length, limit) - e.logical) for e in extents if not e.shared)


def dedupe(src_fd: int, dst_fd: int, length: int,
           checkpoint: Callable[[], None] = lambda: None) -> tuple[int, bool]:
    """Make the first ``length`` bytes of ``dst_fd`` share the extents of ``src_fd``'s, where identical.

    Returns (bytes deduplicated, whether the kernel found the contents to differ — then it stopped there, having
    changed nothing of that chunk). Raises OSError when the filesystem refuses (EOPNOTSUPP, EROFS, EXDEV...).
    ``checkpoint`` is called before each chunk; what it raises (a stop) leaves the chunks done so far shared — the
    same bytes either way.
    """
    done = 0
    while done < length:
        checkpoint()
        want = min(DEDUPE_CHUNK, length - done)
        buf = bytearray(_RANGE.size + _RANGE_INFO.size)
        _RANGE.pack_into(buf, 0, done, want, 1, 0, 0)
        _RANGE_INFO.pack_into(buf, _RANGE.size, dst_fd, done, 0, 0, 0)
        fcntl.ioctl(src_fd, FIDEDUPERANGE, buf, True)
        _fd, _off, deduped, status, _r = _RANGE_INFO.unpack_from(buf, _RANGE.size)
        if status < 0:
            raise OSError(-status, os.strerror(-status))
        if status == FILE_DEDUPE_RANGE_DIFFERS:
            return done, True
        if deduped == 0:
            break
        done += deduped
    return done, False
