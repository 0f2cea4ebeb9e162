"""The vocabulary shared by the engine, its sources and every task: events, file identity, items."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


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


@dataclass(slots=True)
class Batch:
    """What one ``fetch`` returns.

    ``resync`` is True when the engine lost events in this registration's scope since the last fetch (a kernel
    map or ring was full): the items are then incomplete and a task must re-check residency itself. The engine
    has already re-read the residency of the scope, so EXISTS state items reflect the truth again.
    """

    items: list[Item]
    resync: bool = False
