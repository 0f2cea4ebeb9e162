"""Reading a file for a scrub: from the device with O_DIRECT, and finding exactly which sectors fail.

O_DIRECT bypasses the page cache both ways: pages that happen to be cached (perhaps read long ago) do not answer for
the device, and the scrub leaves nothing behind in the cache that foreground programs would have to compete with.
btrfs verifies data checksums on direct reads as on buffered ones, so a bad sector is an ``EIO`` either way.

btrfs runs a direct read with page faults disabled; when the buffer's pages are not yet mapped it quietly falls
back to a buffered read (measured here: an untouched buffer put the whole file in the page cache and read up to
1.5x the bytes from the device). The buffer is therefore touched once before use.

A direct read that meets a bad sector returns what it read before it (a short read), and the next read, starting at
the bad sector, fails with EIO. A failed read is retried sector by sector, so a report names the bad 4 KiB blocks,
not the 1 MiB read that contained them.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

SECTOR = 4096            # the unit of a btrfs data checksum, and of the retries after an error
READ_SIZE = 1 << 20      # one O_DIRECT read


@dataclass
class Piece:
    """A stretch of the file as read: ``data`` (b"" where unreadable) and the byte ranges that failed."""

    offset: int
    data: bytes
    bad: list[tuple[int, int]] = field(default_factory=list)   # [start, end) byte ranges that gave EIO


class DeviceReader:
    """Reads a file opened by duet (``fd``) from the device, through a second descriptor opened with O_DIRECT.

    The second descriptor is the same open file reopened through ``/proc/self/fd``: same inode, so it cannot escape
    the scope, and the shared descriptor's flags are left alone for the other tasks. Where O_DIRECT is refused
    (tmpfs, some FUSE), it reads through the cache instead (``direct`` is then False) and duet's cache hygiene
    evicts what it brought in.
    """

    def __init__(self, fd: int):
        self.direct = True
        try:
            self.fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC | os.O_NOATIME)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd, self.direct = os.dup(fd), False
        self._buf = mmap.mmap(-1, READ_SIZE)       # page-aligned, as O_DIRECT wants ...
        self._buf.write(bytes(READ_SIZE))           # ... and faulted in: see the module's docstring
        self.bytes_read = 0

    def close(self) -> None:
        os.close(self.fd)
        self._buf.close()

    def __enter__(self) -> "DeviceReader":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _read(self, length: int, offset: int) -> bytes:
        """One aligned read of at most READ_SIZE bytes (short at end of file)."""
        n = os.preadv(self.fd, [memoryview(self._buf)[:length]], offset)
        self.bytes_read += n
        return self._buf[:n]

    def pieces(self, start: int, end: int) -> Iterator[Piece]:
        """Read ``[start, end)`` (``start`` sector-aligned) in READ_SIZE pieces; EIO pieces are narrowed down."""
        off = start
        while off < end:
            length = min(READ_SIZE, _round_up(end - off))
            try:
                data = self._read(length, off)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                yield self._sector_by_sector(off, min(end, off + length))
                off += length
                continue
            if not data:
                return                                  # end of file (it shrank since the scan)
            yield Piece(off, data[: end - off])
            if len(data) % SECTOR:
                return                                  # end of file, mid-sector
            off += len(data)    # a short read stops before a bad sector: the next read starts there and fails

    def _sector_by_sector(self, start: int, end: int) -> Piece:
        chunks, bad = [], []
        for off in range(start, end, SECTOR):
            try:
                chunks.append(self._read(SECTOR, off)[: end - off])
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                chunks.append(b"")
                self.bytes_read += SECTOR             # asked of the device all the same
                stop = min(end, off + SECTOR)
                if bad and bad[-1][1] == off:
                    bad[-1] = (bad[-1][0], stop)
                else:
                    bad.append((off, stop))
        return Piece(start, b"".join(chunks) if not bad else b"", bad)


def _round_up(n: int) -> int:
    return (n + SECTOR - 1) // SECTOR * SECTOR
