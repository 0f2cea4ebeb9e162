"""``duet verify``: read a snapshot back and check every regular file against the blake3 its manifest recorded.

What ``restic check --read-data`` and ``borg check --verify-data`` do for their repositories: bit rot on the backup
disk, a file changed in a snapshot by hand, a file, directory or symlink missing, or one that no backup put there.
A btrfs target refuses a damaged block with EIO (its own checksum), which is reported as unreadable; on other
filesystems only the manifest's hash can tell.

- Each file is opened beneath the snapshot without following a symlink, and only if it is a regular file.
- An inode is hashed once however many names and snapshots share it (hard-link snapshots on ext4 share every
  unchanged file with the snapshot before).
- Cache hygiene, as in a run: the pages the check itself reads into the page cache are dropped after each file; pages
  that were cached before stay.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pyroaring import BitMap

from duet_backup.tree import join
from duet_core import residency
from duet_core.identity import open_beneath
from duet_core.scope import open_regular

CHUNK = 1 << 20
AHEAD_FILES = 64        # files opened and read ahead before their turn ...
AHEAD_BYTES = 32 << 20  # ... and at most this much of them (one file always)


@dataclass
class Checked:
    """One snapshot's check: the manifest's ``files`` looked at, the ``bytes`` read back, and ``problems``: a path
    inside the snapshot -> what is wrong with it."""

    name: str
    files: int = 0
    bytes: int = 0
    problems: dict[str, str] = field(default_factory=dict)


class _Opened:
    """A file of the manifest, opened ahead of its turn: its descriptor (or why it could not be opened), its stat,
    and — if it is to be hashed — its pages that were cached before the check read it ahead."""

    def __init__(self, snap: int, rel: str):
        self.rel, self.fd, self.error = rel, -1, None
        self.ahead = 0      # bytes asked to be read ahead
        self.before = BitMap()
        try:
            self.fd = open_regular(snap, rel)
            self.st = os.fstat(self.fd)
        except OSError as exc:
            self.close()
            self.error = exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _ahead(snap: int, rels: list[str], hashed: dict) -> Iterator[_Opened]:
    """The files in turn, each opened (and its read-ahead asked for) up to AHEAD_FILES / AHEAD_BYTES before its turn,
    so the device reads the next files while this one is hashed — small files above all."""
    window: deque[_Opened] = deque()
    nbytes, nxt = 0, 0
    try:
        while nxt < len(rels) or window:
            while nxt < len(rels) and len(window) < AHEAD_FILES and (not window or nbytes < AHEAD_BYTES):
                o = _Opened(snap, rels[nxt])
                nxt += 1
                window.append(o)
                if o.fd < 0 or (o.st.st_dev, o.st.st_ino) in hashed:
                    continue          # not to be read: its inode was hashed under another name
                try:
                    o.before = residency.resident_pages(o.fd, o.st.st_size)
                except OSError as exc:
                    o.close()
                    o.error = exc
                    continue
                if not o.before:
                    os.posix_fadvise(o.fd, 0, 0, os.POSIX_FADV_WILLNEED)
                    o.ahead = o.st.st_size
                    nbytes += o.ahead
            o = window.popleft()
            nbytes -= o.ahead
            try:
                yield o
            finally:
                o.close()
    finally:
        for o in window:
            o.close()


def _digest(o: _Opened, view: memoryview, progress: Callable[[int], None]) -> str:
    """The blake3 of the file, read in chunks into ``view``; the pages read for it are evicted after (those cached
    before stay)."""
    import blake3

    size, fd = o.st.st_size, o.fd
    h = blake3.blake3()
    off = 0
    try:
        while off < size:
            n = os.preadv(fd, [view[:min(CHUNK, size - off)]], off)
            if n <= 0:
                break
            h.update(view[:n])
            off += n
            progress(n)
    finally:
        if not o.before:
            residency.evict(fd)
        else:
            residency.evict_runs(fd, residency.runs_of(residency.resident_pages(fd, size) - o.before))
    return h.hexdigest()


def _tree(snap: int) -> dict[str, bool]:
    """Every entry of the snapshot tree (no symlink followed), as a path inside it -> whether it is a regular file."""
    found: dict[str, bool] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            dir_fd = open_beneath(snap, rel or ".", os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue          # gone meanwhile: its entries are reported missing
        try:
            with os.scandir(dir_fd) as it:
                for e in it:
                    path = join(rel, e.name)
                    found[path] = e.is_file(follow_symlinks=False)
                    if e.is_dir(follow_symlinks=False):
                        stack.append(path)
        finally:
            os.close(dir_fd)
    return found


def check_snapshot(name: str, snap: int, manifest: dict, hashed: dict[tuple[int, int], tuple[int, str]],
                   progress: Callable[[int], None]) -> Checked:
    """Check the snapshot open at ``snap`` against its ``manifest``. ``hashed`` carries (size, blake3) per inode
    (st_dev, st_ino) from one snapshot to the next."""
    out = Checked(name)
    files: dict[str, list] = manifest.get("files", {})
    view = memoryview(bytearray(CHUNK))     # one buffer for every file
    for o in _ahead(snap, sorted(files), hashed):
        rel, record = o.rel, files[o.rel]
        out.files += 1
        size, want = record[1], record[4] if len(record) > 4 else None
        if o.error is not None:
            exc = o.error
            out.problems[rel] = ("missing" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else
                                 "not a regular file" if exc.errno == errno.EINVAL else
                                 f"cannot open: {exc.strerror or exc}")
            continue
        key = (o.st.st_dev, o.st.st_ino)
        try:
            if key not in hashed:
                hashed[key] = (o.st.st_size, _digest(o, view, progress))
        except OSError as exc:
            out.problems[rel] = f"unreadable: {exc.strerror or exc}"
            continue
        have_size, have = hashed[key]
        out.bytes += have_size
        if have_size != size:
            out.problems[rel] = f"size {have_size}, the backup recorded {size}"
        elif want is not None and have != want:
            out.problems[rel] = "content differs from what the backup recorded (blake3)"
    # Directories, symlinks and special files: there (the manifest records no more of them than their version), and
    # nothing the backup did not put there.
    entries: dict[str, list] = manifest.get("entries", {})
    found = _tree(snap)
    for rel in entries:
        if rel and rel not in found:
            out.problems[rel] = "missing"
        elif rel and found[rel]:
            out.problems[rel] = "a regular file where the backup put a directory, symlink or special file"
    for rel in found:
        if rel not in files and rel not in entries:
            out.problems[rel] = "not put there by the backup (not in the manifest)"
    return out
