"""duet_core.scope on real filesystems: what is in a scope, and how rescans follow changes."""

from __future__ import annotations

import os

import pytest
from fsimage import btrfs_snapshot, btrfs_subvol, loop_fs, run

from duet_core.errors import DuetError
from duet_core.identity import file_id, kdev
from duet_core.scope import Scope


def write(path: str, data: bytes = b"x") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def age_dirs(root: str) -> None:
    """Backdate every directory's mtime so a rescan trusts it (fresh ones are always re-listed)."""
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, (1_000_000, 1_000_000), follow_symlinks=False)


def relpaths(scope: Scope) -> set[str]:
    return set(scope.files.values())


@pytest.fixture
def tree(btrfs_fs):
    """root/ with plain files, a nested subvolume, symlinks out of it, and files outside root."""
    m = btrfs_fs.mnt
    root = f"{m}/root"
    write(f"{root}/a.txt", b"aaaa")
    write(f"{root}/d/b.txt", b"bb")
    btrfs_subvol(f"{root}/sub")
    write(f"{root}/sub/deep/c.txt", b"c")
    write(f"{m}/outside/secret.txt")
    os.symlink(f"{m}/outside", f"{root}/link-to-outside")
    os.symlink("../outside/secret.txt", f"{root}/d/file-link")
    os.mkfifo(f"{root}/fifo")
    return btrfs_fs, root


def test_scan_lists_regular_files_with_kernel_ids(tree):
    _, root = tree
    scope = Scope(root)
    found = {f.relpath: f for f in scope.scan()}
    assert set(found) == {"a.txt", "d/b.txt", "sub/deep/c.txt"}
    for rel, f in found.items():
        assert f.fid == file_id(f"{root}/{rel}")
        assert f.size == os.lstat(f"{root}/{rel}").st_size
    assert scope.files == {f.fid: rel for rel, f in found.items()}
    assert found["sub/deep/c.txt"].fid.subvol != found["a.txt"].fid.subvol


def test_scan_needs_one_statx_per_subvolume(tree):
    _, root = tree
    for i in range(50):
        write(f"{root}/d/many{i}")
        write(f"{root}/sub/deep/many{i}")
    scope = Scope(root)
    assert len(list(scope.scan())) == 103
    assert scope._devmap.misses == 2  # the top-level subvolume and sub


def test_devs_cover_superblock_and_subvolumes(tree):
    _, root = tree
    scope = Scope(root)
    list(scope.scan())
    sb = file_id(root).dev
    assert scope.devs() == {(sb, 5), (sb, file_id(f"{root}/sub").subvol)}


def test_hard_links_are_one_file(tree):
    _, root = tree
    os.link(f"{root}/a.txt", f"{root}/d/a-again")
    scope = Scope(root)
    assert [f.relpath for f in scope.scan() if f.relpath.endswith(("a.txt", "a-again"))] in (
        ["a.txt"],
        ["d/a-again"],
    )
    os.unlink(f"{root}/a.txt")
    assert scope.rescan() == ([], [])
    assert scope.files[file_id(f"{root}/d/a-again")] == "d/a-again"


def test_root_must_be_an_existing_directory(tmp_path):
    with pytest.raises(DuetError, match="not an existing directory"):
        Scope(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(DuetError):
        Scope(str(tmp_path / "file"))


def test_nested_filesystems_and_one_file_system(tree):
    """A nested ext4 mount is in scope unless one_file_system; a nested btrfs subvolume always is."""
    _, root = tree
    os.mkdir(f"{root}/ext")
    with loop_fs("ext4") as ext:
        run(["mount", "--bind", ext.mnt, f"{root}/ext"])
        try:
            write(f"{root}/ext/e.txt")
            everything = Scope(root)
            list(everything.scan())
            assert {"ext/e.txt", "sub/deep/c.txt", "a.txt"} <= relpaths(everything)
            ext_dev = kdev(os.stat(ext.mnt).st_dev)
            assert (ext_dev, 0) in everything.devs()

            one = Scope(root, one_file_system=True)
            list(one.scan())
            assert relpaths(one) == {"a.txt", "d/b.txt", "sub/deep/c.txt"}
            assert all(dev != ext_dev for dev, _ in one.devs())
        finally:
            run(["umount", f"{root}/ext"])


def test_snapshot_inside_scope_is_separate_files(tree):
    fs, root = tree
    btrfs_snapshot(f"{root}/sub", f"{root}/snap", readonly=True)
    btrfs_snapshot(fs.mnt, f"{root}/topsnap")  # holds root/sub only as an empty placeholder directory
    scope = Scope(root)
    found = {f.relpath: f.fid for f in scope.scan()}
    assert found["snap/deep/c.txt"] != found["sub/deep/c.txt"]
    assert found["snap/deep/c.txt"].ino == found["sub/deep/c.txt"].ino
    assert found["topsnap/root/a.txt"] == file_id(f"{root}/topsnap/root/a.txt") != found["a.txt"]
    assert not any(rel.startswith("topsnap/root/sub/") for rel in found)
    assert scope.skipped == 0


def test_rescan_finds_added_and_removed(tree):
    _, root = tree
    scope = Scope(root)
    list(scope.scan())
    gone = file_id(f"{root}/d/b.txt")
    os.unlink(f"{root}/d/b.txt")
    write(f"{root}/sub/deep/new.txt", b"12345")
    diff = scope.rescan()
    new = file_id(f"{root}/sub/deep/new.txt")
    assert [tuple(f)[:3] for f in diff.added] == [(new, "sub/deep/new.txt", 5)]
    assert diff.removed == [(gone, "d/b.txt")]
    assert relpaths(scope) == {"a.txt", "sub/deep/c.txt", "sub/deep/new.txt"}
    assert scope.rescan() == ([], [])


def test_rescan_lists_only_changed_directories(tree):
    _, root = tree
    scope = Scope(root)
    list(scope.scan())
    assert scope.listed == 4  # root, d, sub, sub/deep (not the symlinked outside/)
    age_dirs(root)
    scope.rescan()  # the backdated mtimes differ from what the scan recorded: everything once more
    assert scope.rescan() == ([], []) and scope.listed == 0
    assert scope.skipped == 0
    write(f"{root}/d/new")
    diff = scope.rescan()
    assert [f.relpath for f in diff.added] == ["d/new"] and scope.listed == 1


def test_rescan_sees_changes_deep_below_unchanged_directories(tree):
    _, root = tree
    write(f"{root}/sub/deep/er/est/f")
    scope = Scope(root)
    list(scope.scan())
    age_dirs(root)
    scope.rescan()
    os.unlink(f"{root}/sub/deep/er/est/f")
    write(f"{root}/sub/deep/er/g", b"gg")
    diff = scope.rescan()
    assert [(f.relpath, f.size) for f in diff.added] == [("sub/deep/er/g", 2)]
    assert [rel for _, rel in diff.removed] == ["sub/deep/er/est/f"]
    assert scope.listed == 2 and scope.skipped == 0


def test_rescan_removed_directory_tree_and_subvolume(tree):
    _, root = tree
    scope = Scope(root)
    list(scope.scan())
    age_dirs(root)
    scope.rescan()
    run(["btrfs", "-q", "subvolume", "delete", f"{root}/sub"])
    diff = scope.rescan()
    assert [rel for _, rel in diff.removed] == ["sub/deep/c.txt"]
    assert len(scope.devs()) == 1


def test_rescan_reports_a_moved_directory_as_removed_and_added(tree):
    _, root = tree
    scope = Scope(root)
    list(scope.scan())
    fid = file_id(f"{root}/d/b.txt")
    os.rename(f"{root}/d", f"{root}/moved")
    diff = scope.rescan()
    assert diff.removed == [(fid, "d/b.txt")]
    assert [tuple(f)[:3] for f in diff.added] == [(fid, "moved/b.txt", 2)]
    assert scope.files[fid] == "moved/b.txt"


def test_rescan_reports_a_reused_inode_number(ext4_fs):
    """ext4 hands a deleted file's inode number to the next new file: same FileId, a different file."""
    root = ext4_fs.mnt
    write(f"{root}/old")
    scope = Scope(root)
    list(scope.scan())
    fid = file_id(f"{root}/old")
    os.unlink(f"{root}/old")
    write(f"{root}/new", b"new")
    assert file_id(f"{root}/new") == fid
    diff = scope.rescan()
    assert diff.removed == [(fid, "old")]
    assert [tuple(f)[:3] for f in diff.added] == [(fid, "new", 3)]


def test_replaced_file_is_removed_and_added(tree):
    _, root = tree
    scope = Scope(root)
    list(scope.scan())
    old = file_id(f"{root}/a.txt")
    write(f"{root}/a.tmp", b"new")
    os.rename(f"{root}/a.tmp", f"{root}/a.txt")
    diff = scope.rescan()
    assert [(f.relpath, f.size) for f in diff.added] == [("a.txt", 3)]
    assert diff.removed == [(old, "a.txt")]


def test_directory_swapped_for_symlink_is_not_followed(tree):
    fs, root = tree
    scope = Scope(root)
    list(scope.scan())
    os.rename(f"{root}/d", f"{fs.mnt}/d-elsewhere")
    os.symlink(f"{fs.mnt}/d-elsewhere", f"{root}/d")
    diff = scope.rescan()
    assert [rel for _, rel in diff.removed] == ["d/b.txt"]
    assert "d/b.txt" not in relpaths(scope)


def test_scope_on_ext4(ext4_fs):
    write(f"{ext4_fs.mnt}/x/y/z")
    scope = Scope(ext4_fs.mnt)
    (found,) = [f for f in scope.scan() if f.relpath == "x/y/z"]
    st = os.lstat(f"{ext4_fs.mnt}/x/y/z")
    assert found.fid == (kdev(st.st_dev), 0, st.st_ino)
    assert scope.devs() == {(kdev(st.st_dev), 0)}
