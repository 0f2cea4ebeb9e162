"""A no-change backup to a btrfs target publishes a snapshot of the mirror without the sync pass — and only then.

The shortcut (``BackupTask._unchanged``) must never publish anything but the scope: every kind of change that
leaves the regular files' versions alone (a symlink's owner, a directory's mode, a new empty directory) makes the
next run take the full pass; and the mirror is never taken for a snapshot it no longer is — after a killed run wrote
to it, or once the newest snapshot was deleted by hand — even when the scope is rolled back to exactly what the
remaining newest snapshot holds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import backup_helpers as bh
import fsimage
import pytest
from test_backup import duet, journal_lines, snap, source  # noqa: F401 - duet, source: shared fixtures

pytestmark = pytest.mark.bpf


@pytest.fixture
def btrfs_target(require_root):
    with fsimage.loop_fs("btrfs") as fs:
        yield fs


def backup_exact(duet, scope: str, target, unchanged: bool) -> dict:
    """One backup run: its snapshot must be exactly the scope, made with (or without) the no-change shortcut."""
    rep = duet.backup(scope, target.mnt)
    assert rep["unchanged"] is unchanged, rep
    bh.assert_same_tree(scope, snap(target, rep["snapshot"]))
    return rep


def test_a_no_change_run_publishes_the_mirror_and_every_change_is_still_seen(duet, source, btrfs_target):
    import btrfsutil

    scope = bh.make_tree(source.mnt)
    first = backup_exact(duet, scope, btrfs_target, unchanged=False)
    assert "entries" in bh.manifest(btrfs_target.mnt, first["snapshot"])

    # Nothing changed: a complete, read-only snapshot, nothing read, nothing copied or linked.
    bh.evict_regular(scope)
    same = backup_exact(duet, scope, btrfs_target, unchanged=True)
    assert same["_summary"]["device_read_bytes"] < 64 << 10, same["_summary"]
    assert same["files"] == first["files"] and same["copied_at_finish"] == same["linked"] == 0, same
    assert btrfsutil.get_subvolume_read_only(snap(btrfs_target, same["snapshot"]))
    m1, m2 = (bh.manifest(btrfs_target.mnt, r["snapshot"]) for r in (first, same))
    assert m2["files"] == m1["files"] and m2["entries"] == m1["entries"] and m2["base"] == first["snapshot"]

    # Changes no regular file's version shows, one at a time: each is in the next snapshot (full pass), and the
    # run after it is a no-change run again.
    changes = [
        lambda: os.chown(os.path.join(scope, "dangling"), 4321, 8765, follow_symlinks=False),  # a symlink's owner
        lambda: os.chmod(os.path.join(scope, "empty-dir"), 0o751),                              # a directory's mode
        lambda: os.mkdir(os.path.join(scope, "links", "a", "new-empty")),                       # a new empty dir
        lambda: os.setxattr(os.path.join(scope, "shared"), "user.tag", b"x"),                   # a directory xattr
    ]
    for change in changes:
        change()
        backup_exact(duet, scope, btrfs_target, unchanged=False)
        backup_exact(duet, scope, btrfs_target, unchanged=True)

    # A file rewritten in place with its size and mtime put back: only its ctime says so, and it is copied.
    path = os.path.join(scope, "docs", "note03.txt")
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.write(b"X")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    rep = backup_exact(duet, scope, btrfs_target, unchanged=False)
    assert rep["counters"]["copied"] == 1, rep


def test_an_empty_scope_then_a_first_entry_that_is_no_regular_file(duet, source, btrfs_target):
    """Nothing for the scheduler to hand over (no regular file): only the root directory's version shows it."""
    scope = os.path.join(source.mnt, "empty-scope")
    os.mkdir(scope)
    backup_exact(duet, scope, btrfs_target, unchanged=False)
    backup_exact(duet, scope, btrfs_target, unchanged=True)
    os.symlink("elsewhere", os.path.join(scope, "first"))
    backup_exact(duet, scope, btrfs_target, unchanged=False)


def test_a_mirror_a_killed_run_wrote_to_is_never_published_as_is(duet, source, btrfs_target):
    """A run is killed while its first copies are still under temporary names (nothing journaled yet); then the
    scope is rolled back (btrfs snapshot) to exactly what the last snapshot holds — same inodes, same times. The
    next run must not take the mirror for that snapshot: it runs the full pass, which removes the stray copies."""
    data = os.path.join(source.mnt, "data")
    subprocess.run(["btrfs", "-q", "subvolume", "create", data], check=True)
    for i in range(40):
        bh.write(os.path.join(data, "bulk", f"b{i:02d}"), os.urandom(256 << 10))
    saved = os.path.join(source.mnt, "saved")
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", data, saved], check=True)
    bh.evict_regular(data)
    backup_exact(duet, data, btrfs_target, unchanged=False)

    for i in range(40):   # every file changes: the next run copies them all, slowly
        with open(os.path.join(data, "bulk", f"b{i:02d}"), "r+b") as fh:
            fh.write(os.urandom(1000))
    bh.evict_regular(data)
    proc = duet.start("run", "backup", "--path", data, "--target", btrfs_target.mnt, "--rate-limit", "2MB/s")
    mirror_bulk = os.path.join(btrfs_target.mnt, ".duet", "mirror", "bulk")
    end = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < end:
        if any(n.startswith(".duet-tmp.") for n in os.listdir(mirror_bulk)):
            break
        time.sleep(0.002)
    assert proc.poll() is None, ("finished before it could be killed", proc.communicate())
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert journal_lines(btrfs_target.mnt) == 0   # killed before its first batch was durable: nothing journaled
    assert any(n.startswith(".duet-tmp.") for n in os.listdir(mirror_bulk))
    assert not os.path.exists(tree_of(btrfs_target))   # the mirror no longer claims to be the last snapshot

    # Roll the scope back to the state of the last snapshot: the same subvolume contents, inodes and times.
    subprocess.run(["btrfs", "-q", "subvolume", "delete", data], check=True)
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", saved, data], check=True)
    bh.evict_regular(data)
    rep = backup_exact(duet, data, btrfs_target, unchanged=False)
    assert rep["counters"].get("copied", 0) == 0, rep   # nothing to copy: the rollback matches the snapshot
    with open(tree_of(btrfs_target)) as fh:
        assert fh.read() == rep["snapshot"]
    backup_exact(duet, data, btrfs_target, unchanged=True)


def test_the_mirror_is_not_taken_for_an_older_snapshot_once_the_newest_is_deleted(duet, source, btrfs_target):
    """The newest snapshot (the mirror's state) is deleted by hand and the scope rolled back to the state of the one
    before: the scope matches that snapshot's manifest, but the mirror does not — the full pass runs."""
    data = os.path.join(source.mnt, "data")
    subprocess.run(["btrfs", "-q", "subvolume", "create", data], check=True)
    for i in range(5):
        bh.write(os.path.join(data, f"f{i}"), os.urandom(4096))
    saved = os.path.join(source.mnt, "saved")
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", data, saved], check=True)
    first = backup_exact(duet, data, btrfs_target, unchanged=False)
    bh.write(os.path.join(data, "f0"), b"changed")
    os.unlink(os.path.join(data, "f1"))
    second = backup_exact(duet, data, btrfs_target, unchanged=False)
    subprocess.run(["btrfs", "-q", "subvolume", "delete", snap(btrfs_target, second["snapshot"])], check=True)
    subprocess.run(["btrfs", "-q", "subvolume", "delete", data], check=True)
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", saved, data], check=True)
    assert bh.snapshot_names(btrfs_target.mnt) == [first["snapshot"]]
    third = backup_exact(duet, data, btrfs_target, unchanged=False)
    assert third["counters"].get("copied", 0) + third["copied_at_finish"] >= 2, third   # f0 and f1 again


def tree_of(target) -> str:
    return os.path.join(target.mnt, ".duet", "tree-of")
