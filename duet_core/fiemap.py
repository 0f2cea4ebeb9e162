"""A file's extents, from the kernel's ``FS_IOC_FIEMAP`` ioctl (``Documentation/filesystems/fiemap.rst``).

What tasks that care where data lies on disk build on: defragmentation (how many extents, which ranges to
rewrite) and deduplication (which extents are already shared). Every filesystem duet runs on implements it.
"""

from __future__ import annotations

import fcntl
import struct
from dataclasses import dataclass

FS_IOC_FIEMAP = 0xC020660B          # _IOWR('f', 11, struct fiemap)
FIEMAP_HEADER = struct.Struct("=QQIIII")          # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count
FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")      # fe_logical, fe_physical, fe_length, (reserved), fe_flags
FIEMAP_MAX_OFFSET = (1 << 64) - 1
BATCH = 512                          # extents asked for per ioctl call

FIEMAP_FLAG_SYNC = 0x1               # write dirty data back first, so every extent has its blocks

# fe_flags (include/uapi/linux/fiemap.h)
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2          # location not known yet
FIEMAP_EXTENT_DELALLOC = 0x4         # delayed allocation: dirty data not yet given blocks
FIEMAP_EXTENT_ENCODED = 0x8          # compressed (btrfs) or otherwise encoded
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200    # stored in metadata (btrfs inline extent, ext4 inline data)
FIEMAP_EXTENT_UNWRITTEN = 0x800      # preallocated
FIEMAP_EXTENT_SHARED = 0x2000        # shared with a snapshot or a reflink copy


@dataclass(frozen=True, slots=True)
class Extent:
    """One FIEMAP record: ``logical`` offset in the file, ``physical`` address, ``length`` in bytes, ``flags``."""

    logical: int
    physical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.logical + self.length

    @property
    def shared(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_SHARED)

    @property
    def unplaced(self) -> bool:
        """Dirty data without blocks yet (delayed allocation): the file is being written."""
        return bool(self.flags & (FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_UNKNOWN))

    @property
    def fixed_size(self) -> bool:
        """Compressed or inline: not made of ordinary data extents a defragmenter could merge."""
        return bool(self.flags & (FIEMAP_EXTENT_ENCODED | FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_NOT_ALIGNED))


def extents(fd: int, size: int | None = None, sync: bool = False) -> list[Extent]:
    """The extents of the open file (of its first ``size`` bytes, if given), in logical order. ``sync``: write its
    dirty data back first (FIEMAP_FLAG_SYNC), so that none is left unplaced. Raises OSError where unsupported."""
    out: list[Extent] = []
    end = FIEMAP_MAX_OFFSET if size is None else size
    start = 0
    while start < end:
        buf = bytearray(FIEMAP_HEADER.size + BATCH * FIEMAP_EXTENT.size)
        FIEMAP_HEADER.pack_into(buf, 0, start, end - start, FIEMAP_FLAG_SYNC if sync else 0, 0, BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = FIEMAP_HEADER.unpack_from(buf, 0)[3]
        if mapped == 0:
            break
        last = None
        for i in range(mapped):
            last = Extent(*FIEMAP_EXTENT.unpack_from(buf, FIEMAP_HEADER.size + i * FIEMAP_EXTENT.size))
            out.append(last)
        if last.flags & FIEMAP_EXTENT_LAST or mapped < BATCH:
            break
        start = last.end
    return out
