"""A name the plugins found as a regular file is a fifo by the time they open it: the run must not hang.

duet runs as root over trees other users write, and a user can rename a fifo over any of their files at any moment.
A blocking ``O_RDONLY`` open of a fifo waits for a writer that never comes, so each plugin opens a name it listed or
recorded earlier only as :func:`duet_core.scope.open_regular` does (``O_PATH``, type check, reopen). Here, each time
deterministically, on real loop filesystems: backup's sync pass with files swapped for fifos (and directories for
files, fifos, symlinks) between its listing and its opens, gc with its recorded representative swapped for a fifo
between runs, and ``duet restore`` asked for a fifo of a snapshot. A regression shows as a test that fails after a
timeout, never as a hung suite.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import threading
import time

import backup_helpers as bh
import pytest
from duet_backup.tree import TreeSync
from test_backup import Duet, duet, one_error  # noqa: F401 - duet: shared fixture

HANG = 30   # s: every operation here takes well under a second; one blocked on a fifo never ends


def unblock(fifos: list[str]) -> None:
    """Open each fifo for writing and close it again: a reader blocked in its open then gets end-of-file."""
    for path in fifos:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as exc:
            if exc.errno != errno.ENXIO:     # ENXIO: no reader waiting on this one
                raise


def sync_or_fail(src: str, tree: str, **kw) -> TreeSync:
    """Run a sync pass of ``src`` into ``tree`` in a thread; fail the test if it is still running after
    :data:`HANG` s (then free it: a thread blocked in ``open`` cannot be killed, and would keep the mount busy)."""
    src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    tree_fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    sync = TreeSync(src_fd, tree_fd, **kw)
    out: dict = {}

    def work():
        try:
            out["result"] = sync.run()
        except BaseException as exc:   # noqa: BLE001 - re-raised by the test
            out["error"] = exc

    worker = threading.Thread(target=work, daemon=True)
    try:
        worker.start()
        worker.join(timeout=HANG)
        hung = worker.is_alive()
        while worker.is_alive():
            unblock([os.path.join(dirpath, n) for dirpath, _, names in os.walk(src) for n in names
                     if stat.S_ISFIFO(os.lstat(os.path.join(dirpath, n)).st_mode)])
            worker.join(timeout=0.1)
    finally:
        os.close(src_fd)
        os.close(tree_fd)
    assert not hung, f"the sync pass hung for {HANG} s: it opened a fifo as data"
    if "error" in out:
        raise out["error"]
    return sync


def test_backup_sync_pass_skips_files_swapped_for_fifos_after_its_listing(btrfs_fs):
    src, tree = os.path.join(btrfs_fs.mnt, "src"), os.path.join(btrfs_fs.mnt, "tree")
    data = {f"d/f{i}": os.urandom(20_000 + 1000 * i) for i in range(6)}
    for rel, content in data.items():
        bh.write(os.path.join(src, rel), content)
    os.mkdir(tree)
    swapped: list[str] = []

    def swap_the_rest(rel: str, record) -> None:
        """At the first copy, every other file of the directory becomes a fifo: listed as a regular file, it is
        a fifo when the pass reaches it."""
        if swapped:
            return
        for other in sorted(data.keys() - {rel}):
            path = os.path.join(src, other)
            os.unlink(path)
            os.mkfifo(path, 0o644)
            swapped.append(other)

    result = sync_or_fail(src, tree, on_copy=swap_the_rest).result
    assert len(swapped) == len(data) - 1
    first = (data.keys() - set(swapped)).pop()
    assert result.errors == []
    assert result.vanished == len(swapped), result     # left out, as files deleted since the listing are
    assert sorted(result.files) == [first] and result.special == []
    assert sorted(os.listdir(os.path.join(tree, "d"))) == [first.split("/")[1]], "a half-made entry in the tree"
    with open(os.path.join(tree, first), "rb") as fh:
        assert fh.read() == data[first]
    # The next pass finds fifos there: made again with mknod, never opened (in the source nor in the tree).
    again = sync_or_fail(src, tree).result
    assert sorted(again.special) == swapped and again.errors == [] and again.vanished == 0
    for rel in swapped:
        assert stat.S_ISFIFO(os.lstat(os.path.join(tree, rel)).st_mode), rel
    assert bh.rsync_diff(src, tree) == []



def test_backup_sync_pass_leaves_out_directories_replaced_after_its_listing(btrfs_fs):
    """The same race one level up: a directory listed in its parent is a file, a fifo or a symlink when the pass
    opens it. It is left out (not a half-synced directory in the snapshot), and the pass goes on — before, it
    stopped the whole pass, so the run published no snapshot (found by the race test, made to check its snapshot)."""
    src, tree = os.path.join(btrfs_fs.mnt, "src"), os.path.join(btrfs_fs.mnt, "tree")
    bh.write(os.path.join(src, "a"), b"the root's only file: copied before any directory below is opened\n")
    kinds = ("file", "fifo", "symlink")
    for kind in kinds:
        bh.write(os.path.join(src, f"sub-{kind}", "inside"), os.urandom(5000))
    os.mkdir(tree)
    replaced: list[str] = []

    def replace_dirs(rel: str, record) -> None:
        if replaced:
            return
        for kind in kinds:
            path = os.path.join(src, f"sub-{kind}")
            subprocess.run(["rm", "-r", path], check=True)
            if kind == "file":
                bh.write(path, b"a file now\n")
            elif kind == "fifo":
                os.mkfifo(path, 0o644)
            else:
                os.symlink("/etc", path)
            replaced.append(f"sub-{kind}")

    result = sync_or_fail(src, tree, on_copy=replace_dirs).result
    assert replaced and result.errors == [], result.errors
    assert result.vanished == len(kinds) and sorted(result.files) == ["a"], result
    assert sorted(os.listdir(tree)) == ["a"], "a directory half synced is in the tree"
    assert not set(replaced) & set(result.entries), "a directory left out is recorded as synced"
    again = sync_or_fail(src, tree).result      # the next pass: each as what it is now
    assert again.errors == [] and again.vanished == 0
    assert bh.rsync_diff(src, tree) == []
    assert os.path.islink(os.path.join(tree, "sub-symlink")) and not os.path.exists(os.path.join(tree, "etc"))

@pytest.mark.bpf
def test_gc_representative_swapped_for_a_fifo_between_runs(duet, btrfs_fs):
    """gc remembers a representative per (size, hash) by its path; the next run opens that path again."""
    scope = os.path.join(btrfs_fs.mnt, "data")
    twin = os.urandom(256 << 10)
    for rel in ("a/t", "b/t"):
        bh.write(os.path.join(scope, rel), twin)
    first = duet("run", "gc", "--path", scope, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["tasks"]["gc"]["counters"]["deduped_files"] == 1
    for rel in ("a/t", "b/t"):            # whichever one is the representative now holds a fifo
        os.unlink(os.path.join(scope, rel))
        os.mkfifo(os.path.join(scope, rel), 0o644)
    for rel in ("c/t", "d/t"):
        bh.write(os.path.join(scope, rel), twin)
    bh.evict_regular(scope)
    t0 = time.monotonic()
    try:
        proc = duet("run", "gc", "--path", scope, "--json", timeout=HANG)
    except subprocess.TimeoutExpired:
        unblock([os.path.join(scope, "a/t"), os.path.join(scope, "b/t")])
        pytest.fail(f"duet run gc hung for {HANG} s: it opened the fifo at the representative's path")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    counters = json.loads(proc.stdout)["tasks"]["gc"]["counters"]
    print(f"gc with its representative swapped for a fifo: {time.monotonic() - t0:.1f} s, {counters}")
    # The fifo is a stale representative: the first new twin takes its place, the second is deduped against it.
    assert counters["stale_representatives"] == 1 and counters["deduped_files"] == 1, counters
    for rel in ("a/t", "b/t"):
        assert stat.S_ISFIFO(os.lstat(os.path.join(scope, rel)).st_mode)
    for rel in ("c/t", "d/t"):
        with open(os.path.join(scope, rel), "rb") as fh:
            assert fh.read() == twin
    c, d = (bh.physical_extents(os.path.join(scope, rel)) for rel in ("c/t", "d/t"))
    assert [e[1] for e in c] == [e[1] for e in d], "the new twins do not share their extents"


@pytest.mark.bpf
def test_restore_of_a_fifo_is_one_line_and_its_directory_restores_it(duet, btrfs_fs, ext4_fs, tmp_path):
    scope = os.path.join(btrfs_fs.mnt, "data")
    bh.write(os.path.join(scope, "p", "file"), b"restored\n")
    os.mkfifo(os.path.join(scope, "p", "fifo"), 0o640)
    name = duet.backup(scope, ext4_fs.mnt)["snapshot"]
    snap_fifo = os.path.join(ext4_fs.mnt, "snapshots", name, "p", "fifo")
    assert stat.S_ISFIFO(os.lstat(snap_fifo).st_mode)
    dest = tmp_path / "restored"
    dest.mkdir()
    try:
        proc = duet("restore", "--target", ext4_fs.mnt, "p/fifo", "--to", str(dest), timeout=HANG)
    except subprocess.TimeoutExpired:
        unblock([snap_fifo])
        pytest.fail(f"duet restore hung for {HANG} s: it opened a fifo of the snapshot as data")
    one_error(proc, 2, "p/fifo: not a file or directory in snapshot")
    assert os.listdir(dest) == []
    proc = duet("restore", "--target", ext4_fs.mnt, "p", "--to", str(dest), timeout=HANG)
    assert proc.returncode == 0, proc.stderr
    st = os.lstat(dest / "p" / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert (dest / "p" / "file").read_bytes() == b"restored\n"
