"""``duet verify``: read a snapshot back and check every regular file against the blake3 its manifest recorded.

What ``restic check --read-data`` and ``borg check --verify-data`` do for their repositories: bit rot on the backup
disk, a file changed in a snapshot by hand, a file missing or one that no backup put there. A btrfs target refuses
a damaged block with EIO (its own checksum), which is reported as unreadable; on other filesystems only the
manifest's hash can tell.

- Each file is opened beneath the snapshot without following a symlink, and only if it is a regular file.
- An inode is hashed once however many names and snapshots share it (hard-link snapshots on ext4 share every
  unchanged file with the snapshot before).
- Cache hygiene, as in a run: the pages the check itself reads into the page cache are dropped after each file; pages
  that were cached before stay.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from duet_backup.tree import join
from duet_core import residency
from duet_core.identity import open_beneath
from duet_core.scope import open_regular

CHUNK = 1 << 20


@dataclass
class Checked:
    """One snapshot's check: the manifest's ``files`` looked at, the ``bytes`` read back, and ``problems``: a path
    inside the snapshot -> what is wrong with it."""

    name: str
    files: int = 0
    bytes: int = 0
    problems: dict[str, str] = field(default_factory=dict)


def _digest(fd: int, size: int, progress: Callable[[int], None]) -> str:
    """The blake3 of the file's first ``size`` bytes, read in chunks; the pages read for it are evicted after."""
    import blake3

    before = residency.resident_pages(fd, size)
    h = blake3.blake3()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
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
        if not before:
            residency.evict(fd)
        else:
            for first, count in residency.runs_of(residency.resident_pages(fd, size) - before):
                residency.evict(fd, first * residency.PAGE_SIZE, count * residency.PAGE_SIZE)
    return h.hexdigest()


def _regular_files(snap: int) -> Iterator[str]:
    """Every regular file of the snapshot tree (no symlink followed), as a path inside it."""
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            dir_fd = open_beneath(snap, rel or ".", os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue          # a directory missing is seen through its files, which the manifest lists
        try:
            with os.scandir(dir_fd) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(join(rel, e.name))
                    elif e.is_file(follow_symlinks=False):
                        yield join(rel, e.name)
        finally:
            os.close(dir_fd)


def check_snapshot(name: str, snap: int, manifest: dict, hashed: dict[tuple[int, int], tuple[int, str]],
                   progress: Callable[[int], None]) -> Checked:
    """Check the snapshot open at ``snap`` against its ``manifest``. ``hashed`` carries (size, blake3) per inode
    (st_dev, st_ino) from one snapshot to the next."""
    out = Checked(name)
    files: dict[str, list] = manifest.get("files", {})
    for rel, record in files.items():
        out.files += 1
        size, want = record[1], record[4] if len(record) > 4 else None
        try:
            fd = open_regular(snap, rel)
        except OSError as exc:
            out.problems[rel] = ("missing" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else
                                 "not a regular file" if exc.errno == errno.EINVAL else
                                 f"cannot open: {exc.strerror or exc}")
            continue
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key not in hashed:
                hashed[key] = (st.st_size, _digest(fd, st.st_size, progress))
            have_size, have = hashed[key]
        except OSError as exc:
            out.problems[rel] = f"unreadable: {exc.strerror or exc}"
            continue
        finally:
            os.close(fd)
        out.bytes += have_size
        if have_size != size:
            out.problems[rel] = f"size {have_size}, the backup recorded {size}"
        elif want is not None and have != want:
            out.problems[rel] = "content differs from what the backup recorded (blake3)"
    for rel in _regular_files(snap):
        if rel not in files:
            out.problems[rel] = "not put there by the backup (not in the manifest)"
    return out
