"""Real filesystems on loop devices: a sparse image, mkfs, losetup, mount — and always the way back.

Used by ``duet demo``, the benchmarks and the tests. Everything lives under /var/tmp (a disk filesystem: on tmpfs a
loop image would not behave like a disk) in directories named ``<prefix><pid>-*``, so a leak check can find what
one process left behind without touching anyone else's. External commands get argument lists, never a shell.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from duet_core.errors import DuetError
from duet_core.identity import Mount, parse_mountinfo

BASE_DIR = "/var/tmp"
XFS_MIN_MB = 300  # mkfs.xfs refuses smaller filesystems

_MKFS = {
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "ext4": ["mkfs.ext4", "-q", "-F", "-b", "4096"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
}


@dataclass(frozen=True)
class LoopFs:
    """A mounted loop filesystem: mount point, loop device and backing image."""

    fstype: str
    mnt: str
    loopdev: str
    image: str


def run(argv: Sequence[str]) -> str:
    """Run a command (argument list, no shell); return stdout, raise with its stderr on failure."""
    try:
        proc = subprocess.run(list(argv), check=False, capture_output=True, text=True)
    except FileNotFoundError:
        raise DuetError(f"failed to run {argv[0]}: not installed") from None
    if proc.returncode != 0:
        raise DuetError(f"failed to run {' '.join(argv)} (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def current_mounts() -> list[Mount]:
    """The mount table of this process, read afresh."""
    with open("/proc/self/mountinfo", "rb") as f:
        return list(parse_mountinfo(f.read()).values())


def is_mounted(path: str) -> bool:
    """Whether ``path`` is a mount point in this mount namespace."""
    path = os.path.realpath(path)
    return any(m.mount_point == path for m in current_mounts())


def unmount(path: str, attempts: int = 5) -> None:
    """Unmount ``path``, retrying while it is busy, and detach it lazily as a last resort."""
    for attempt in range(attempts):
        if not is_mounted(path):
            return
        if subprocess.run(["umount", path], check=False, capture_output=True).returncode == 0:
            return
        time.sleep(0.1 * (attempt + 1))
    if is_mounted(path):
        subprocess.run(["umount", "-l", path], check=False, capture_output=True)


def detach_loop(loopdev: str) -> None:
    """Detach a loop device (deferred by the kernel until a lazily unmounted filesystem lets go of it)."""
    subprocess.run(["losetup", "-d", loopdev], check=False, capture_output=True)


@contextlib.contextmanager
def loop_fs(
    fstype: str,
    size_mb: int = 256,
    direct_io: bool = False,
    mount_opts: str | None = None,
    prefix: str = "duet-",
    mkfs_args: Sequence[str] = (),
) -> Iterator[LoopFs]:
    """Make, attach and mount a fresh ``fstype`` filesystem on a sparse image; always tear it all down.

    ``direct_io`` attaches the loop device with ``--direct-io=on`` so its reads are not cached a second time in the
    host filesystem (needed for honest I/O accounting). ``mkfs_args`` go to mkfs before the image (e.g. ext4's
    ``-N`` for a million inodes). xfs images are at least 300 MiB, the mkfs minimum.
    """
    if fstype not in _MKFS:
        raise ValueError(f"unsupported fstype {fstype!r} (choose from {', '.join(_MKFS)})")
    if fstype == "xfs":
        size_mb = max(size_mb, XFS_MIN_MB)
    workdir = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=BASE_DIR)
    image = os.path.join(workdir, f"{fstype}.img")
    mnt = os.path.join(workdir, "mnt")
    loopdev = None
    try:
        os.mkdir(mnt)
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        run([*_MKFS[fstype], *mkfs_args, image])
        losetup = ["losetup", "--find", "--show"]
        if direct_io:
            losetup.append("--direct-io=on")
        loopdev = run([*losetup, image]).strip()
        mount = ["mount", "-t", fstype]
        if mount_opts:
            mount += ["-o", mount_opts]
        run([*mount, loopdev, mnt])
        yield LoopFs(fstype, mnt, loopdev, image)
    finally:
        unmount(mnt)
        if loopdev:
            detach_loop(loopdev)
        shutil.rmtree(workdir, ignore_errors=True)


