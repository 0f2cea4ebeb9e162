"""Test helpers around :mod:`duet_core.loopfs`: loop filesystems named for this test process, leak checks, and
a few btrfs and page-cache helpers.

Test images live in /var/tmp directories named ``duet-test-<pid>-*``, so the session check in conftest.py finds
whatever this process leaked without touching other processes' filesystems.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import shutil

from duet_core import loopfs
from duet_core.loopfs import BASE_DIR, LoopFs, current_mounts, detach_loop, run, unmount  # noqa: F401

PREFIX = f"duet-test-{os.getpid()}-"
loop_fs = functools.partial(loopfs.loop_fs, prefix="duet-test-")


def leaked_mounts() -> list[str]:
    """Mount points this process's tests created and did not unmount, deepest first."""
    root = os.path.join(BASE_DIR, PREFIX)
    found = [m.mount_point for m in current_mounts() if m.mount_point.startswith(root)]
    return sorted(found, key=len, reverse=True)


def leaked_loops() -> list[str]:
    """Loop devices still backed by an image this process's tests created."""
    leaked = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        with contextlib.suppress(OSError), open(backing) as f:
            if f.read().strip().startswith(os.path.join(BASE_DIR, PREFIX)):
                leaked.append("/dev/" + backing.split("/")[3])
    return leaked


def clean_leaks() -> list[str]:
    """Unmount and detach everything :func:`leaked_mounts` / :func:`leaked_loops` report; return what was found."""
    mounts, loops = leaked_mounts(), leaked_loops()
    for mnt in mounts:
        unmount(mnt)
    for loopdev in loops:
        detach_loop(loopdev)
    for workdir in glob.glob(os.path.join(BASE_DIR, PREFIX + "*")):
        shutil.rmtree(workdir, ignore_errors=True)
    return mounts + loops


@contextlib.contextmanager
def bind_mount(what: str, where: str):
    """``what`` bind-mounted at ``where`` (made if missing) for the block; unmounted on the way out, also on a
    failure."""
    os.makedirs(where, exist_ok=True)
    run(["mount", "--bind", what, where])
    try:
        yield where
    finally:
        unmount(where)


def drop_file_cache(path: str) -> None:
    """Write back and evict one file's page cache (fsync, then POSIX_FADV_DONTNEED)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def btrfs_subvol(path: str) -> str:
    """Create a btrfs subvolume at ``path``; returns ``path``."""
    run(["btrfs", "-q", "subvolume", "create", path])
    return path


def btrfs_snapshot(src: str, dst: str, readonly: bool = False) -> str:
    """Snapshot the subvolume ``src`` to ``dst``; returns ``dst``."""
    run(["btrfs", "-q", "subvolume", "snapshot", *(["-r"] if readonly else []), src, dst])
    return dst


def btrfs_rootid(path: str) -> int:
    """The subvolume id btrfs-progs reports for ``path`` (``btrfs inspect-internal rootid``)."""
    return int(run(["btrfs", "inspect-internal", "rootid", path]))
