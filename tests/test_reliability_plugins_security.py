"""Security of the plugins, which run as root over trees other users write: backup never writes outside TARGET even
with symlinks planted in the target and the source, restore never writes outside --to (nor deletes anything there),
gc's retention never deletes outside TARGET/snapshots, and snapshots keep the source's owners and modes (another
user's 0600 file stays theirs and 0600).

Each test takes a fingerprint of a directory outside everything duet is given (:func:`reliability.tree_snapshot`:
content hashes, link targets, modes) and checks it is unchanged afterwards.
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess

import backup_helpers as bh
import fsimage
import pytest
from reliability import tree_snapshot
from reliability_plugins import OTHER_GID, OTHER_UID, exact_snapshots, make_source
from test_backup import Duet, duet, one_error  # noqa: F401 - duet: shared fixtures

pytestmark = pytest.mark.bpf


@pytest.fixture
def source(require_root):
    with fsimage.loop_fs("btrfs") as fs:
        yield fs


@pytest.fixture(params=["btrfs", "ext4"])
def target(request, require_root):
    with fsimage.loop_fs(request.param) as fs:
        yield fs


def outside_dir(root: str) -> str:
    """A directory beside the scope and the target that nothing may touch."""
    out = os.path.join(root, "outside")
    os.makedirs(os.path.join(out, "d0", "sub0"))
    bh.write(os.path.join(out, "victim"), b"must stay\n")
    bh.write(os.path.join(out, "d0", "sub0", "f00"), b"not a backup\n")
    return out


def test_backup_never_writes_outside_the_target_through_planted_symlinks(duet, source, target):
    scope = make_source(source.mnt, random.Random(11))
    outside = outside_dir(source.mnt)
    first = duet.backup(scope, target.mnt)
    before = tree_snapshot(outside)
    tree = os.path.join(target.mnt, ".duet", "mirror" if target.fstype == "btrfs" else "incomplete")
    os.makedirs(tree, exist_ok=True)
    bh.write(os.path.join(scope, "new-file"), b"new data\n")
    bh.write(os.path.join(scope, "d0", "sub0", "f00"), b"changed data\n")
    # 1. The journal is a symlink to a file outside: the target is refused in one line, nothing is written.
    journal = os.path.join(target.mnt, ".duet", "journal")
    if os.path.lexists(journal):
        os.unlink(journal)
    os.symlink(outside + "/victim", journal)
    proc = duet("run", "backup", "--path", scope, "--target", target.mnt)
    one_error(proc, 2, "Too many levels of symbolic links")
    assert tree_snapshot(outside) == before, "backup wrote outside the target"
    os.unlink(journal)
    # 2. Symlinks where the next run writes in the tree: a directory holding a changed file, and a new file's name.
    subprocess.run(["rm", "-rf", os.path.join(tree, "d0")], check=True)
    os.symlink(outside + "/d0", os.path.join(tree, "d0"))
    os.symlink(outside + "/victim", os.path.join(tree, "new-file"))
    proc = duet("run", "backup", "--path", scope, "--target", target.mnt, "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert tree_snapshot(outside) == before, "backup wrote outside the target"
    assert proc.returncode == 0, proc.stderr       # the planted links are replaced, never followed
    name = json.loads(proc.stdout)["tasks"]["backup"]["snapshot"]
    assert name and bh.snapshot_names(target.mnt) == [first["snapshot"], name]
    assert bh.rsync_diff(scope, os.path.join(target.mnt, "snapshots", name)) == []   # the sync pass fixed it


def test_snapshots_keep_other_users_files_theirs_and_private(duet, source, target):
    scope = make_source(source.mnt, random.Random(12))
    name = duet.backup(scope, target.mnt)["snapshot"]
    snap = os.path.join(target.mnt, "snapshots", name)
    exact_snapshots(scope, target.mnt, "owners")
    st = os.lstat(os.path.join(snap, "home", "other", "secret"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (OTHER_UID, OTHER_GID, 0o600)
    st = os.lstat(os.path.join(snap, "home", "other"))
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (OTHER_UID, 0o700)
    assert os.path.islink(os.path.join(snap, "out-link"))      # a link, never the file it points at
    # The target's internals are root's alone.
    assert stat.S_IMODE(os.stat(os.path.join(target.mnt, ".duet")).st_mode) == 0o700


def test_restore_never_writes_outside_to_nor_deletes_there(duet, source, target):
    scope = make_source(source.mnt, random.Random(13))
    outside = outside_dir(source.mnt)
    name = duet.backup(scope, target.mnt)["snapshot"]
    dest = os.path.join(source.mnt, "restore")
    os.makedirs(dest)
    bh.write(os.path.join(dest, "keep-me"), b"the user's own file\n")
    os.symlink(outside + "/d0", os.path.join(dest, "d0"))        # a planted link where a restored name goes
    before, dest_before = tree_snapshot(outside), tree_snapshot(dest)
    for args, needle in ((("d0",), "d0 already exists in the destination"),
                         (("../../etc",), "leaves the snapshot"),
                         (("/etc/passwd",), "is not under the backed-up scope"),
                         ((".",), "already exists in the destination"),
                         (("--snapshot", "../../../etc", "d1"), "bad snapshot name")):
        one_error(duet("restore", "--target", target.mnt, *args, "--to", dest), 2, needle)
    assert tree_snapshot(outside) == before
    assert tree_snapshot(dest) == dest_before, "restore changed what was in --to"
    # Into an empty directory a link is restored as a link; what it points at is never written.
    empty = os.path.join(source.mnt, "restore2")
    os.makedirs(empty)
    proc = duet("restore", "--target", target.mnt, "--snapshot", name, ".", "--to", empty)
    assert proc.returncode == 0, proc.stderr
    assert bh.rsync_diff(scope, empty) == []
    assert tree_snapshot(outside) == before


def test_gc_retention_never_deletes_outside_the_snapshots(duet, source, target):
    scope = make_source(source.mnt, random.Random(14))
    outside = outside_dir(source.mnt)
    names = [duet.backup(scope, target.mnt)["snapshot"] for _ in range(2)]
    snaps = os.path.join(target.mnt, "snapshots")
    # Planted: a symlink to the outside under a snapshot's name (older than every real one), a plain tree under
    # an old snapshot name holding links out (a directory link and a file link), and a name that is not a snapshot.
    os.symlink(outside, os.path.join(snaps, "2001-01-01T000000Z"))
    planted = os.path.join(snaps, "2001-01-02T000000Z")
    os.makedirs(planted)
    os.symlink(outside, os.path.join(planted, "dir-link"))
    os.symlink(outside + "/victim", os.path.join(planted, "file-link"))
    os.symlink(outside, os.path.join(snaps, "not-a-snapshot"))
    before = tree_snapshot(outside)
    proc = duet("run", "gc", "--path", scope, "--target", target.mnt, "--keep-last", "1", "--prune", "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    retention = json.loads(proc.stdout)["tasks"]["gc"]["retention"]
    assert tree_snapshot(outside) == before, "gc deleted outside the target's snapshots"
    left = sorted(os.listdir(snaps))
    assert names[-1] in left and names[0] not in left and "2001-01-02T000000Z" not in left
    assert "2001-01-01T000000Z" in left and "not-a-snapshot" in left        # ignored, not followed
    assert set(retention["ignored"]) >= {"2001-01-01T000000Z", "not-a-snapshot"}
    assert bh.rsync_diff(scope, os.path.join(snaps, names[-1])) == []
