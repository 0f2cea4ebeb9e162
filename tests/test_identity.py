"""duet_core.identity against real btrfs and ext4 filesystems: the keys must be the ones the kernel uses."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest
from fsimage import btrfs_rootid, btrfs_snapshot, btrfs_subvol, loop_fs, run, unmount

from duet_core import identity
from duet_core.errors import DuetError
from duet_core.events import FileId
from duet_core.identity import DevMap, file_id, kdev, open_beneath, parse_mountinfo, statx, subvol_of


def write(path: str, data: bytes = b"x") -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def mount_at(mnt: str) -> identity.Mount:
    (mount,) = [m for m in identity.mounts() if m.mount_point == mnt]
    return mount


def test_kdev_encoding():
    assert kdev(os.makedev(0, 39)) == 39
    assert kdev(os.makedev(7, 3)) == 7 << 20 | 3
    assert kdev(os.makedev(259, 1 << 19)) == 259 << 20 | 1 << 19


def test_statx_layout_matches_uapi():
    assert ctypes.sizeof(identity._StructStatx) == 256
    assert identity._StructStatx.stx_mnt_id.offset == 0x90
    assert identity._StructStatx.stx_subvol.offset == 0xA0


def test_parse_mountinfo_unescapes_and_skips_optional_fields():
    text = (
        b"36 35 98:0 /my\\040root /mnt/with\\040space\\011tab rw,noatime master:1 shared:7 - ext4 /dev/x\\134y rw\n"
        b"37 36 0:39 / /b rw - btrfs /dev/loop0 rw,subvolid=5,subvol=/\n"
    )
    mounts = parse_mountinfo(text)
    first = mounts[36]
    assert first.parent_id == 35
    assert first.dev == 98 << 20
    assert first.root == "/my root"
    assert first.mount_point == "/mnt/with space\ttab"
    assert first.options == "rw,noatime"
    assert (first.fstype, first.source, first.super_options) == ("ext4", "/dev/x\\y", "rw")
    assert mounts[37].dev == 39 and mounts[37].fstype == "btrfs"


def test_statx_of_fd_and_path_agree(tmp_path):
    path = write(str(tmp_path / "f"), b"hello")
    fd = os.open(path, os.O_RDONLY)
    try:
        by_fd, by_path = statx(fd), statx(path)
    finally:
        os.close(fd)
    assert by_fd == by_path
    st = os.stat(path)
    assert (by_path.ino, by_path.size, by_path.dev, by_path.mode) == (st.st_ino, 5, st.st_dev, st.st_mode)


def test_statx_missing_path_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        statx(str(tmp_path / "missing"))


@pytest.fixture
def btrfs_tree(btrfs_fs):
    """Four files that all have inode 257: top level, subvolume, nested subvolume, snapshot."""
    m = btrfs_fs.mnt
    write(f"{m}/top")  # the first file of the top-level tree (id 5)
    btrfs_subvol(f"{m}/a")
    write(f"{m}/a/f")
    btrfs_subvol(f"{m}/a/nested")
    write(f"{m}/a/nested/f")
    btrfs_snapshot(f"{m}/a", f"{m}/snap")
    return btrfs_fs, [f"{m}/top", f"{m}/a/f", f"{m}/a/nested/f", f"{m}/snap/f"]


def test_btrfs_same_inode_distinct_file_ids(btrfs_tree):
    fs, paths = btrfs_tree
    assert {os.lstat(p).st_ino for p in paths} == {257}
    ids = [file_id(p) for p in paths]
    assert len(set(ids)) == 4
    sb_dev = mount_at(fs.mnt).dev
    assert {fid.dev for fid in ids} == {sb_dev}
    assert [fid.subvol for fid in ids] == [btrfs_rootid(p) for p in paths]
    assert ids[0].subvol == 5 and len({fid.subvol for fid in ids}) == 4
    # st_dev is per subvolume on btrfs and never the superblock's device the kernel reports
    assert all(kdev(os.lstat(p).st_dev) != sb_dev for p in paths)


def test_btrfs_ioctl_fallback_agrees_with_statx(btrfs_tree):
    _, paths = btrfs_tree
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            assert identity.btrfs_ino_lookup_subvol(fd) == statx(path).subvol == subvol_of(fd) == subvol_of(path)
        finally:
            os.close(fd)


def test_btrfs_snapshot_placeholder_dir_takes_parent_subvol(btrfs_tree):
    """A snapshot shows an empty stub (inode 2, no STATX_SUBVOL, no ioctls) where its source had a subvolume."""
    fs, _ = btrfs_tree
    stub = f"{fs.mnt}/snap/nested"
    st = statx(stub)
    assert st.ino == 2 and st.subvol is None
    assert file_id(stub) == FileId(mount_at(fs.mnt).dev, btrfs_rootid(f"{fs.mnt}/snap"), 2)


def test_btrfs_subvol_mount_gives_same_key(btrfs_tree, tmp_path):
    fs, paths = btrfs_tree
    other = str(tmp_path / "mnt")
    os.mkdir(other)
    run(["mount", "-o", "subvol=a", fs.loopdev, other])
    try:
        assert file_id(f"{other}/f") == file_id(paths[1])
        assert file_id(f"{other}/nested/f") == file_id(paths[2])
    finally:
        unmount(other)


def test_ext4_file_id_matches_stat_and_mountinfo(ext4_fs):
    path = write(f"{ext4_fs.mnt}/f")
    st = os.lstat(path)
    fid = file_id(path)
    assert fid == FileId(kdev(st.st_dev), 0, st.st_ino)
    mount = mount_at(ext4_fs.mnt)
    assert mount.dev == kdev(st.st_dev) and mount.fstype == "ext4"
    assert subvol_of(path) == 0


def test_xfs_file_id_matches_stat(require_root):
    with loop_fs("xfs") as fs:
        path = write(f"{fs.mnt}/f")
        st = os.lstat(path)
        assert file_id(path) == FileId(kdev(st.st_dev), 0, st.st_ino)


def test_file_id_does_not_follow_symlinks(ext4_fs):
    target = write(f"{ext4_fs.mnt}/target")
    os.symlink("target", f"{ext4_fs.mnt}/link")
    assert file_id(f"{ext4_fs.mnt}/link").ino == os.lstat(f"{ext4_fs.mnt}/link").st_ino
    assert file_id(f"{ext4_fs.mnt}/link") != file_id(target)


def test_file_id_relative_to_dir_fd(btrfs_tree):
    fs, paths = btrfs_tree
    dfd = os.open(f"{fs.mnt}/a", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert file_id("nested/f", dir_fd=dfd) == file_id(paths[2])
    finally:
        os.close(dfd)


def test_file_ids_right_after_remounts(require_root):
    """Mount ids are reused at once after an unmount: keys must come from the current mount table."""
    with loop_fs("ext4") as fs:
        first = file_id(write(f"{fs.mnt}/f"))
    with loop_fs("btrfs") as fs:
        second = file_id(write(f"{fs.mnt}/f"))
        assert second.dev == mount_at(fs.mnt).dev and second.subvol == 5
    assert first.subvol == 0


def test_mount_table_follows_mounts_without_refresh(require_root):
    table = identity.MountTable()
    try:
        with loop_fs("ext4") as fs:
            (mount,) = [m for m in table if m.mount_point == fs.mnt]
            assert table.get(mount.mnt_id).fstype == "ext4"
        assert fs.mnt not in {m.mount_point for m in table}
    finally:
        table.close()


def test_unknown_mount_id_is_a_duet_error():
    with pytest.raises(DuetError):
        identity.mounts().get(2**31 - 1)


def test_devmap_one_statx_per_subvolume(btrfs_tree):
    fs, paths = btrfs_tree
    for i in range(20):
        write(f"{fs.mnt}/a/g{i}")
        write(f"{fs.mnt}/a/nested/g{i}")
    devmap = DevMap()
    for d in ("a", "a/nested"):
        for name in os.listdir(f"{fs.mnt}/{d}"):
            path = f"{fs.mnt}/{d}/{name}"
            st = os.lstat(path)
            if os.path.isfile(path):
                assert devmap.file_id(st.st_dev, st.st_ino, path) == file_id(path)
    assert devmap.misses == 2
    devmap.clear()
    assert devmap.file_id(os.lstat(paths[0]).st_dev, 257, paths[0]) == file_id(paths[0])
    assert devmap.misses == 3


def test_devmap_rejects_replaced_path(btrfs_tree):
    _, paths = btrfs_tree
    with pytest.raises(OSError) as err:
        DevMap().info(os.lstat(paths[1]).st_dev, paths[0])  # a path on another subvolume
    assert err.value.errno == errno.ESTALE


class TestOpenBeneath:
    @pytest.fixture
    def root(self, tmp_path):
        (tmp_path / "dir").mkdir()
        write(str(tmp_path / "dir" / "f"), b"inside")
        write(str(tmp_path / "outside"), b"outside")
        os.symlink("dir", tmp_path / "dirlink")
        os.symlink("f", tmp_path / "dir" / "flink")
        os.symlink(str(tmp_path / "outside"), tmp_path / "dir" / "abslink")
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        yield fd
        os.close(fd)

    def test_opens_plain_paths(self, root):
        fd = open_beneath(root, "dir/f")
        try:
            assert os.read(fd, 100) == b"inside"
            assert os.get_inheritable(fd) is False
        finally:
            os.close(fd)

    @pytest.mark.parametrize("path", ["dirlink/f", "dir/flink", "dir/abslink"])
    def test_refuses_symlinks_anywhere(self, root, path):
        with pytest.raises(OSError) as err:
            open_beneath(root, path)
        assert err.value.errno == errno.ELOOP

    @pytest.mark.parametrize("path", ["../outside", "/etc/passwd", "dir/../../outside"])
    def test_refuses_to_leave_the_root(self, root, path):
        with pytest.raises(OSError) as err:
            open_beneath(root, path)
        assert err.value.errno == errno.EXDEV

    def test_dotdot_inside_is_fine(self, root):
        os.close(open_beneath(root, "dir/../dir/f"))
