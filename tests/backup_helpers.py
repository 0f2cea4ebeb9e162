"""Helpers for the backup tests: a data set with every kind of entry and metadata, and exact tree comparisons.

:func:`make_tree` writes a tree with what backups get wrong: holes, empty files, owners, set-id modes, ns mtimes,
xattrs and POSIX ACLs (access and default), symlinks (relative, absolute, dangling), hard links across directories,
names that are not UTF-8 or hold a newline, empty and restricted directories, a fifo, a socket and a device node.
:func:`rsync_diff` asks rsync itself (``-aHAX -c --delete -n --itemize-changes``) what differs; :func:`tree_facts`
reads every entry's metadata so two trees can be compared field by field, ns times and inode grouping included.
"""

from __future__ import annotations

import collections
import json
import os
import stat
import subprocess

import blake3
from duet_backup.fsops import syncfs

from duet_core import residency

SPECIALS = ("specials/fifo", "specials/null", "specials/socket")
SPARSE = "sparse.img"


def write(path: bytes | str, data: bytes, mtime_ns: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def make_tree(root: str) -> str:
    """The data set described in the module docstring, under ``root/data``; returns its path (caches evicted)."""
    scope = os.path.join(root, "data")
    j = lambda *p: os.path.join(scope, *p)  # noqa: E731
    for i in range(12):
        write(j("docs", f"note{i:02d}.txt"), os.urandom(1000 + 7919 * i), mtime_ns=1_700_000_000_123_456_789 + i)
    write(j("big", "blob.bin"), os.urandom(3 << 20))
    write(j("empty"), b"")
    with open(j(SPARSE), "wb") as fh:            # 8 MiB with two 64 KiB islands of data
        fh.truncate(8 << 20)
        fh.seek(1 << 20)
        fh.write(os.urandom(64 << 10))
        fh.seek(6 << 20)
        fh.write(os.urandom(64 << 10))
    os.chown(j("docs", "note01.txt"), 1234, 5678)
    os.chmod(j("docs", "note02.txt"), 0o4751)
    os.chmod(j("docs", "note03.txt"), 0o600)
    os.setxattr(j("docs", "note04.txt"), "user.origin", b"camera\x00raw")
    os.setxattr(j("docs", "note04.txt"), "user.empty", b"")
    subprocess.run(["setfacl", "-m", "u:1234:rw,g:5678:r", j("docs", "note05.txt")], check=True)
    os.makedirs(j("shared"))
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx", j("shared")], check=True)
    os.symlink("../docs/note00.txt", j("big", "rel-link"))
    os.symlink("/etc/hostname", j("abs-link"))
    os.symlink("nowhere/at/all", j("dangling"))
    os.makedirs(j("links", "a"))
    os.makedirs(j("links", "b"))
    write(j("links", "a", "one"), os.urandom(20000))
    os.link(j("links", "a", "one"), j("links", "b", "two"))
    os.link(j("links", "a", "one"), j("links", "three"))
    write(os.path.join(os.fsencode(scope), b"odd", b"caf\xe9-latin1"), b"not utf-8 name")
    write(j("odd", "new\nline"), b"newline name")
    os.makedirs(j("empty-dir"))
    os.makedirs(j("private"))
    write(j("private", "secret"), b"s3cret")
    os.chmod(j("private"), 0o700)
    os.chown(j("private"), 1234, 5678)
    if _is_btrfs(root):   # a nested subvolume is part of the tree
        subprocess.run(["btrfs", "-q", "subvolume", "create", j("home")], check=True)
        write(j("home", "alice", "thesis.tex"), os.urandom(30000))
    os.makedirs(j("specials"))
    os.mkfifo(j("specials", "fifo"), 0o640)
    os.mknod(j("specials", "null"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(j("specials", "socket"), stat.S_IFSOCK | 0o755)
    os.chown(j("specials", "null"), 1234, 5678)
    os.utime(j("specials", "fifo"), ns=(1_500_000_000_000_000_007, 1_500_000_000_000_000_007))
    os.utime(j("docs"), ns=(1_600_000_000_000_000_001, 1_600_000_000_000_000_001))
    evict_regular(scope)
    return scope


def _is_btrfs(path: str) -> bool:
    return subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True).stdout.strip() == "btrfs"


def evict_regular(scope: str) -> None:
    """Write back the scope's filesystem (one syncfs), then evict every regular file under ``scope`` from the page
    cache (symlinks and fifos are left alone, never opened)."""
    fd = os.open(scope, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)
    finally:
        os.close(fd)
    for dirpath, _dirs, names in os.walk(os.fsencode(scope)):
        for name in names:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    residency.evict(fd)
                finally:
                    os.close(fd)


def rsync_diff(src: str, dst: str, *rules: str) -> list[str]:
    """What ``rsync -aHAX -c --delete`` would change to make ``dst`` equal ``src`` (nothing, for an exact copy);
    ``rules``: more rsync options (``--exclude=...``, ``-x``)."""
    proc = subprocess.run(["rsync", "-aHAX", "-n", "-c", "--delete", "--itemize-changes", *rules,
                           src.rstrip("/") + "/", dst.rstrip("/") + "/"], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.decode(errors="backslashreplace").splitlines() if line.strip()]


def _xattrs(path: bytes) -> dict:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def tree_facts(root: str) -> dict:
    """relpath -> (type, mode, uid, gid, size, mtime_ns, content / link target / device, xattrs, link group).

    The link group numbers the files that share an inode *within* the tree (a hard-link snapshot's files also share
    inodes with the previous snapshot: that is not a hard link of the scope), in walk order."""
    out = {}
    inodes: dict[bytes, tuple[int, int]] = {}
    broot = os.fsencode(root)
    for dirpath, dirs, files in sorted(os.walk(broot)):
        for name in sorted(dirs + files):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, broot)
            body = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    body = blake3.blake3(fh.read()).hexdigest()
                inodes[rel] = (st.st_dev, st.st_ino)
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            elif not stat.S_ISDIR(st.st_mode):
                body = st.st_rdev
            mtime = None if stat.S_ISLNK(st.st_mode) else st.st_mtime_ns
            out[rel] = [stat.S_IFMT(st.st_mode), st.st_mode, st.st_uid, st.st_gid,
                        st.st_size if not stat.S_ISDIR(st.st_mode) else None, mtime, body, _xattrs(path), None]
    shared = collections.Counter(inodes.values())
    groups: dict[tuple[int, int], int] = {}
    for rel in sorted(inodes):
        if shared[inodes[rel]] > 1:
            out[rel][-1] = groups.setdefault(inodes[rel], len(groups))
    return out


def assert_same_tree(src: str, dst: str) -> None:
    """``dst`` is an exact copy of ``src``: rsync finds nothing to do, and every entry's metadata is equal."""
    diff = rsync_diff(src, dst)
    assert diff == [], diff
    a, b = tree_facts(src), tree_facts(dst)
    assert a.keys() == b.keys(), (set(a) ^ set(b))
    bad = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert not bad, bad
    rs, rd = os.stat(src), os.stat(dst)
    assert (rs.st_mode, rs.st_uid, rs.st_gid, rs.st_mtime_ns) == (rd.st_mode, rd.st_uid, rd.st_gid, rd.st_mtime_ns)


def manifest(target: str, name: str) -> dict:
    with open(os.path.join(target, ".duet", "manifests", name + ".json")) as fh:
        return json.load(fh)


def snapshot_names(target: str) -> list[str]:
    return sorted(os.listdir(os.path.join(target, "snapshots")))


FIEMAP = 0xC020660B


def physical_extents(path: str) -> list[tuple[int, int, int]]:
    """(logical, physical, length) of a file's extents, per FIEMAP (what filefrag -v shows)."""
    import fcntl
    import struct

    count = 64
    buf = bytearray(struct.pack("QQLLLL", 0, 0xFFFFFFFFFFFFFFFF, 1, 0, count, 0) + bytes(56 * count))
    with open(path, "rb") as fh:
        fcntl.ioctl(fh.fileno(), FIEMAP, buf, True)
    mapped = struct.unpack_from("L", buf, 20)[0]
    out = []
    for i in range(mapped):
        logical, physical, length = struct.unpack_from("QQQ", buf, 32 + 56 * i)
        out.append((logical, physical, length))
    return out
