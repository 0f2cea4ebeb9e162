"""The scrub's kernel pass, end to end on real btrfs loop images: a cold scope that is most of its filesystem is
verified by the kernel's own scrub (``BTRFS_IOC_SCRUB``, through ``duet_device_pass``) instead of file by file.

What a user sees: the run verifies every file, with the device read once and the page cache left alone; a flipped
bit is still named with its file; a stopped run's next run resumes the kernel's scrub where it was; a foreground
program reading the scope makes it give way (the files it had verified count, the rest are read one by one); and a
scope that is a small part of its filesystem is read file by file, not the whole filesystem. The kernel's scrub is
slowed, where a test needs it to last, by btrfs' own per-device limit (``scrub_speed_max`` in sysfs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import fsimage
import pytest
from plugin_dist import evict_tree, make_dataset, resident
from test_scrub import btrfs_direct, corrupt_map, covers, duet, flip_bit, sectors_read  # noqa: F401 - fixtures

from duet_core.scope import Scope

pytestmark = pytest.mark.bpf

MiB = 1 << 20


@contextlib.contextmanager
def scrub_speed(fs, bytes_per_s: int):
    """Limit the kernel's scrub of the image's device to ``bytes_per_s`` (btrfs' sysfs knob), lifted on the way out.
    The UUID is probed on the device (``-p``): blkid's cache can still hold an earlier filesystem of the same loop
    device (a full run of the suite failed on that once)."""
    fsid = subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value", fs.loopdev], capture_output=True, text=True,
                          check=True).stdout.strip()
    knob = f"/sys/fs/btrfs/{fsid}/devinfo/1/scrub_speed_max"
    with open(knob, "w") as fh:
        fh.write(str(bytes_per_s))
    try:
        yield
    finally:
        with open(knob, "w") as fh:
            fh.write("0")


def wait_for_reads(loopdev: str, since: int, nbytes: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while sectors_read(loopdev) - since < nbytes:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the scrub did not start reading"
        time.sleep(0.01)


def test_a_cold_filesystem_is_verified_by_the_kernels_scrub(btrfs_direct, duet):
    scope, files = make_dataset(btrfs_direct.mnt, n=24, sizes=(1 * MiB, 64 << 10, 4 * MiB))
    data = sum(files.values())
    before = sectors_read(btrfs_direct.loopdev)
    code, rep, err = duet.scrub(scope)
    read = sectors_read(btrfs_direct.loopdev) - before
    assert code == 0, err
    assert rep["complete"] and rep["items_done"] == len(files) and rep["counters"]["kernel_scrub"] == 1, rep
    assert rep["bytes_processed"] == data and rep["kernel_scrub"]["data_bytes_scrubbed"] >= data
    assert rep["kernel_scrub"]["csum_errors"] == rep["kernel_scrub"]["uncorrectable_errors"] == 0
    # The device was read once (the data, and the metadata btrfs scrub reads too), not through the page cache.
    assert data <= read <= data + 8 * MiB, read
    assert rep["bytes_from_device"] <= read
    assert all(resident(os.path.join(scope, rel)) == 0 for rel in files)
    # A new round (every 0) is verified the same way; within the period nothing is read.
    code, again, err = duet.scrub(scope)
    assert code == 0 and again["items_total"] == 0, err
    code, forced, err = duet.scrub(scope, "--every", "0")
    assert code == 0 and forced["items_done"] == len(files) and forced["counters"]["kernel_scrub"] == 1, err


def test_a_flipped_bit_the_kernels_scrub_finds_is_named_with_its_file(btrfs_direct, duet):
    scope, files = make_dataset(btrfs_direct.mnt, n=12, sizes=(1 * MiB, 256 << 10))
    bad = os.path.join(scope, sorted(files)[5])
    flip_bit(btrfs_direct, bad, 70000)
    evict_tree(scope)
    code, rep, err = duet.scrub(scope)
    assert code == 6, err
    assert rep["counters"]["kernel_scrub_errors"] >= 1 and "reading each file to name the damaged ones" in err
    found = corrupt_map(rep)
    assert list(found) == [bad] and covers(found[bad], 70000), found
    assert rep["items_done"] == len(files) and rep["items_damaged"] == 1


def test_a_filesystem_mounted_inside_the_scope_is_the_one_the_kernel_scrubs(btrfs_direct, duet):
    """A scope on one btrfs with another btrfs mounted inside it, whose files alone need verifying: the kernel's
    scrub must be that filesystem's. One of the scope root's would vouch for files it never read (a flipped bit
    in them went unseen that way)."""
    with fsimage.loop_fs("btrfs", direct_io=True) as inner:
        data, files = make_dataset(inner.mnt, n=12, sizes=(1 * MiB, 256 << 10))
        bad = sorted(files)[5]
        flip_bit(inner, os.path.join(data, bad), 70000)
        scope = os.path.join(btrfs_direct.mnt, "scope")
        mounted = os.path.join(scope, "inner")
        with fsimage.bind_mount(data, mounted):
            evict_tree(scope)
            before = sectors_read(inner.loopdev)
            code, rep, err = duet.scrub(scope)
            read = sectors_read(inner.loopdev) - before
    assert code == 6, err
    assert rep["counters"]["kernel_scrub_errors"] >= 1 and "reading each file to name the damaged ones" in err
    assert rep["counters"]["kernel_scrub_bytes"] >= sum(files.values())    # the inner filesystem was read
    assert read >= sum(files.values())
    found = corrupt_map(rep)
    assert list(found) == [os.path.join(mounted, bad)] and covers(found[os.path.join(mounted, bad)], 70000), found
    assert rep["items_done"] == len(files) and rep["items_damaged"] == 1


def stopped_after(fs, duet, scope: str, nbytes: int) -> tuple[int, str, float]:
    """``duet run scrub`` with the kernel's scrub slowed, SIGTERM once ``nbytes`` were read: (exit, stderr, how
    long the stop took). Not slower than 48 MiB/s: below 16 MiB/s the kernel paces its scrub in 1 s sleeps, which
    a cancel waits out."""
    before = sectors_read(fs.loopdev)
    with scrub_speed(fs, 48 * MiB):
        proc = subprocess.Popen(duet.argv("run", "scrub", "--path", scope, "--json"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=duet.env)
        try:
            wait_for_reads(fs.loopdev, before, nbytes, proc)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=60)
            return proc.returncode, err, time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_a_stopped_kernel_scrub_resumes_where_it_was(btrfs_direct, duet):
    scope, files = make_dataset(btrfs_direct.mnt, n=12, sizes=(8 * MiB,))
    data = sum(files.values())
    before = sectors_read(btrfs_direct.loopdev)
    code, err, took = stopped_after(btrfs_direct, duet, scope, 40 * MiB)
    first = sectors_read(btrfs_direct.loopdev) - before
    assert code == 5 and "Traceback" not in err, err
    assert took < 1.0, took                                  # the kernel's scrub is cancelled at once
    assert 40 * MiB <= first < data - 16 * MiB, first
    code, rep, err = duet.scrub(scope)
    assert code == 0 and rep["complete"] and rep["items_done"] == len(files), err
    assert rep["counters"]["kernel_scrub"] == 1
    # Resumed at the first run's last_physical. btrfs resumes a chunk at a time (the chunk it was in is scrubbed
    # again; data chunks are a tenth of this 256 MiB image): the chunks the first run finished are not read again.
    assert rep["counters"]["kernel_scrub_bytes"] <= data - first + 32 * MiB, (rep["counters"], first)
    assert rep["counters"]["kernel_scrub_bytes"] <= data - 8 * MiB, (rep["counters"], first)


def test_the_kernels_scrub_gives_way_to_a_foreground_reader(btrfs_direct, duet):
    scope, files = make_dataset(btrfs_direct.mnt, n=16, sizes=(2 * MiB,))
    data = sum(files.values())
    before = sectors_read(btrfs_direct.loopdev)
    read_by_program = sorted(files)[8:]
    with scrub_speed(btrfs_direct, 16 * MiB):
        proc = subprocess.Popen(duet.argv("run", "scrub", "--path", scope, "--json"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=duet.env)
        try:
            wait_for_reads(btrfs_direct.loopdev, before, 2 * MiB, proc)    # the kernel's scrub is reading
            for rel in read_by_program:
                with open(os.path.join(scope, rel), "rb") as fh:
                    assert len(fh.read()) == files[rel]
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err, err
    rep = json.loads(out)["tasks"]["scrub"]
    assert rep["complete"] and rep["items_done"] == len(files), rep
    assert rep["counters"]["kernel_scrub_gave_way"] == 1 and "gave way" in err, rep["counters"]
    # The program's reads verified files for the scrub, which read less than everything (the kernel's scrub
    # covered some of the program's files before it gave way: it reads in device order, the files interleaved).
    assert rep["counters"]["pages_observed"] > 0 and rep["bytes_from_device"] <= data - 4 * MiB, rep
    program = sum(files[rel] for rel in read_by_program)
    assert sectors_read(btrfs_direct.loopdev) - before <= rep["bytes_from_device"] + program + 2 * MiB


def test_a_scope_that_is_a_small_part_of_its_filesystem_is_read_file_by_file(btrfs_direct, duet):
    _other, others = make_dataset(btrfs_direct.mnt, n=8, sizes=(4 * MiB,), subdir="other")
    scope, files = make_dataset(btrfs_direct.mnt, n=8, sizes=(1 * MiB,))
    data = sum(files.values())
    before = sectors_read(btrfs_direct.loopdev)
    code, rep, err = duet.scrub(scope)
    read = sectors_read(btrfs_direct.loopdev) - before
    assert code == 0 and rep["items_done"] == len(files), err
    assert "kernel_scrub" not in rep["counters"] and "kernel_scrub" not in rep, rep
    assert data <= read <= data + 2 * MiB < sum(others.values()), read      # the scope, not the filesystem


def test_an_error_found_before_a_stop_is_not_forgotten_by_the_resumed_pass(btrfs_direct, duet):
    """The kernel's scrub found a bad block, then the run was stopped: the run that finishes the pass still knows,
    reads the files, and names the damaged one."""
    scope, files = make_dataset(btrfs_direct.mnt, n=12, sizes=(8 * MiB,))
    bad = os.path.join(scope, "a/f00")                       # written first: the lowest addresses, scrubbed first
    flip_bit(btrfs_direct, bad, 4096 * 3 + 7)
    evict_tree(scope)
    code, err, _took = stopped_after(btrfs_direct, duet, scope, 40 * MiB)
    assert code == 5, err
    code, rep, err = duet.scrub(scope)
    assert code == 6, err
    assert rep["counters"]["kernel_scrub_errors"] >= 1 and rep["kernel_scrub"]["uncorrectable_errors"] >= 1
    found = corrupt_map(rep)
    assert list(found) == [bad] and covers(found[bad], 4096 * 3 + 7), found


def test_a_scrub_already_running_leaves_the_files_to_be_read_one_by_one(btrfs_direct, duet):
    """btrfs allows one scrub per device: with the administrator's own running, duet says so and reads file by
    file."""
    scope, files = make_dataset(btrfs_direct.mnt, n=8, sizes=(8 * MiB,))
    subprocess.run(["btrfs", "filesystem", "sync", btrfs_direct.mnt], check=True)   # its scrub sees it all
    with scrub_speed(btrfs_direct, 16 * MiB):                                       # about 4 s
        admin = subprocess.Popen(["btrfs", "scrub", "start", "-B", btrfs_direct.mnt], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            wait_for_reads(btrfs_direct.loopdev, sectors_read(btrfs_direct.loopdev), 1 * MiB, admin)
            code, rep, err = duet.scrub(scope)
            assert admin.poll() is None, "the administrator's scrub ended before duet's run: the test proves nothing"
        finally:
            subprocess.run(["btrfs", "scrub", "cancel", btrfs_direct.mnt], capture_output=True)
            admin.wait(timeout=60)
    assert code == 0 and rep["complete"] and rep["items_done"] == len(files), err
    assert "the kernel's scrub could not run" in err and "kernel_scrub" not in rep["counters"], err
    assert rep["bytes_from_device"] == sum(files.values())      # each file read, once


def test_a_nightly_backup_and_scrub_ends_with_the_kernels_scrub(btrfs_direct, duet):
    """``duet run backup scrub`` from cron: the first run shares every read between the two tasks (no pass); the
    next night the backup needs only the file that changed — read first, once for both — and then the scrub, alone
    with a due round, hands the rest to the kernel's scrub."""
    scope, files = make_dataset(btrfs_direct.mnt, n=12, sizes=(1 * MiB, 256 << 10))
    changed = list(Scope(scope).scan())[-1].relpath            # the last in scan order: read first all the same
    with fsimage.loop_fs("ext4") as target:
        argv = duet.argv("run", "backup", "scrub", "--path", scope, "--target", target.mnt, "--json",
                         "--every", "0")

        def night() -> dict:
            evict_tree(scope)
            proc = subprocess.run(argv, capture_output=True, text=True, env=duet.env, timeout=120)
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
            return json.loads(proc.stdout)["tasks"]

        first = night()
        assert first["backup"]["counters"]["copied"] == len(files)
        assert "kernel_scrub" not in first["scrub"]["counters"]                # every read served both tasks
        with open(os.path.join(scope, changed), "r+b") as fh:
            fh.write(b"changed")
        second = night()
        assert second["backup"]["counters"]["copied"] == 1
        assert second["scrub"]["counters"]["kernel_scrub"] == 1 and second["scrub"]["items_done"] == len(files)
