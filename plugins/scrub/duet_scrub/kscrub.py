"""btrfs' own scrub, driven from Python: the ioctls behind ``btrfs scrub start``/``cancel``/``status``.

``BTRFS_IOC_SCRUB`` verifies every copy of every data and metadata block of one device against its checksum, in
device order with many reads in flight — far faster than reading a cold file tree file by file — and repairs from a
good copy where the profile has one. It blocks until the device is done or the scrub is cancelled
(``BTRFS_IOC_SCRUB_CANCEL``, for every device of the filesystem at once); ``BTRFS_IOC_SCRUB_PROGRESS`` reads its
counters meanwhile. ``last_physical`` of a cancelled scrub is where the next one may resume (``start``).
Structures from ``include/uapi/linux/btrfs.h``; every call needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import struct
import threading
import uuid
from dataclasses import dataclass, field

_IOC_MAGIC = 0x94
SCRUB_READONLY = 1

# Block group type bits of btrfs_ioctl_space_info.flags (BTRFS_BLOCK_GROUP_* and the global reserve).
_BG_DATA, _BG_SYSTEM, _BG_METADATA = 1 << 0, 1 << 1, 1 << 2
_SPACE_GLOBAL_RSV = 1 << 49


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (_IOC_MAGIC << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (_IOC_MAGIC << 8) | nr


PROGRESS_FIELDS = ("data_extents_scrubbed", "tree_extents_scrubbed", "data_bytes_scrubbed", "tree_bytes_scrubbed",
                   "read_errors", "csum_errors", "verify_errors", "no_csum", "csum_discards", "super_errors",
                   "malloc_errors", "uncorrectable_errors", "corrected_errors", "last_physical",
                   "unverified_errors")


class _Progress(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in PROGRESS_FIELDS]


class _ScrubArgs(ctypes.Structure):
    _fields_ = [("devid", ctypes.c_uint64), ("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("flags", ctypes.c_uint64), ("progress", _Progress),
                ("unused", ctypes.c_uint64 * ((1024 - 32 - ctypes.sizeof(_Progress)) // 8))]


class _FsInfo(ctypes.Structure):
    _fields_ = [("max_id", ctypes.c_uint64), ("num_devices", ctypes.c_uint64), ("fsid", ctypes.c_uint8 * 16),
                ("nodesize", ctypes.c_uint32), ("sectorsize", ctypes.c_uint32), ("clone_alignment", ctypes.c_uint32),
                ("csum_type", ctypes.c_uint16), ("csum_size", ctypes.c_uint16), ("flags", ctypes.c_uint64),
                ("generation", ctypes.c_uint64), ("metadata_uuid", ctypes.c_uint8 * 16),
                ("reserved", ctypes.c_uint8 * 944)]


class _DevInfo(ctypes.Structure):
    _fields_ = [("devid", ctypes.c_uint64), ("uuid", ctypes.c_uint8 * 16), ("bytes_used", ctypes.c_uint64),
                ("total_bytes", ctypes.c_uint64), ("unused", ctypes.c_uint64 * 379), ("path", ctypes.c_uint8 * 1024)]


class _SpaceInfo(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("total_bytes", ctypes.c_uint64), ("used_bytes", ctypes.c_uint64)]


assert ctypes.sizeof(_ScrubArgs) == 1024 and ctypes.sizeof(_FsInfo) == 1024 and ctypes.sizeof(_DevInfo) == 4096

IOC_SCRUB = _iowr(27, ctypes.sizeof(_ScrubArgs))
IOC_SYNC = (_IOC_MAGIC << 8) | 8
IOC_SCRUB_CANCEL = (_IOC_MAGIC << 8) | 28
IOC_SCRUB_PROGRESS = _iowr(29, ctypes.sizeof(_ScrubArgs))
IOC_DEV_INFO = _iowr(30, ctypes.sizeof(_DevInfo))
IOC_FS_INFO = _ior(31, ctypes.sizeof(_FsInfo))
IOC_SPACE_INFO = _iowr(20, 16)


def _fs_info(fd: int) -> _FsInfo:
    info = _FsInfo()
    fcntl.ioctl(fd, IOC_FS_INFO, info, True)
    return info


def fsid(fd: int) -> str:
    """The UUID of the filesystem of ``fd`` (``BTRFS_IOC_FS_INFO``), as ``btrfs filesystem show`` prints it."""
    return str(uuid.UUID(bytes=bytes(_fs_info(fd).fsid)))


def devices(fd: int) -> list[int]:
    """The device ids of the filesystem of ``fd`` (ids may have gaps after a device was removed)."""
    info = _fs_info(fd)
    found = []
    for devid in range(1, info.max_id + 1):
        dev = _DevInfo(devid=devid)
        try:
            fcntl.ioctl(fd, IOC_DEV_INFO, dev, True)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                continue
            raise
        found.append(devid)
    return found


def commit(fd: int) -> None:
    """Write dirty data back and commit the transaction (``BTRFS_IOC_SYNC``): afterwards the scrub sees every
    file's current data, and the space counters (:func:`used_bytes`) count it."""
    fcntl.ioctl(fd, IOC_SYNC)


def used_bytes(fd: int) -> int:
    """Bytes of data, metadata and system blocks in use on the filesystem of ``fd``, counted once (before the
    profile's copies): what a scrub verifies, per copy."""
    head = (ctypes.c_uint64 * 2)(0, 0)
    fcntl.ioctl(fd, IOC_SPACE_INFO, head, True)
    n = head[1]

    class _Args(ctypes.Structure):
        _fields_ = [("space_slots", ctypes.c_uint64), ("total_spaces", ctypes.c_uint64), ("spaces", _SpaceInfo * n)]

    args = _Args(space_slots=n)
    fcntl.ioctl(fd, IOC_SPACE_INFO, args, True)
    return sum(s.used_bytes for s in args.spaces[: args.total_spaces]
               if s.flags & (_BG_DATA | _BG_SYSTEM | _BG_METADATA) and not s.flags & _SPACE_GLOBAL_RSV)


# ---------------------------------------------------------------------------------- where the scrub has been
_IOC_TREE_SEARCH_V2 = _iowr(17, 112)
_SEARCH_KEY = struct.Struct("=7Q4I4Q")            # struct btrfs_ioctl_search_key
_SEARCH_HEADER = struct.Struct("=3Q2I")           # transid, objectid, offset, type, len
_CHUNK = struct.Struct("=4Q3I2H")                 # length, owner, stripe_len, type, io_align/width, sector_size, ...
_STRIPE = struct.Struct("=2Q16x")                 # devid, offset (physical), dev_uuid
_CHUNK_TREE, _FIRST_CHUNK_TREE_OBJECTID, _CHUNK_ITEM_KEY = 3, 256, 228
# Profiles whose stripes are not whole copies (RAID0, RAID10, RAID5, RAID6): no simple logical -> physical map.
_STRIPED = (1 << 3) | (1 << 6) | (1 << 7) | (1 << 8)
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Chunk:
    logical: int
    length: int
    copies: tuple[tuple[int, int], ...]     # (devid, physical start) of each whole copy; () if striped


class ChunkMap:
    """The chunks of a filesystem by logical address, and where the copies of a logical range lie on the devices."""

    def __init__(self, chunks: list[Chunk]):
        self.chunks = sorted(chunks, key=lambda c: c.logical)
        self._starts = [c.logical for c in self.chunks]

    def covered(self, logical: int, length: int, reached: dict[int, int]) -> bool:
        """The ``length`` bytes at ``logical`` lie, in some whole copy, below where that device's scrub reached
        (``reached``: devid -> physical offset; every byte below it verified)."""
        i = bisect.bisect_right(self._starts, logical) - 1
        if i < 0 or logical + length > self._starts[i] + self.chunks[i].length:
            return False
        c = self.chunks[i]
        return any(phys + (logical - c.logical) + length <= reached.get(devid, 0) for devid, phys in c.copies)


def chunk_map(fd: int) -> ChunkMap:
    """Every chunk of the filesystem (``BTRFS_IOC_TREE_SEARCH_V2`` over the chunk tree)."""
    chunks: list[Chunk] = []
    size = 64 << 10
    buf = bytearray(_SEARCH_KEY.size + 8 + size)
    min_offset = 0
    while True:
        _SEARCH_KEY.pack_into(buf, 0, _CHUNK_TREE, _FIRST_CHUNK_TREE_OBJECTID, _FIRST_CHUNK_TREE_OBJECTID,
                              min_offset, _U64, 0, _U64, _CHUNK_ITEM_KEY, _CHUNK_ITEM_KEY, 4096, 0, 0, 0, 0, 0)
        struct.pack_into("=Q", buf, _SEARCH_KEY.size, size)
        fcntl.ioctl(fd, _IOC_TREE_SEARCH_V2, buf, True)
        nr = struct.unpack_from("=I", buf, 64)[0]          # key.nr_items: items found
        if not nr:
            return ChunkMap(chunks)
        pos = _SEARCH_KEY.size + 8
        for _ in range(nr):
            _, _, offset, typ, length = _SEARCH_HEADER.unpack_from(buf, pos)
            pos += _SEARCH_HEADER.size
            if typ == _CHUNK_ITEM_KEY:
                clen, _, _, flags, _, _, _, nstripes, _ = _CHUNK.unpack_from(buf, pos)
                copies = () if flags & _STRIPED else tuple(
                    _STRIPE.unpack_from(buf, pos + _CHUNK.size + i * _STRIPE.size) for i in range(nstripes))
                chunks.append(Chunk(offset, clen, copies))
            pos += length
            min_offset = offset + 1
        if min_offset == 0:     # wrapped past the last possible offset
            return ChunkMap(chunks)


def progress_dict(p: _Progress) -> dict[str, int]:
    return {name: getattr(p, name) for name in PROGRESS_FIELDS}


@dataclass
class DeviceScrub:
    """The outcome of one device's scrub: its counters, whether it reached the end, or why it could not start."""

    devid: int
    start: int
    counters: dict[str, int] = field(default_factory=dict)
    finished: bool = False
    error: OSError | None = None


class KernelScrub:
    """The kernel's scrub of every device of one btrfs filesystem, each in a thread of its own (the ioctl blocks).

    ``resume`` maps a device id to the physical offset a cancelled scrub reached. :meth:`wait` polls until every
    device is done, calling ``poll()`` in between (raise from it — :class:`Stopped` — to cancel them all)."""

    def __init__(self, fd: int, resume: dict[int, int] | None = None, readonly: bool = False):
        self.fd = fd
        self.flags = SCRUB_READONLY if readonly else 0
        self.devs = [DeviceScrub(d, (resume or {}).get(d, 0)) for d in devices(fd)]
        self._threads: list[threading.Thread] = []

    def _one(self, dev: DeviceScrub) -> None:
        # 1024 bytes: fcntl.ioctl runs it without the GIL, on a copy it copies back even when the ioctl fails (a
        # cancelled scrub's counters, last_physical among them, come back too).
        args = _ScrubArgs(devid=dev.devid, start=dev.start, end=(1 << 64) - 1, flags=self.flags)
        try:
            fcntl.ioctl(self.fd, IOC_SCRUB, args, True)
            dev.finished = True
        except OSError as exc:
            if exc.errno != errno.ECANCELED:
                dev.error = exc
        dev.counters = progress_dict(args.progress)

    def start(self) -> None:
        """Start every device's scrub. It verifies what the last committed transaction holds: :func:`commit`
        first, or data only in the fsync log, or still dirty, is passed over."""
        for dev in self.devs:
            t = threading.Thread(target=self._one, args=(dev,), name=f"btrfs-scrub-dev{dev.devid}", daemon=True)
            t.start()
            self._threads.append(t)

    def scrubbed_bytes(self) -> int:
        """Data and metadata bytes verified so far, over every device (``BTRFS_IOC_SCRUB_PROGRESS``)."""
        total = 0
        for dev in self.devs:
            if dev.counters:
                total += dev.counters["data_bytes_scrubbed"] + dev.counters["tree_bytes_scrubbed"]
                continue
            args = _ScrubArgs(devid=dev.devid)
            try:
                fcntl.ioctl(self.fd, IOC_SCRUB_PROGRESS, args, True)
            except OSError:
                continue    # not running (yet, or any more)
            total += args.progress.data_bytes_scrubbed + args.progress.tree_bytes_scrubbed
        return total

    def cancel(self) -> None:
        """Cancel every device's scrub and wait for their threads. A thread may not have entered its ioctl yet
        (the cancel then finds nothing running, ENOTCONN): ask again until every thread has returned."""
        for t in self._threads:
            while t.is_alive():
                try:
                    fcntl.ioctl(self.fd, IOC_SCRUB_CANCEL)
                except OSError as exc:
                    if exc.errno != errno.ENOTCONN:
                        raise
                t.join(0.01)

    def wait(self, poll, interval: float = 0.05) -> None:
        """Until every device's scrub has ended, calling ``poll()`` every ``interval`` s. If it raises (say
        :class:`~duet_core.errors.Stopped`), the scrubs are cancelled — their ``last_physical`` kept, for a
        resume — and the exception goes on."""
        try:
            for t in self._threads:
                while t.is_alive():
                    poll()
                    t.join(interval)
        except BaseException:
            self.cancel()
            raise

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for dev in self.devs:
            for k, v in dev.counters.items():
                if k != "last_physical":
                    out[k] = out.get(k, 0) + v
        return out


def errors(totals: dict[str, int], readonly: bool) -> int:
    """Errors left in the data: those the scrub could not repair (all of them, read-only)."""
    if readonly:
        return sum(totals.get(k, 0) for k in ("read_errors", "csum_errors", "verify_errors", "super_errors"))
    return totals.get("uncorrectable_errors", 0)

