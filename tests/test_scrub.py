"""The scrub task end to end: ``duet run scrub`` as a process over real btrfs and ext4 loop images.

Corruption is made the way it happens: bits flipped in the image file under a file's data, behind the filesystem's
back. Where to flip is found from the mounted file: FIEMAP gives the extent's address, which on ext4 is the byte
offset on the device and on btrfs a *logical* address, mapped to the device through the chunk tree (a single-device
image with the ``single`` data profile has exactly one stripe per data chunk). The file's pages are then evicted, so
the flip is not masked by the page cache.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import threading
import time

import fsimage
import plugin_dist
import pytest
from plugin_dist import evict, evict_tree, make_dataset

pytestmark = pytest.mark.bpf

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 1
MiB = 1 << 20


# -- finding and flipping a file's bytes on the device ----------------------------------------------------------------
def fiemap(path: str, max_extents: int = 256) -> list[tuple[int, int, int]]:
    """(file offset, address, length) of each extent, as the kernel's FIEMAP reports them (after a sync)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(struct.pack("=QQLLLL", 0, 2**64 - 1, FIEMAP_FLAG_SYNC, 0, max_extents, 0)
                        + bytes(56 * max_extents))
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        count = struct.unpack_from("=L", buf, 20)[0]
        return [struct.unpack_from("=QQQ", buf, 32 + 56 * i) for i in range(count)]
    finally:
        os.close(fd)


def data_chunk_stripes(mnt: str, dev: str) -> list[tuple[int, int, str, list[tuple[int, int]]]]:
    """(logical start, length, profile, [(devid, device offset)] of each stripe) of each data chunk, from the chunk
    tree read from ``dev`` (one of the filesystem's devices).

    The transaction is committed first, so the chunk tree on the device knows every chunk the data sits in.
    """
    fsimage.run(["btrfs", "filesystem", "sync", mnt])
    text = fsimage.run(["btrfs", "inspect-internal", "dump-tree", "-t", "chunk", dev])
    chunks = []
    for m in re.finditer(r"CHUNK_ITEM (\d+)\)[^\n]*\n\s+length (\d+) [^\n]*type (\S+)(.*?)(?=\titem |\Z)", text,
                         re.S):
        if m[3].startswith("DATA"):
            stripes = [(int(d), int(off)) for d, off in re.findall(r"stripe \d+ devid (\d+) offset (\d+)", m[4])]
            chunks.append((int(m[1]), int(m[2]), m[3], stripes))
    return chunks


def btrfs_data_chunks(fs: fsimage.LoopFs) -> list[tuple[int, int, int]]:
    """(logical start, length, device offset) of each data chunk of a single-device, single-profile image."""
    chunks = []
    for logical, length, profile, stripes in data_chunk_stripes(fs.mnt, fs.loopdev):
        assert profile == "DATA|single", f"expected the single data profile, got {profile}"
        assert len(stripes) == 1, stripes
        chunks.append((logical, length, stripes[0][1]))
    return chunks


def device_offset(fs: fsimage.LoopFs, path: str, file_offset: int) -> int:
    """Where byte ``file_offset`` of ``path`` lives in the filesystem image."""
    for start, addr, length in fiemap(path):
        if start <= file_offset < start + length:
            addr += file_offset - start
            break
    else:
        raise AssertionError(f"{path}: no extent holds byte {file_offset}")
    if fs.fstype != "btrfs":
        return addr
    for logical, length, dev_offset in btrfs_data_chunks(fs):
        if logical <= addr < logical + length:
            return dev_offset + addr - logical
    raise AssertionError(f"no data chunk holds btrfs logical address {addr}")


def flip_bit(fs: fsimage.LoopFs, path: str, file_offset: int) -> None:
    """Flip one bit of byte ``file_offset`` of ``path`` in the image, then evict the file's cached pages."""
    evict(path)                       # written back (and allocated) first
    where = device_offset(fs, path, file_offset)
    fd = os.open(fs.image, os.O_RDWR | os.O_CLOEXEC)
    try:
        old = os.pread(fd, 1, where)
        os.pwrite(fd, bytes([old[0] ^ 0x04]), where)
        os.fsync(fd)                  # a direct-I/O loop device reads the disk, not the image's page cache
    finally:
        os.close(fd)
    evict(path)
    with open(path, "rb") as fh:      # the flip is real: the filesystem now sees other bytes (or refuses them)
        fh.seek(file_offset)
        try:
            assert fh.read(1) != old
        except OSError:
            pass
    evict(path)


# -- running duet ------------------------------------------------------------------------------------------------------
class Duet(plugin_dist.CliRunner):
    def scrub(self, scope: str, *args: str) -> tuple[int, dict, str]:
        proc = subprocess.run(self.argv("run", "scrub", "--path", scope, "--json", *args), capture_output=True,
                              text=True, timeout=120, env=self.env)
        assert "Traceback" not in proc.stderr, proc.stderr
        report = json.loads(proc.stdout)["tasks"]["scrub"] if proc.stdout.strip() else {}
        return proc.returncode, report, proc.stderr


@pytest.fixture
def duet(tmp_path, bpf_required):
    return Duet(tmp_path)


@pytest.fixture
def btrfs_direct(require_root):
    with fsimage.loop_fs("btrfs", direct_io=True) as fs:
        yield fs


@pytest.fixture
def ext4_direct(require_root):
    with fsimage.loop_fs("ext4", direct_io=True) as fs:
        yield fs


def sectors_read(loopdev: str) -> int:
    with open(f"/sys/block/{os.path.basename(loopdev)}/stat") as fh:
        return int(fh.read().split()[2]) * 512


def corrupt_map(report: dict) -> dict[str, list[list[int]]]:
    return {c["path"]: c["ranges"] for c in report["corrupt"]}


def covers(ranges: list[list[int]], offset: int) -> bool:
    return any(s <= offset < e for s, e in ranges)


FLIPS = {"b/f01": [5000], "a/f02": [100, 3 * MiB + 17]}   # relpath -> byte offsets flipped


def corrupt_and_check(fs, duet: Duet, scope: str, files: dict[str, int], first_run_clean: bool) -> dict:
    if first_run_clean:
        code, report, err = duet.scrub(scope)
        assert code == 0 and report["corrupt"] == [], err
    for rel, offsets in FLIPS.items():
        for off in offsets:
            flip_bit(fs, os.path.join(scope, rel), off)
    code, report, err = duet.scrub(scope, "--every", "0")
    assert code == 6, err
    found = corrupt_map(report)
    assert set(found) == {os.path.join(scope, rel) for rel in FLIPS}, found
    for rel, offsets in FLIPS.items():
        ranges = found[os.path.join(scope, rel)]
        assert len(ranges) == len(offsets), ranges
        for off in offsets:
            assert covers(ranges, off), (rel, off, ranges)
        assert all(e - s <= 256 << 10 for s, e in ranges), ranges    # a block or a chunk, not the whole file
    assert report["items_damaged"] == len(FLIPS) and report["items_done"] == len(files)
    for rel in FLIPS:
        assert f"{rel}: CORRUPT" in err
    # A corrupt file is checked again by every round, whatever the period; the others are not.
    code, again, err = duet.scrub(scope)
    assert code == 6 and set(corrupt_map(again)) == set(found) and again["items_total"] == len(FLIPS), err
    return report


def test_flipped_bits_on_btrfs_are_reported_with_their_blocks(btrfs_direct, duet):
    scope, files = make_dataset(btrfs_direct.mnt, n=6, sizes=(1 * MiB, 64 << 10, 4 * MiB))
    report = corrupt_and_check(btrfs_direct, duet, scope, files, first_run_clean=False)
    for ranges in corrupt_map(report).values():
        assert all(e - s == 4096 and s % 4096 == 0 for s, e in ranges)      # the bad checksum block exactly
    # btrfs's own scrub agrees that the data is damaged.
    proc = subprocess.run(["btrfs", "scrub", "start", "-B", "-R", btrfs_direct.mnt], capture_output=True, text=True)
    assert int(re.search(r"csum_errors: (\d+)", proc.stdout)[1]) == 3, proc.stdout


def test_flipped_bits_on_ext4_are_reported_with_their_chunks(ext4_direct, duet):
    scope, files = make_dataset(ext4_direct.mnt, n=6, sizes=(1 * MiB, 64 << 10, 4 * MiB))
    code, _report, err = duet.scrub(scope)            # the manifest's first versions
    assert code == 0, err
    with open(os.path.join(scope, "b/f03"), "r+b") as fh:
        fh.write(b"new content")                      # a legitimate change: a new version, not corruption
    report = corrupt_and_check(ext4_direct, duet, scope, files, first_run_clean=False)
    assert os.path.join(scope, "b/f03") not in corrupt_map(report)
    # The hash of each file is shared with the other tasks, per file version.
    from duet_core.state import StateStore
    store = StateStore(duet.env["DUET_STATE_DIR"])
    try:
        assert store.db.execute("SELECT count(*) FROM shared WHERE name='blake3'").fetchone()[0] == len(files)
    finally:
        store.close()


def test_period_skips_recently_verified_files(btrfs_direct, duet):
    scope, files = make_dataset(btrfs_direct.mnt, n=4, sizes=(256 << 10,))
    code, first, err = duet.scrub(scope)
    # The scope is the whole filesystem, cold: the kernel's scrub verifies it (its metadata too).
    assert code == 0 and first["items_done"] == 4 and first["bytes_processed"] == sum(files.values()), err
    assert first["bytes_from_device"] >= sum(files.values()), first
    code, again, err = duet.scrub(scope)                       # default period: 30 days
    assert code == 0 and again["items_total"] == 0 and again["bytes_from_device"] == 0, err
    duet.config.write_text('[task.scrub]\nevery = "0s"\n')      # the period from the config
    code, forced, err = duet.scrub(scope)
    assert code == 0 and forced["items_done"] == 4 and forced["bytes_processed"] == sum(files.values()), err


def test_bad_period_is_one_line(btrfs_direct, duet):
    proc = subprocess.run(duet.argv("run", "scrub", "--path", btrfs_direct.mnt, "--every", "soon"),
                          capture_output=True, text=True, env=duet.env, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("duet: error:")], proc.stderr


def test_foreground_reads_during_the_scrub_are_not_read_again(btrfs_direct, duet):
    """Half the data set is read by a foreground program during the run: the scrub reads only the other half, and
    the device (a direct-I/O loop device, so its counters are honest) delivers each byte once. One of the files the
    program reads has a bad block: its failed read added pages to the cache too, and they must not count."""
    scope = os.path.join(btrfs_direct.mnt, "data")
    os.mkdir(scope)
    files = {}
    for i in range(16):                      # one directory: scanned, and so scrubbed, in creation order on btrfs
        with open(os.path.join(scope, f"f{i:02d}"), "wb") as fh:
            fh.write(os.urandom(2 * MiB))
        files[f"f{i:02d}"] = 2 * MiB
    dataset = sum(files.values())
    late = sorted(files)[8:]                 # the scrub comes to these last
    bad_offset = 2 * MiB - 100
    flip_bit(btrfs_direct, os.path.join(scope, "f15"), bad_offset)
    evict_tree(scope)
    late_bytes = sum(files[r] for r in late)
    before = sectors_read(btrfs_direct.loopdev)
    proc = subprocess.Popen(duet.argv("run", "scrub", "--path", scope, "--json", "--rate-limit", "4MB/s"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=duet.env)
    try:
        deadline = time.monotonic() + 60     # the scrub has read its first file: the engine watches the scope
        while sectors_read(btrfs_direct.loopdev) - before < 2 * MiB and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        failed = []
        for rel in reversed(late):           # away from the scrub, each file in one read: a file half read
            try:                             # when the scrub looks is cached, so it would be taken next
                with open(os.path.join(scope, rel), "rb") as fh:
                    fh.read()
            except OSError:
                failed.append(rel)
        assert failed == ["f15"]
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 6, err
    report = json.loads(out)["tasks"]["scrub"]
    assert report["complete"] and report["items_done"] == len(files)
    found = corrupt_map(report)
    assert list(found) == [os.path.join(scope, "f15")] and covers(found[os.path.join(scope, "f15")], bad_offset)
    assert report["counters"]["pages_observed"] * 4096 >= 0.85 * late_bytes, report
    assert report["bytes_from_device"] <= dataset - 0.85 * late_bytes, report
    assert report["verified_from_cache_bytes"] >= 0.85 * late_bytes
    device = sectors_read(btrfs_direct.loopdev) - before
    assert device <= 1.1 * dataset, (device, dataset)            # nothing read twice
    evict_tree(scope)


@pytest.mark.parametrize("fstype", ["btrfs", "ext4"])
def test_files_written_during_the_scrub_are_not_corrupt(fstype, require_root, duet):
    with fsimage.loop_fs(fstype, direct_io=True) as fs:
        scope, files = make_dataset(fs.mnt, n=6, sizes=(2 * MiB,))
        code, _report, err = duet.scrub(scope)          # ext4: the manifest's first versions
        assert code == 0, err
        stop = threading.Event()
        written = [0]

        def writer():
            path = os.path.join(scope, "a/f02")
            while not stop.is_set():
                with open(path, "r+b") as fh:
                    for off in range(0, 2 * MiB, 64 << 10):
                        fh.seek(off)
                        fh.write(os.urandom(4096))
                        written[0] += 1
                    fh.flush()
                    os.fsync(fh.fileno()) if written[0] % 64 == 0 else None
                time.sleep(0.005)

        t = threading.Thread(target=writer)
        t.start()
        try:
            code, report, err = duet.scrub(scope, "--every", "0", "--rate-limit", "8MB/s")
        finally:
            stop.set()
            t.join()
        assert written[0] > 100
        assert code == 0, err
        assert report["corrupt"] == [] and report["items_damaged"] == 0


def test_watch_counts_foreground_reads_and_reads_nothing(btrfs_direct, duet):
    """``duet watch scrub`` reads nothing itself: a file a program read whole while it watched is verified, and the
    run that follows reads only the rest from the device."""
    scope, files = make_dataset(btrfs_direct.mnt, n=4, sizes=(1 * MiB,))
    watched = sorted(files)[0]
    before = sectors_read(btrfs_direct.loopdev)
    proc = subprocess.Popen(duet.argv("watch", "scrub", "--path", scope), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=duet.env)
    try:
        while "task(s) over" not in (line := proc.stderr.readline()):   # the engine watches the scope
            assert line, "duet watch ended early"
        with open(os.path.join(scope, watched), "rb") as fh:
            assert len(fh.read()) == MiB
        time.sleep(1.5)                      # the engine drains every 100 ms; watch looks every 0.5 s
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 5, err
    assert sectors_read(btrfs_direct.loopdev) - before <= 1.1 * MiB     # the foreground read, nothing more
    evict_tree(scope)
    code, report, err = duet.scrub(scope)
    assert code == 0, err
    assert report["complete"] and report["bytes_from_device"] == sum(files.values()) - MiB, (report, err)
