"""Reading a file for a scrub so that every byte comes from the device now, and naming exactly which sectors fail.

Three kinds of pages, three ways to read them:

* pages **not cached**: an ordinary read, which goes to the device (btrfs verifies the checksums as the pages come
  in) with the kernel's read-ahead keeping the device busy; duet evicts afterwards what the run brought in.
* pages **cached before the run** touched the file, perhaps long ago: they do not answer for the device, so they are
  read with O_DIRECT, which goes to the device (verified the same way) without disturbing the cached copy.
* pages **fresh** in the cache (read from the device during this run, by a foreground program or by the run
  itself): already verified; a hash reads them from the cache, a btrfs scrub not at all.

btrfs runs a direct read with page faults disabled; when the buffer's pages are not yet mapped it quietly falls
back to a buffered read (measured here: an untouched buffer put the whole file in the page cache and read up to
1.5x the bytes from the device). The O_DIRECT buffer is therefore touched once, when it is made, and reused.

A read that meets a bad sector returns what it read before it (a short read), and the next read, starting at the
bad sector, fails with EIO. A failed read is retried sector by sector with O_DIRECT, so a report names the bad
4 KiB blocks, not the 1 MiB read that contained them.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

SECTOR = 4096            # the unit of a btrfs data checksum, and of the retries after an error
READ_SIZE = 1 << 20      # one read


@dataclass
class Piece:
    """A stretch of the file as read: ``data`` (b"" if any of it was unreadable) and the byte ranges that failed."""

    offset: int
    data: bytes
    bad: list[tuple[int, int]] = field(default_factory=list)   # [start, end) byte ranges that gave EIO
    size: int = -1                                             # bytes read (-1: len(data))

    def __post_init__(self):
        if self.size < 0:
            self.size = len(self.data)


class DirectBuffer:
    """One page-aligned buffer for O_DIRECT reads, faulted in once (see the module docstring), a scratch buffer for
    buffered reads whose bytes are not needed, and ``/dev/null`` to ``sendfile`` them to instead where it works."""

    def __init__(self, size: int = READ_SIZE):
        self.map = mmap.mmap(-1, size)
        self.map.write(bytes(size))
        self.size = size
        self.scratch = bytearray(READ_SIZE)
        self.null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self.sendfile = True     # until a filesystem refuses to splice


class FileReader:
    """Reads one file (``fd``, opened by duet) either way. The O_DIRECT descriptor is the same open file reopened
    through ``/proc/self/fd`` (same inode: it cannot escape the scope; the shared descriptor's flags stay as they
    are for the other tasks), opened on first use. Where O_DIRECT is refused (tmpfs, some FUSE) direct reads go
    through the cache instead and duet's cache hygiene evicts what they brought in."""

    def __init__(self, fd: int, buf: DirectBuffer):
        self.fd, self.buf = fd, buf
        self._direct_fd: int | None = None
        self.direct_bytes = 0        # read with O_DIRECT: from the device
        self.buffered_bytes = 0      # read through the page cache

    def close(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    def __enter__(self) -> "FileReader":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _dfd(self) -> int:
        if self._direct_fd is None:
            try:
                self._direct_fd = os.open(f"/proc/self/fd/{self.fd}",
                                          os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC | os.O_NOATIME)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_fd = os.dup(self.fd)
        return self._direct_fd

    def _read_direct(self, length: int, offset: int) -> bytes:
        n = os.preadv(self._dfd(), [memoryview(self.buf.map)[:length]], offset)
        self.direct_bytes += n
        return self.buf.map[:n]

    def direct(self, start: int, end: int) -> Iterator[Piece]:
        """``[start, end)`` (``start`` sector-aligned) with O_DIRECT, in pieces of at most the buffer's size."""
        off = start
        while off < end:
            length = min(self.buf.size, _round_up(end - off))
            try:
                data = self._read_direct(length, off)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                yield self.narrow(off, min(end, off + length))
                off += length
                continue
            if not data:
                return                                  # end of file (it shrank since the scan)
            yield Piece(off, data[: end - off])
            if len(data) % SECTOR:
                return                                  # end of file, mid-sector
            off += len(data)    # a short read stops before a bad sector: the next read starts there and fails

    def buffered(self, start: int, end: int, keep: bool = True) -> Iterator[Piece]:
        """``[start, end)`` through the page cache (read-ahead included), in READ_SIZE pieces. With ``keep=False``
        the pieces carry no data, for a read that only verifies: the pages go to ``/dev/null`` by ``sendfile``
        (the kernel reads a page that is missing or not up to date, verifying it, and copies nothing: a fifth of
        the CPU of a read into a buffer), or into a scratch buffer where the filesystem cannot splice."""
        off = start
        while off < end:
            length = min(READ_SIZE, end - off)
            try:
                if keep:
                    data = os.pread(self.fd, length, off)
                    n = len(data)
                else:
                    n, data = self._discard(length, off), b""
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                yield self.narrow(off, min(end, off + _round_up(length)))
                off += _round_up(length)
                continue
            if not n:
                return
            self.buffered_bytes += n
            yield Piece(off, data, size=n)
            off += n

    def _discard(self, length: int, offset: int) -> int:
        """Read ``length`` bytes at ``offset`` through the page cache without keeping them; bytes read."""
        if self.buf.sendfile:
            try:
                return os.sendfile(self.buf.null, self.fd, offset, length)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self.buf.sendfile = False
        return os.preadv(self.fd, [memoryview(self.buf.scratch)[:length]], offset)

    def narrow(self, start: int, end: int) -> Piece:
        """Re-read ``[start, end)`` sector by sector with O_DIRECT; the sectors that fail are the bad ranges."""
        chunks, bad = [], []
        for off in range(start, end, SECTOR):
            try:
                chunks.append(self._read_direct(SECTOR, off)[: end - off])
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                self.direct_bytes += SECTOR           # asked of the device all the same
                stop = min(end, off + SECTOR)
                if bad and bad[-1][1] == off:
                    bad[-1] = (bad[-1][0], stop)
                else:
                    bad.append((off, stop))
        return Piece(start, b"" if bad else b"".join(chunks), bad)


def _round_up(n: int) -> int:
    return (n + SECTOR - 1) // SECTOR * SECTOR
