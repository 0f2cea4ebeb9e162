"""The backup task as a user runs it: ``duet run backup`` processes on real loop filesystems, checked with rsync.

The source is btrfs on a direct-I/O loop device (what a run reads from it is what it reports as device reads); the
target is btrfs (mirror subvolume + read-only snapshots) or ext4 (hard-link snapshots). Every published snapshot
must be exactly the source: ``rsync -aHAX -c --delete -n`` finds nothing to do, and every entry's metadata (ns
mtimes, owners, modes, xattrs, ACLs, link targets, hard-link groups) is equal.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import threading
import time

import backup_helpers as bh
import blake3
import fsimage
import plugin_dist
import pytest
from duet_backup.tree import TreeSync

from duet_core.bench.stop import journal_lines
from duet_core.state import StateStore

pytestmark = pytest.mark.bpf


class Duet(plugin_dist.CliRunner):
    """``duet`` as a subprocess with its own state directory and an empty config (``run`` only takes one)."""

    config_for = ("run",)

    def backup(self, scope: str, target: str, *extra: str) -> dict:
        """Run a backup that must succeed; returns the backup task's entry of the JSON summary."""
        proc = self("run", "backup", "--path", scope, "--target", target, "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        summary = json.loads(proc.stdout)
        rep = summary["tasks"]["backup"]
        rep["_summary"] = summary
        return rep


duet = Duet.fixture()


@pytest.fixture
def source(require_root):
    with fsimage.loop_fs("btrfs", direct_io=True) as fs:
        yield fs


@pytest.fixture(params=["btrfs", "ext4"])
def target(request, require_root):
    with fsimage.loop_fs(request.param) as fs:
        yield fs


def snap(target_fs, name: str) -> str:
    return os.path.join(target_fs.mnt, "snapshots", name)


def one_error(proc, code: int, needle: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("duet: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


# ----------------------------------------------------------------------------------------------------------------------
def test_snapshots_are_exact_incremental_and_a_no_change_run_reads_nothing(duet, source, target):
    scope = bh.make_tree(source.mnt)
    first = duet.backup(scope, target.mnt)
    name1 = first["snapshot"]
    assert bh.snapshot_names(target.mnt) == [name1]
    assert first["kind"] == ("btrfs" if target.fstype == "btrfs" else "hardlink")
    bh.assert_same_tree(scope, snap(target, name1))
    assert sorted(first["special_files"]) == sorted(bh.SPECIALS)
    # Holes stay holes: 128 KiB of data in an 8 MiB file.
    assert os.stat(os.path.join(snap(target, name1), bh.SPARSE)).st_blocks * 512 <= 512 << 10
    # The manifest names every regular file with the blake3 of its contents.
    m = bh.manifest(target.mnt, name1)
    with open(os.path.join(scope, "big", "blob.bin"), "rb") as fh:
        assert m["files"]["big/blob.bin"][4] == blake3.blake3(fh.read()).hexdigest()
    assert m["scope"] == scope and len(m["files"]) == first["files"]
    # ... and the same hash is a shared result for that file version, for scrub and gc to reuse.
    store = StateStore(duet.env["DUET_STATE_DIR"])
    shared = {f.relpath: store.shared_get(f, "blake3") for f in store.files(store.scope_id(scope))}
    store.close()
    assert shared == {rel: rec[4] for rel, rec in m["files"].items() if rel in shared} and len(shared) >= 19
    if target.fstype == "btrfs":
        import btrfsutil

        assert btrfsutil.get_subvolume_read_only(snap(target, name1))

    # Change things: content, metadata, a deletion, a new file, a renamed directory, a replaced symlink.
    with open(os.path.join(scope, "docs", "note07.txt"), "ab") as fh:
        fh.write(b"appended")
    os.chmod(os.path.join(scope, "docs", "note08.txt"), 0o640)
    os.unlink(os.path.join(scope, "docs", "note09.txt"))
    bh.write(os.path.join(scope, "fresh", "new.bin"), os.urandom(70000))
    os.rename(os.path.join(scope, "odd"), os.path.join(scope, "odd-renamed"))
    os.unlink(os.path.join(scope, "dangling"))
    os.symlink("somewhere/else", os.path.join(scope, "dangling"))
    bh.evict_regular(scope)
    old_blob = bh.physical_extents(os.path.join(snap(target, name1), "big", "blob.bin"))
    second = duet.backup(scope, target.mnt)
    name2 = second["snapshot"]
    assert bh.snapshot_names(target.mnt) == [name1, name2]
    bh.assert_same_tree(scope, snap(target, name2))
    # Only what changed was read, and copied: the appended, new and renamed files, and the chmod'ed one — whose
    # copy in the btrfs mirror only has its mode changed (its data read and found the same), where a hard-link
    # snapshot needs an inode of its own.
    assert second["items_total"] == 5, second
    if target.fstype == "btrfs":
        assert (second["counters"]["copied"], second["counters"]["metadata_only"]) == (4, 1), second
    else:
        assert second["counters"]["copied"] == 5 and "metadata_only" not in second["counters"], second
    assert os.stat(os.path.join(snap(target, name1), "docs", "note08.txt")).st_mode & 0o777 != 0o640
    # The first snapshot still holds the old versions.
    with open(os.path.join(snap(target, name1), "docs", "note07.txt"), "rb") as fh:
        assert not fh.read().endswith(b"appended")
    assert os.path.exists(os.path.join(snap(target, name1), "docs", "note09.txt"))
    # Unchanged files take no new space: the same inode (hard links) or the same extents (btrfs snapshots).
    blob1, blob2 = (os.path.join(snap(target, n), "big", "blob.bin") for n in (name1, name2))
    if target.fstype == "btrfs":
        assert bh.physical_extents(blob2) == old_blob
    else:
        assert os.stat(blob1).st_ino == os.stat(blob2).st_ino

    # No change at all: nothing is read, and a complete snapshot is still published.
    bh.evict_regular(scope)
    third = duet.backup(scope, target.mnt)
    assert third["items_total"] == 0 and third["bytes_processed"] == 0 and third["copied_at_finish"] == 0
    assert third["_summary"]["device_read_bytes"] < 64 << 10, third["_summary"]
    bh.assert_same_tree(scope, snap(target, third["snapshot"]))


@pytest.fixture(params=["btrfs", "ext4", "xfs"])
def any_target(request, require_root):
    with fsimage.loop_fs(request.param) as fs:
        yield fs


def test_a_metadata_change_keeps_the_copy_and_a_same_size_rewrite_with_its_old_mtime_is_still_copied(
        duet, source, any_target):
    """chmod, chown and an xattr move a file's ctime only. The data is read again and hashed (a rewrite of the same
    size whose mtime was set back moves the ctime alone too, and must be copied); when it hashes as before, the
    btrfs mirror's copy only gets the new metadata, keeping its extents shared with the earlier snapshot; a
    hard-link snapshot must give the file an inode of its own: on xfs a clone of the earlier one (FICLONE, no data
    written), on ext4 a copy. Either way the earlier snapshot keeps the old metadata and the new one is exact."""
    target = any_target
    scope = os.path.join(source.mnt, "data")
    for name in ("mode.bin", "xattr.bin", "rewritten.bin"):
        bh.write(os.path.join(scope, name), os.urandom(4 << 20), mtime_ns=1_700_000_000_000_000_007)
    first = duet.backup(scope, target.mnt)
    old1 = {n: bh.physical_extents(os.path.join(snap(target, first["snapshot"]), n)) for n in ("mode.bin", "xattr.bin")}
    orig = os.stat(os.path.join(scope, "mode.bin"))
    os.chmod(os.path.join(scope, "mode.bin"), 0o600)
    os.chown(os.path.join(scope, "mode.bin"), 4321, 8765)
    os.setxattr(os.path.join(scope, "xattr.bin"), "user.label", b"keep")
    path = os.path.join(scope, "rewritten.bin")
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.seek(1 << 20)
        fh.write(b"\xff" * 4096)
        fh.flush()
        os.fsync(fh.fileno())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    bh.evict_regular(scope)
    second = duet.backup(scope, target.mnt)
    snap1, snap2 = snap(target, first["snapshot"]), snap(target, second["snapshot"])
    bh.assert_same_tree(scope, snap2)
    assert second["items_total"] == 3, second
    # Every one of them was read (hashed): 12 MiB.
    assert second["bytes_processed"] >= 12 << 20, second
    if target.fstype in ("btrfs", "xfs"):
        assert (second["counters"]["metadata_only"], second["counters"]["copied"]) == (2, 1), second
        for n, extents in old1.items():
            assert bh.physical_extents(os.path.join(snap2, n)) == extents, n     # no new space taken
        if target.fstype == "xfs":       # the new snapshot's own inodes, sharing the earlier one's extents
            assert os.stat(os.path.join(snap2, "mode.bin")).st_ino != os.stat(os.path.join(snap1, "mode.bin")).st_ino
    else:
        assert second["counters"]["copied"] == 3 and "metadata_only" not in second["counters"], second
    # The earlier snapshot is as it was.
    st1 = os.stat(os.path.join(snap1, "mode.bin"))
    assert (st1.st_mode, st1.st_uid, st1.st_gid) == (orig.st_mode, orig.st_uid, orig.st_gid) != (0o100600, 4321, 8765)
    assert "user.label" not in os.listxattr(os.path.join(snap1, "xattr.bin"))
    with open(os.path.join(snap1, "rewritten.bin"), "rb") as fh:
        fh.seek(1 << 20)
        assert fh.read(4096) != b"\xff" * 4096
    # The manifest records the new version and the hash of what the snapshot holds.
    rec = bh.manifest(target.mnt, second["snapshot"])["files"]["rewritten.bin"]
    with open(path, "rb") as fh:
        assert rec[4] == blake3.blake3(fh.read()).hexdigest()


def test_the_sync_pass_changes_a_copy_in_place_only_when_no_earlier_snapshot_shares_it(any_target):
    """The sync pass (what no scheduled copy covered) takes the same shortcut as the task: a copy whose source only
    had its metadata changed gets the new metadata in place — unless the tree's file is a hard link into the
    previous snapshot (``prev_fd``), which would then change too: then it is a clone of the previous copy where the
    filesystem shares extents (btrfs, xfs), and a copy elsewhere (ext4)."""
    mnt = any_target.mnt
    src, tree, prev = (os.path.join(mnt, n) for n in ("src", "tree", "prev"))
    for name in ("mode.bin", "rewritten.bin"):
        bh.write(os.path.join(src, name), os.urandom(2 << 20), mtime_ns=1_700_000_000_000_000_011)
    os.mkdir(tree)

    def sync(tree_dir: str, published=None, prev: str | None = None):
        fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in (src, tree_dir, prev) if p]
        try:
            return TreeSync(fds[0], fds[1], published=published, prev_fd=fds[2] if prev else None).run()
        finally:
            for fd in fds:
                os.close(fd)

    first = sync(tree)
    inodes = {n: os.stat(os.path.join(tree, n)).st_ino for n in ("mode.bin", "rewritten.bin")}
    os.chmod(os.path.join(src, "mode.bin"), 0o604)
    path = os.path.join(src, "rewritten.bin")
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.write(b"\x00" * 4096)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = sync(tree, published=first.files)
    assert (second.metadata_only, second.copied) == (1, 1)
    assert os.stat(os.path.join(tree, "mode.bin")).st_ino == inodes["mode.bin"]
    assert os.stat(os.path.join(tree, "rewritten.bin")).st_ino != inodes["rewritten.bin"]
    bh.assert_same_tree(src, tree)
    # A hard-link snapshot: the previous tree is `prev`, and the new tree starts as links to it.
    os.rename(tree, prev)
    subprocess.run(["cp", "-al", prev, tree], check=True)
    os.chmod(os.path.join(src, "mode.bin"), 0o640)
    third = sync(tree, published=second.files, prev=prev)
    assert (third.metadata_only, third.copied) == ((0, 1) if any_target.fstype == "ext4" else (1, 0))
    assert os.stat(os.path.join(tree, "mode.bin")).st_ino != os.stat(os.path.join(prev, "mode.bin")).st_ino
    assert os.stat(os.path.join(prev, "mode.bin")).st_mode & 0o777 == 0o604
    bh.assert_same_tree(src, tree)


def test_snapshots_and_restore_commands(duet, source, target, tmp_path):
    scope = bh.make_tree(source.mnt)
    first = duet.backup(scope, target.mnt)
    os.unlink(os.path.join(scope, "docs", "note00.txt"))
    with open(os.path.join(scope, "docs", "note01.txt"), "ab") as fh:
        fh.write(b"x" * 100)
    bh.write(os.path.join(scope, "fresh", "new.bin"), os.urandom(5000))
    os.chmod(os.path.join(scope, "docs", "note02.txt"), 0o640)      # metadata only: not new data
    second = duet.backup(scope, target.mnt)
    proc = duet("snapshots", "--target", target.mnt, "--json")
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)["snapshots"]
    assert [s["name"] for s in listed] == [first["snapshot"], second["snapshot"]]
    assert [s["files"] for s in listed] == [first["files"], first["files"]]
    # What changed since the snapshot before: the appended and the new file, one removed.
    note01 = os.path.getsize(os.path.join(scope, "docs", "note01.txt"))
    assert [s["new"] for s in listed] == [None, {"files": 2, "bytes": note01 + 5000, "removed": 1}], listed
    text = duet("snapshots", "--target", target.mnt).stdout
    assert first["snapshot"] in text and "2 / " in text, text
    # A run says which snapshot it published, where, and what it copied (on stderr; stdout is the summary).
    proc = duet("run", "backup", "--path", scope, "--target", target.mnt)
    assert proc.returncode == 0, proc.stderr
    third = bh.snapshot_names(target.mnt)[-1]
    assert f"duet: backup: snapshot {third} published: {snap(target, third)} ({first['files']} files" in proc.stderr
    assert "; 0 copied" in proc.stderr, proc.stderr

    # A whole directory from the newest snapshot, and one file (by its absolute path) from the first one.
    dest = tmp_path / "restored"
    dest.mkdir()
    proc = duet("restore", "--target", target.mnt, "links", "--to", str(dest))
    assert proc.returncode == 0, proc.stderr
    bh.assert_same_tree(os.path.join(scope, "links"), str(dest / "links"))
    proc = duet("restore", "--target", target.mnt, "--snapshot", first["snapshot"],
                os.path.join(scope, "docs", "note00.txt"), "--to", str(dest))
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(snap(target, first["snapshot"]), "docs", "note00.txt"), "rb") as fh:
        assert (dest / "note00.txt").read_bytes() == fh.read()
    everything = tmp_path / "all"
    everything.mkdir()
    assert duet("restore", "--target", target.mnt, ".", "--to", str(everything)).returncode == 0
    bh.assert_same_tree(scope, str(everything))
    # Refusals are one line and exit 2.
    one_error(duet("restore", "--target", target.mnt, "links", "--to", str(dest)), 2, "already exists")
    one_error(duet("restore", "--target", target.mnt, "no/such/thing", "--to", str(dest)), 2, "not in snapshot")
    one_error(duet("restore", "--target", target.mnt, "--snapshot", "yesterday", "links", "--to", str(dest)), 2,
              "bad snapshot name")
    one_error(duet("restore", "--target", target.mnt, "../../etc", "--to", str(dest)), 2, "leaves the snapshot")
    # Never into the target: a snapshot's tree (shared with the others by hard links off btrfs) would change, and
    # "." restored into the snapshot it is read from would grow while it is walked.
    name = second["snapshot"]
    inside_snapshot = os.path.join(snap(target, name), "restored-here")
    before = sorted(os.listdir(snap(target, name)))
    if target.fstype != "btrfs":            # a btrfs snapshot is read-only: no directory can be made in it
        os.mkdir(inside_snapshot)
        before = sorted(os.listdir(snap(target, name)))
        one_error(duet("restore", "--target", target.mnt, ".", "--to", inside_snapshot), 2,
                  "is inside the backup target")
        assert os.listdir(inside_snapshot) == []
    one_error(duet("restore", "--target", target.mnt, "links", "--to", target.mnt), 2, "is inside the backup target")
    assert sorted(os.listdir(snap(target, name))) == before


def test_a_target_inside_the_scope_or_around_it_is_refused(duet, source):
    scope = os.path.join(source.mnt, "data")
    os.makedirs(os.path.join(scope, "backups"))
    bh.write(os.path.join(scope, "f"), b"x")
    one_error(duet("run", "backup", "--path", scope, "--target", os.path.join(scope, "backups")), 2,
              "is inside the scope")
    one_error(duet("run", "backup", "--path", scope, "--target", source.mnt), 2, "is inside the backup target")
    one_error(duet("run", "backup", "--path", scope, "--target", "/nonexistent/t"), 2, "not an existing directory")
    one_error(duet("run", "backup", "--path", scope), 2, "needs option 'target'")
    assert not os.path.exists(os.path.join(scope, "backups", "snapshots"))


def test_a_target_reachable_inside_the_scope_through_a_mount_is_refused(duet, source):
    """By path the target is elsewhere, but a bind mount shows it (or a directory above it) inside the scope: every
    run would back up the snapshots before it. The scope shown inside the target is refused too; a mount of another
    part of the target's filesystem inside the scope is not a reason to refuse."""
    with fsimage.loop_fs("ext4") as other:
        scope = os.path.join(source.mnt, "data")
        target = os.path.join(other.mnt, "backups", "nightly")
        os.makedirs(target)
        bh.write(os.path.join(scope, "f"), b"x")
        bh.write(os.path.join(other.mnt, "media", "song"), b"la")
        shown = os.path.join(scope, "media")
        with fsimage.bind_mount(other.mnt, shown):          # the whole filesystem of the target, inside the scope
            one_error(duet("run", "backup", "--path", scope, "--target", target), 2,
                      "can be reached inside the scope")
        assert not os.path.exists(os.path.join(target, "snapshots"))
        with fsimage.bind_mount(os.path.join(other.mnt, "media"), shown):      # only another directory of it
            proc = duet("run", "backup", "--path", scope, "--target", target)
            assert proc.returncode == 0, proc.stderr
        (name,) = os.listdir(os.path.join(target, "snapshots"))
        assert open(os.path.join(target, "snapshots", name, "media", "song"), "rb").read() == b"la"
        with fsimage.bind_mount(scope, os.path.join(target, "seen")):       # the scope, inside the target
            one_error(duet("run", "backup", "--path", scope, "--target", target), 2,
                      "can be reached inside the backup target")
        assert os.listdir(os.path.join(target, "snapshots")) == [name]


def test_a_symlink_planted_in_the_target_does_not_redirect_writes(duet, source, tmp_path):
    """Someone replaces a directory of the mirror with a symlink to /tmp-like space: backup writes stay inside."""
    with fsimage.loop_fs("btrfs") as tgt:
        scope = os.path.join(source.mnt, "data")
        bh.write(os.path.join(scope, "dir", "a"), b"one")
        duet.backup(scope, tgt.mnt)
        outside = tmp_path / "outside"
        outside.mkdir()
        mirror_dir = os.path.join(tgt.mnt, ".duet", "mirror", "dir")
        fsimage.run(["rm", "-rf", "--", mirror_dir])
        os.symlink(str(outside), mirror_dir)
        bh.write(os.path.join(scope, "dir", "b"), b"two")
        rep = duet.backup(scope, tgt.mnt)
        assert list(outside.iterdir()) == []
        bh.assert_same_tree(scope, snap(tgt, rep["snapshot"]))


def test_files_changed_or_deleted_during_the_run(duet, source, target):
    """A file written throughout the run is copied again or flagged; a file deleted before its turn is skipped."""
    scope = os.path.join(source.mnt, "data")
    for i in range(30):
        bh.write(os.path.join(scope, "steady", f"f{i:02d}"), os.urandom(256 << 10))
    busy = os.path.join(scope, "busy.log")
    bh.write(busy, os.urandom(8 << 20))
    bh.evict_regular(scope)
    stop = threading.Event()

    def writer():
        with open(busy, "r+b") as fh:
            while not stop.is_set():
                fh.seek(0)
                fh.write(os.urandom(4096))
                fh.flush()
                os.fsync(fh.fileno())

    t = threading.Thread(target=writer)
    t.start()
    try:
        # Slow enough (device reads capped) that the deletion lands before the last files' turn.
        proc = duet.start("run", "backup", "--path", scope, "--target", target.mnt, "--json",
                          "--rate-limit", "8MB/s")
        end = time.monotonic() + 30   # the first batch of copies is durable: the scan is long done
        while not journal_lines(target.mnt) and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.01)
        os.unlink(os.path.join(scope, "steady", "f29"))
        out, err = proc.communicate(timeout=120)
    finally:
        stop.set()
        t.join()
    assert proc.returncode == 0, err
    rep = json.loads(out)["tasks"]["backup"]
    assert rep["changed_during_backup"] == ["busy.log"] or rep["counters"].get("changed_during_backup"), rep
    assert rep["counters"].get("vanished") == 1 and rep["items_failed"] == 0, rep   # gone before its turn
    snapshot = snap(target, rep["snapshot"])
    assert not os.path.exists(os.path.join(snapshot, "steady", "f29"))
    assert sorted(os.listdir(os.path.join(snapshot, "steady"))) == [f"f{i:02d}" for i in range(29)]
    assert bh.manifest(target.mnt, rep["snapshot"])["changed_during_backup"] == rep["changed_during_backup"]
    # Now that it is quiet, the next run makes the snapshot exact again.
    rep2 = duet.backup(scope, target.mnt)
    bh.assert_same_tree(scope, snap(target, rep2["snapshot"]))
    assert rep2["changed_during_backup"] == []


@pytest.mark.parametrize("target_fs, kill_after", [("btrfs", 0), ("ext4", 10), ("btrfs", 30), ("ext4", 30)])
def test_kill_9_mid_run_then_rerun_is_complete_exact_and_copies_nothing_twice(duet, source, target_fs, kill_after):
    with fsimage.loop_fs(target_fs) as target:
        kill_and_rerun(duet, source, target, kill_after)


def kill_and_rerun(duet, source, target, kill_after: int) -> None:
    """SIGKILL once ``kill_after`` copies are durable: 0 = while the first batch is copied, 10 = mid-run, 30 = every
    copy made, in the final sync pass (1,000 unchanged small files make it last long enough to be hit)."""
    scope = bh.make_tree(source.mnt)
    for i in range(30):
        bh.write(os.path.join(scope, "bulk", f"b{i:02d}"), os.urandom(192 << 10))
    for i in range(1000):
        with open(os.path.join(scope, "bulk", f"s{i:04d}"), "wb") as fh:
            fh.write(b"%d" % i)
    bh.evict_regular(scope)
    duet.backup(scope, target.mnt)
    names = bh.snapshot_names(target.mnt)
    for i in range(30):   # 30 changed files for the next run
        with open(os.path.join(scope, "bulk", f"b{i:02d}"), "r+b") as fh:
            fh.write(os.urandom(1000))
    bh.evict_regular(scope)
    proc = duet.start("run", "backup", "--path", scope, "--target", target.mnt, "--rate-limit", "4MB/s")
    end = time.monotonic() + 60
    while journal_lines(target.mnt) < kill_after and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.005)
    if kill_after == 0:
        time.sleep(0.3)
    assert proc.poll() is None, ("finished before it could be killed", proc.communicate())
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    journaled = journal_lines(target.mnt)
    # The published snapshots are untouched and nothing half-made appears under snapshots/ — unless the kill came
    # just after the new snapshot was published (possible when killed in the finish), and then that one is exact.
    now = bh.snapshot_names(target.mnt)
    if now != names:
        assert kill_after == 30 and now[:-1] == names, (names, now)
        bh.assert_same_tree(scope, snap(target, now[-1]))
        names = now
    else:
        assert journaled >= kill_after
    rep = duet.backup(scope, target.mnt)
    assert bh.snapshot_names(target.mnt) == names + [rep["snapshot"]]
    bh.assert_same_tree(scope, snap(target, rep["snapshot"]))
    copied_again = rep["counters"].get("copied", 0) + rep["copied_at_finish"]
    assert copied_again <= max(0, 30 - journaled) + 1, (journaled, rep)   # only what was not yet durable


def test_stopped_early_publishes_nothing_and_a_busy_target_is_refused(duet, source):
    with fsimage.loop_fs("ext4") as tgt:
        scope = os.path.join(source.mnt, "data")
        for i in range(20):
            bh.write(os.path.join(scope, f"f{i:02d}"), os.urandom(256 << 10))
        bh.evict_regular(scope)
        proc = duet("run", "backup", "--path", scope, "--target", tgt.mnt, "--json", "--for", "1s",
                    "--rate-limit", "1MB/s")
        assert proc.returncode == 5, proc.stderr
        rep = json.loads(proc.stdout)["tasks"]["backup"]
        assert rep["snapshot"] is None and 0 < rep["items_done"] < 20, rep
        assert bh.snapshot_names(tgt.mnt) == []
        # Another backup holds the target: exit 4, one line, nothing done.
        import fcntl

        with open(os.path.join(tgt.mnt, ".duet", "lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            one_error(duet("run", "backup", "--path", scope, "--target", tgt.mnt), 4, "another backup is writing")
        rest = duet.backup(scope, tgt.mnt)
        assert rest["counters"]["copied"] + rest["counters"].get("already_copied", 0) == 20 - rep["items_done"]
        bh.assert_same_tree(scope, snap(tgt, rest["snapshot"]))


def test_a_low_open_file_limit_costs_read_ahead_not_files(duet, source, target):
    """Under ``ulimit -n 256`` (a service manager's or a user's), the run reads ahead fewer files at once, and never
    so many that the copies themselves run out of descriptors: every file is copied, exactly."""
    scope = os.path.join(source.mnt, "data")
    for d in range(4):
        for i in range(150):
            bh.write(os.path.join(scope, f"d{d}", f"f{i:03d}"), os.urandom(4096 + i))
    # A large file last, so that the read-ahead's byte window (1/16 of the data set) would hold hundreds of the
    # small ones: only the limit on files in flight holds it back.
    bh.write(os.path.join(scope, "z", "large"), os.urandom(64 << 20))
    bh.evict_regular(scope)

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.run(duet.argv("run", "backup", "--path", scope, "--target", target.mnt, "--json"),
                          capture_output=True, text=True, timeout=300, env=duet.env, preexec_fn=low_limit)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Too many open files" not in proc.stderr, proc.stderr
    rep = json.loads(proc.stdout)["tasks"]["backup"]
    assert rep["counters"]["copied"] == 601 and rep["copied_at_finish"] == 0, rep
    bh.assert_same_tree(scope, snap(target, rep["snapshot"]))
