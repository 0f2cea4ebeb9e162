"""SIGTERM and SIGINT stop ``duet run`` within a second in every phase — the scan of a large tree, the middle of
one long item, a backup's sync pass — with exit code 5, no traceback, progress saved, and the next run completes
with the right result (the backup snapshot is the source, the scrub verifies the file it gave up).

The runs are real processes over real loop filesystems: a 50,000-file ext4 tree (the scan), a 64 MiB file on btrfs
over a direct-I/O loop device read at ``--rate-limit`` (one long item: the rate is kept inside the item, so it
lasts long enough to be interrupted).
"""

from __future__ import annotations

import json
import os
import signal
import time

import backup_helpers as bh
import fsimage
import pytest
from reliability_plugins import debris_in
from test_backup import duet, snap  # noqa: F401 - duet: the fixture
from test_reliability_crash import check_state
from test_run_cli import wait_for
from test_stop_contract import stop

from duet_core.bench.scale import make_files
from duet_core.bench.stop import journal_lines, run_started
from duet_core.scheduler import read_bytes_io

pytestmark = pytest.mark.bpf

TREE_FILES = 50_000
TIMEOUT = 60.0    # for any one wait below
BIG = 64 << 20


# -- helpers -----------------------------------------------------------------------------------------------------------
def snapshots(target: str) -> list[str]:
    """The snapshots published in the backup target (none before the first run set the target up)."""
    path = os.path.join(target, "snapshots")
    return bh.snapshot_names(target) if os.path.isdir(path) else []


def has_open(pid: int, path: str) -> bool:
    fds = f"/proc/{pid}/fd"
    try:
        return any(os.readlink(os.path.join(fds, fd)) == path for fd in os.listdir(fds))
    except OSError:
        return False


# -- a large tree: the scan, the sync pass, the rescan --------------------------------------------------------------
def test_stops_in_the_scan_and_the_sync_pass_of_50k_files_within_a_second_and_the_next_run_is_exact(duet):
    with fsimage.loop_fs("ext4", size_mb=512, mkfs_args=("-N", "70000")) as src, \
            fsimage.loop_fs("btrfs", size_mb=512) as target:
        scope = os.path.join(src.mnt, "data")
        os.mkdir(scope)
        make_files(scope, TREE_FILES)
        argv = ("run", "backup", "--path", scope, "--target", target.mnt, "--json")

        # SIGTERM during the first scan: nothing recorded of it, nothing published.
        proc = duet.start(*argv)
        wait_for(lambda: run_started(duet.state), TIMEOUT, "the run to start", proc, poll=0.002)
        summary = stop(proc, signal.SIGTERM)
        assert "scan_s" not in summary["phases"], summary["phases"]      # it ended inside the scan
        assert summary["tasks"]["backup"]["items_done"] == 0
        assert snapshots(target.mnt) == [] and debris_in(target.mnt) == []
        check_state(duet.state, "after a stop in the first scan")

        # Stops at moments spread over start-up, scan, planning, the start-up snapshot and the first copies: each
        # honoured within a second, whichever phase it lands in.
        reached = []
        for delay, signum in zip((0.3, 0.7, 1.1, 1.5, 2.0), (signal.SIGINT, signal.SIGTERM) * 3):
            proc = duet.start(*argv)
            wait_for(lambda: run_started(duet.state), TIMEOUT, "the run to start", proc, poll=0.002)
            time.sleep(delay)
            summary = stop(proc, signum)
            reached.append((delay, list(summary["phases"]), summary["tasks"]["backup"]["items_done"]))
        print("stops after the run started: (delay, phases completed, files copied):", reached)
        assert snapshots(target.mnt) == []

        # SIGINT once every copy is durable: inside duet_finish's sync pass over the 50,000 files. No snapshot.
        proc = duet.start(*argv)
        wait_for(lambda: journal_lines(target.mnt) >= TREE_FILES, TIMEOUT, "every copy journaled", proc,
                 poll=0.005)
        summary = stop(proc, signal.SIGINT)
        rep = summary["tasks"]["backup"]
        assert rep["items_done"] == TREE_FILES and rep["snapshot"] is None, rep
        assert snapshots(target.mnt) == []

        # Some changes, then SIGTERM during the rescan (reconciled with the recorded scan in SQL).
        for i in range(10):
            bh.write(os.path.join(scope, f"d{i:05d}", "f0007"), b"changed %d\n" % i)
        os.unlink(os.path.join(scope, "d00010", "f0001"))
        bh.write(os.path.join(scope, "d00011", "new"), b"new\n")
        proc = duet.start(*argv)
        wait_for(lambda: run_started(duet.state), TIMEOUT, "the run to start", proc, poll=0.002)
        summary = stop(proc, signal.SIGTERM)
        assert "scan_s" not in summary["phases"], summary["phases"]
        check_state(duet.state, "after a stop in the rescan")

        # The next run completes: the snapshot is the source, and only the changes were copied again.
        rep = duet.backup(scope, target.mnt)
        assert snapshots(target.mnt) == [rep["snapshot"]]
        assert rep["counters"].get("copied", 0) + rep["copied_at_finish"] == 11, rep
        bh.assert_same_tree(scope, snap(target, rep["snapshot"]))
        assert debris_in(target.mnt) == []


# -- one long item ---------------------------------------------------------------------------------------------------
@pytest.fixture
def big_file(require_root):
    """A 64 MiB file, not cached, on btrfs over a direct-I/O loop device (every read goes to the device)."""
    with fsimage.loop_fs("btrfs", direct_io=True) as fs:
        scope = os.path.join(fs.mnt, "data")
        os.mkdir(scope)
        path = os.path.join(scope, "big")
        bh.write(path, os.urandom(BIG))
        bh.evict_regular(scope)
        yield scope, path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_backup_stopped_inside_a_64_mib_copy_leaves_no_debris_and_the_next_run_copies_it(duet, big_file, signum):
    scope, path = big_file
    with fsimage.loop_fs("ext4") as target:
        proc = duet.start("run", "backup", "--path", scope, "--target", target.mnt, "--json", "--rate-limit", "2MB/s")
        t0 = time.monotonic()
        wait_for(lambda: any(os.path.getsize(p) >= 1 << 20 for p in debris_in(target.mnt)), TIMEOUT,
                 "the copy underway", proc, poll=0.002)
        # The rate holds inside the item: the copy is under way at about 2 MB/s, not done at full speed.
        time.sleep(0.5)
        sizes = [os.path.getsize(p) for p in debris_in(target.mnt)]
        assert sizes, "the copy is no longer under way: the rate limit did not hold inside the item"
        assert max(sizes) <= 2e6 * (time.monotonic() - t0) + (4 << 20), sizes
        summary = stop(proc, signum)
        rep = summary["tasks"]["backup"]
        assert (rep["items_done"], rep["items_failed"], rep["complete"], rep["snapshot"]) == (0, 0, False, None), rep
        assert debris_in(target.mnt) == [] and snapshots(target.mnt) == []   # the half copy was removed
        rep = duet.backup(scope, target.mnt)        # no rate limit: the file is copied whole, and published
        assert rep["counters"]["copied"] == 1 and rep["bytes_processed"] == BIG, rep
        bh.assert_same_tree(scope, snap(target, rep["snapshot"]))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_scrub_stopped_inside_a_64_mib_read_is_not_counted_and_the_next_run_verifies_it(duet, big_file, signum):
    scope, path = big_file
    argv = ("run", "scrub", "--path", scope, "--json")
    proc = duet.start(*argv, "--rate-limit", "2MB/s")
    wait_for(lambda: has_open(proc.pid, path) and read_bytes_io(proc.pid) >= 2 << 20, TIMEOUT, "the read underway",
             proc, poll=0.002)
    summary = stop(proc, signum)
    rep = summary["tasks"]["scrub"]
    assert (rep["items_done"], rep["items_failed"], rep["complete"], rep["bytes_processed"]) == (0, 0, False, 0), rep
    assert rep["corrupt"] == []
    proc = duet(*argv)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)["tasks"]["scrub"]
    # Verified whole by this run, from the device: nothing of the interrupted read was taken as verified. (The
    # file is all the filesystem holds, cold: the kernel's scrub may verify it, reading the metadata too.)
    assert (rep["items_done"], rep["complete"], rep["bytes_processed"]) == (1, True, BIG), rep
    assert BIG <= rep["bytes_from_device"] <= BIG + (4 << 20), rep
