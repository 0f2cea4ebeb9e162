"""What the scrub remembers per file, in its own store (``ctx.state``): when the file was last verified and, off
btrfs, the content hashes of the version it verified.

A record is keyed by the file's identity (device, subvolume, inode), so it holds across scopes and renames::

    {"v": [size, mtime_ns, ctime_ns], "at": <round start, epoch s>, "b3": <blake3 hex of the file> | null,
     "chunks": "<CHUNK_DIGEST hex chars per CHUNK bytes, concatenated>" | null, "bad": <found corrupt>}

The per-chunk digests are what turns "this file changed" into "bytes 262144–524288 changed": a 1 GiB file costs
128 KiB of hex. ``at`` is the start of the round that verified the file, a lower bound on when its bytes were last
read from the device, which is what a scrub period is measured against. A file found corrupt keeps its last good
hashes (off btrfs) and is marked ``bad``: it is checked again in every round until it reads back as recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import blake3

from duet_core.tasks import FileInfo

CHUNK = 256 << 10        # bytes per chunk digest
CHUNK_DIGEST = 32        # hex characters kept per chunk (128 bits)


def key(f: FileInfo) -> str:
    return "file:{}:{}:{}".format(*f.fid)


def version(f: FileInfo) -> list[int]:
    return [f.size, f.mtime_ns, f.ctime_ns]


@dataclass
class Record:
    v: list[int]
    at: float
    b3: str | None = None
    chunks: str | None = None
    bad: bool = False

    @classmethod
    def load(cls, raw: dict | None) -> "Record | None":
        return cls(raw["v"], raw["at"], raw.get("b3"), raw.get("chunks"), raw.get("bad", False)) if raw else None

    def dump(self) -> dict:
        return {"v": self.v, "at": self.at, "b3": self.b3, "chunks": self.chunks, "bad": self.bad}


class Hasher:
    """blake3 of the whole file, and of each CHUNK, fed with the file's bytes in order."""

    def __init__(self):
        self.whole = blake3.blake3()
        self._chunk = blake3.blake3()
        self._in_chunk = 0
        self._digests: list[str] = []

    def update(self, data: bytes) -> None:
        self.whole.update(data)
        view = memoryview(data)
        while view:
            take = min(len(view), CHUNK - self._in_chunk)
            self._chunk.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == CHUNK:
                self._close_chunk()

    def _close_chunk(self) -> None:
        self._digests.append(self._chunk.hexdigest()[:CHUNK_DIGEST])
        self._chunk, self._in_chunk = blake3.blake3(), 0

    def finish(self) -> tuple[str, str]:
        """(whole-file hex digest, concatenated chunk digests)."""
        if self._in_chunk:
            self._close_chunk()
        return self.whole.hexdigest(), "".join(self._digests)


def differing_ranges(old: str, new: str, size: int) -> Iterator[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of the chunks whose digests differ (adjacent chunks merged)."""
    run_start = None
    n = max(len(old), len(new)) // CHUNK_DIGEST
    for i in range(n + 1):
        a, b = old[i * CHUNK_DIGEST:(i + 1) * CHUNK_DIGEST], new[i * CHUNK_DIGEST:(i + 1) * CHUNK_DIGEST]
        differs = i < n and a != b
        if differs and run_start is None:
            run_start = i
        elif not differs and run_start is not None:
            yield run_start * CHUNK, min(size, i * CHUNK)
            run_start = None
