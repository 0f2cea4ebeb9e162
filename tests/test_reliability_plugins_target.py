"""The backup target failing under a run: full (ENOSPC on a small ext4 or btrfs image), read-only (remounted), and
gone mid-run (the ext4 shutdown ioctl, as when a disk is pulled: every later write is EIO). Each time: a clear line
and a non-zero exit, the snapshots published before unchanged (their files' metadata and bytes as they were),
nothing partial published, and once the target is usable again the next run publishes an exact snapshot.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import subprocess
import time

import backup_helpers as bh
import fsimage
import pytest
from reliability_plugins import exact_snapshots, make_source
from test_backup import Duet, duet, source  # noqa: F401 - duet, source: shared fixtures

pytestmark = pytest.mark.bpf

EXT4_IOC_SHUTDOWN = 0x8004587D
EXT4_GOING_FLAGS_NOLOGFLUSH = 2     # stop at once, as if the device vanished


def bh_snap(target: str, name: str) -> str:
    return os.path.join(target, "snapshots", name)


def facts_of_snapshots(target: str) -> dict[str, dict]:
    return {n: bh.tree_facts(os.path.join(target, "snapshots", n)) for n in bh.snapshot_names(target)}


def failed_cleanly(proc, needle: str, code: int = 1) -> list[str]:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if needle in line]
    assert len(lines) == 1, proc.stderr
    return lines


# A small target, and big files (4 of them) that together need more than it has free after the first backup: a
# 16 MiB ext4; a btrfs of 120 MiB (mkfs.btrfs needs about 110), of which about 35 MiB is free for data.
FULL_TARGETS = {"ext4": (16, 4 << 20), "btrfs": (120, 16 << 20)}


@pytest.mark.parametrize("fstype", sorted(FULL_TARGETS))
def test_a_full_target_publishes_nothing_and_keeps_the_earlier_snapshots(duet, source, fstype, require_root):
    scope = make_source(source.mnt, random.Random(7))
    size_mb, big = FULL_TARGETS[fstype]
    with fsimage.loop_fs(fstype, size_mb=size_mb) as target:
        first = duet.backup(scope, target.mnt)
        exact_snapshots(scope, target.mnt, "first backup")
        before = facts_of_snapshots(target.mnt)
        for i in range(4):
            bh.write(os.path.join(scope, "big", f"b{i}"), os.urandom(big))
        free = os.statvfs(target.mnt)
        assert 4 * big > free.f_bavail * free.f_frsize, "the big files fit: the target would not fill up"
        proc = duet("run", "backup", "--path", scope, "--target", target.mnt, "--json")
        failed_cleanly(proc, "cannot be written (No space left on device): no snapshot published")
        rep = json.loads(proc.stdout)["tasks"]["backup"]
        assert rep["snapshot"] is None
        assert bh.snapshot_names(target.mnt) == [first["snapshot"]], "a partial snapshot was published"
        assert facts_of_snapshots(target.mnt) == before
        # Space again (the big files go): the next run publishes an exact snapshot.
        subprocess.run(["rm", "-rf", os.path.join(scope, "big")], check=True)
        again = duet.backup(scope, target.mnt)
        assert bh.snapshot_names(target.mnt) == [first["snapshot"], again["snapshot"]]
        assert bh.rsync_diff(scope, bh_snap(target.mnt, again["snapshot"])) == []


@pytest.mark.parametrize("fstype", ["btrfs", "ext4"])
def test_a_read_only_target_is_one_line_and_changes_nothing(duet, source, fstype):
    scope = make_source(source.mnt, random.Random(8))
    with fsimage.loop_fs(fstype) as target:
        duet.backup(scope, target.mnt)
        before = facts_of_snapshots(target.mnt)
        bh.write(os.path.join(scope, "new"), b"written after the first backup\n")
        subprocess.run(["mount", "-o", "remount,ro", target.mnt], check=True)
        try:
            proc = duet("run", "backup", "scrub", "--path", scope, "--target", target.mnt)
            line = failed_cleanly(proc, "duet: error:", code=2)[0]
            assert f"cannot use the backup target {target.mnt}: Read-only file system" in line
        finally:
            subprocess.run(["mount", "-o", "remount,rw", target.mnt], check=True)
        assert facts_of_snapshots(target.mnt) == before
        again = duet.backup(scope, target.mnt)
        assert len(bh.snapshot_names(target.mnt)) == 2
        assert bh.rsync_diff(scope, bh_snap(target.mnt, again["snapshot"])) == []


def test_a_target_that_vanishes_mid_run_publishes_nothing(duet, source, require_root):
    scope = make_source(source.mnt, random.Random(9))
    with fsimage.loop_fs("ext4", size_mb=128) as target:
        first = duet.backup(scope, target.mnt)
        before = facts_of_snapshots(target.mnt)
        for i in range(12):
            bh.write(os.path.join(scope, "more", f"m{i:02d}"), os.urandom(1 << 20))
        bh.evict_regular(scope)
        proc = duet.start("run", "backup", "--path", scope, "--target", target.mnt, "--rate-limit", "2MB/s",
                          "--json")
        journal = os.path.join(target.mnt, ".duet", "journal")
        deadline = time.monotonic() + 60
        while not os.path.exists(journal):        # some copies committed: the run is in the middle of its work
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it copied anything"
            time.sleep(0.05)
        fd = os.open(target.mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, EXT4_GOING_FLAGS_NOLOGFLUSH.to_bytes(4, "little"))
        finally:
            os.close(fd)
        out, err = proc.communicate(timeout=120)
        failed_cleanly(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                       "cannot be written (Input/output error): no snapshot published")
        assert json.loads(out)["tasks"]["backup"]["snapshot"] is None
        # The disk comes back: mount it again (ext4 replays its journal).
        fsimage.unmount(target.mnt)
        subprocess.run(["mount", target.loopdev, target.mnt], check=True)
        assert bh.snapshot_names(target.mnt) == [first["snapshot"]], "a partial snapshot was published"
        assert facts_of_snapshots(target.mnt) == before
        again = duet.backup(scope, target.mnt)
        assert bh.snapshot_names(target.mnt) == [first["snapshot"], again["snapshot"]]
        assert bh.rsync_diff(scope, bh_snap(target.mnt, again["snapshot"])) == []
