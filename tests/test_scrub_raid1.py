"""The scrub's kernel pass on a two-device RAID1 btrfs (two loop devices): every device is scrubbed (one thread
each), both mirrors are checked, and a block flipped on one mirror is repaired from the other — which reads of the
files could not promise (a read checks whichever copy it gets)."""

from __future__ import annotations

import os
import shutil
import tempfile

import fsimage
import pytest
from plugin_dist import evict_tree, make_dataset
from test_scrub import data_chunk_stripes, duet, fiemap, sectors_read  # noqa: F401 - fixtures

pytestmark = pytest.mark.bpf

MiB = 1 << 20


@pytest.fixture
def raid1(require_root):
    """A btrfs RAID1 (data and metadata) over two direct-I/O loop devices; unmounted and detached even on failure."""
    workdir = tempfile.mkdtemp(prefix=fsimage.PREFIX, dir=fsimage.BASE_DIR)
    mnt, images, devs = os.path.join(workdir, "mnt"), [], []
    try:
        os.mkdir(mnt)
        for name in ("a.img", "b.img"):
            path = os.path.join(workdir, name)
            with open(path, "wb") as fh:
                fh.truncate(256 * MiB)
            images.append(path)
            devs.append(fsimage.run(["losetup", "--find", "--show", "--direct-io=on", path]).strip())
        fsimage.run(["mkfs.btrfs", "-q", "-f", "-d", "raid1", "-m", "raid1", *devs])
        fsimage.run(["mount", "-t", "btrfs", devs[0], mnt])
        yield mnt, devs, images
    finally:
        fsimage.unmount(mnt)
        for dev in devs:
            fsimage.detach_loop(dev)
        shutil.rmtree(workdir, ignore_errors=True)


def mirrors(mnt: str, dev: str, logical: int) -> list[tuple[int, int]]:
    """(devid, physical offset) of every copy of btrfs logical address ``logical``."""
    for start, length, _profile, stripes in data_chunk_stripes(mnt, dev):
        if start <= logical < start + length:
            return [(devid, off + logical - start) for devid, off in stripes]
    raise AssertionError(f"no data chunk holds {logical}")


def test_a_raid1_filesystem_is_scrubbed_on_both_devices_and_a_bad_mirror_repaired(raid1, duet):
    mnt, devs, images = raid1
    scope, files = make_dataset(mnt, n=8, sizes=(2 * MiB,))
    victim = os.path.join(scope, sorted(files)[3])
    with open(victim, "rb") as fh:
        want = fh.read()
    (_start, logical, _length), *_ = fiemap(victim)
    copies = mirrors(mnt, devs[0], logical + 8192)
    assert len(copies) == 2, copies
    devid, where = copies[0]
    image = images[devid - 1]                        # devids follow mkfs's argument order
    fd = os.open(image, os.O_RDWR)
    try:
        old = os.pread(fd, 1, where)
        os.pwrite(fd, bytes([old[0] ^ 0x10]), where)
        os.fsync(fd)
    finally:
        os.close(fd)
    evict_tree(scope)
    before = [sectors_read(d) for d in devs]
    code, rep, err = duet.scrub(scope)
    read = [sectors_read(d) - b for d, b in zip(devs, before)]
    assert code == 0, err
    assert rep["complete"] and rep["items_done"] == len(files) and rep["counters"]["kernel_scrub"] == 1, rep
    # Both devices were read whole (each holds a copy of everything), and the bad copy was rewritten from the good.
    assert all(r >= sum(files.values()) for r in read), read
    assert rep["kernel_scrub"]["corrected_errors"] >= 1 and rep["counters"]["kernel_corrected_errors"] >= 1
    assert "repaired" in err
    fd = os.open(image, os.O_RDONLY)
    try:
        assert os.pread(fd, 1, where) == old         # the mirror holds the right byte again
    finally:
        os.close(fd)
    evict_tree(scope)
    with open(victim, "rb") as fh:
        assert fh.read() == want
