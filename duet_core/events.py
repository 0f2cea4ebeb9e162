"""The vocabulary shared by the engine, its sources and every task: events, file identity, items."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:   # numpy is imported where it is used: the CLI's light commands never load it
    import numpy as np


class Event(enum.IntFlag):
    """Page-cache events and state views, numbered as in the original Duet patch.

    ADDED, REMOVED, DIRTIED and FLUSHED are *events*: a registration asking for them gets every page that saw
    the event since its last fetch. EXISTS and MODIFIED are *states*: a registration asking for them gets the
    pages whose state changed since its last fetch, with the bit set if the state now holds and clear if it no
    longer does; a change that was undone before the fetch (added then removed) cancels out and is not reported.
    """

    ADDED = 0x01
    REMOVED = 0x02
    DIRTIED = 0x04
    FLUSHED = 0x08
    EXISTS = 0x10
    MODIFIED = 0x20

    @classmethod
    def parse(cls, text: str) -> "Event":
        """``"added,removed"`` or ``"exists|modified"`` → flags; raises ValueError naming a bad word."""
        mask = cls(0)
        for word in text.replace("|", ",").split(","):
            word = word.strip().upper()
            if not word:
                continue
            if word not in cls.__members__:
                names = ", ".join(n.lower() for n in cls.__members__)
                raise ValueError(f"unknown event {word.lower()!r} (choose from {names})")
            mask |= cls[word]
        return mask


EVENTS = Event.ADDED | Event.REMOVED | Event.DIRTIED | Event.FLUSHED
STATES = Event.EXISTS | Event.MODIFIED
PAGE_SIZE = 4096


class FileId(NamedTuple):
    """A file as the kernel sees it: superblock device (kernel encoding MAJOR<<20|MINOR), subvolume, inode.

    ``subvol`` is the btrfs subvolume (tree) id and 0 on every other filesystem. ``dev`` is the superblock's
    device, which on btrfs is the anonymous device in /proc/self/mountinfo, not ``stat().st_dev``.
    """

    dev: int
    subvol: int
    ino: int

    def __str__(self) -> str:
        return f"{self.dev >> 20}:{self.dev & 0xFFFFF}/{self.subvol}/{self.ino}"


@dataclass(frozen=True, slots=True)
class Item:
    """A run of ``count`` pages of one file starting at page ``index``, all with the same ``flags``.

    For event registrations ``flags`` holds the events the pages saw; for state registrations it holds the
    pages' current state (EXISTS / MODIFIED), and a clear bit means that state ended.
    """

    fid: FileId
    index: int
    count: int
    flags: Event


_FLAGS = [Event(i) for i in range(64)]   # Event(int) costs more than building the rest of an item


@dataclass(slots=True)
class Batch:
    """What one ``fetch`` returns: runs of pages as parallel arrays, and :attr:`items` built from them on first use.

    Run ``i`` covers pages ``index[i]`` to ``index[i] + count[i] - 1`` of ``fids[file[i]]`` with ``flags[i]``.
    Consumers that only count (``duet events``, benchmarks) use :meth:`pages` and never pay for Item objects —
    random reads make one run per page.

    ``resync`` is True when the engine lost events in this registration's scope since the last fetch (a kernel
    map or ring was full): the items are then incomplete and a task must re-check residency itself. The engine
    has already re-read the residency of the scope, so EXISTS state items reflect the truth again.
    """

    fids: list[FileId]
    file: np.ndarray
    index: np.ndarray
    count: np.ndarray
    flags: np.ndarray
    resync: bool = False
    _items: list[Item] | None = None

    @classmethod
    def empty(cls, resync: bool = False) -> "Batch":
        import numpy as np  # lazily: `duet status` and `duet --help` import this module and never need numpy

        z = np.empty(0, np.int64)
        return cls([], z, z, z, z, resync)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def items(self) -> list[Item]:
        if self._items is None:
            fids = self.fids
            self._items = [Item(fids[f], i, c, _FLAGS[fl]) for f, i, c, fl in
                           zip(self.file.tolist(), self.index.tolist(), self.count.tolist(), self.flags.tolist())]
        return self._items

    def pages(self, flag: Event) -> dict[FileId, int]:
        """Pages per file whose run has ``flag`` set."""
        import numpy as np

        sel = (self.flags & int(flag)) != 0
        if not sel.any():
            return {}
        sums = np.bincount(self.file[sel], weights=self.count[sel], minlength=len(self.fids))
        return {self.fids[i]: int(n) for i, n in enumerate(sums.tolist()) if n}
