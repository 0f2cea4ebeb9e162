"""gc's deduplication through ``duet run`` on real btrfs, xfs and ext4 loop images.

What a user would check: identical files end up on the same disk blocks (``filefrag -v``: same physical extents,
``shared`` flag; ``btrfs filesystem du``: exclusive bytes gone), every file's bytes and times are unchanged, files
outside the scope are never touched, the space reported as reclaimed is the space that was, and a filesystem
without dedupe (ext4) is only reported on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import textwrap

import fsimage
import plugin_dist
import pytest
from plugin_dist import evict, excused_by_cache_drops, resident

A_SIZE = (3 << 20) + 123       # not a multiple of the block size: the tail block is shared too
B_SIZE = 1 << 20

EXTENT_LINE = re.compile(r"^\s*\d+:\s+(\d+)\.\.\s*(\d+):\s+(\d+)\.\.\s*(\d+):\s+(\d+):\s+(?:\d+:)?\s*(\S*)\s*$")


def extents(path: str) -> list[tuple[int, int, int, set[str]]]:
    """(logical block, physical block, length, flags) of each extent, as ``filefrag -v`` reports them."""
    out = subprocess.run(["filefrag", "-v", path], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        m = EXTENT_LINE.match(line)
        if m:
            found.append((int(m[1]), int(m[3]), int(m[5]), set(filter(None, m[6].split(",")))))
    assert found or os.path.getsize(path) == 0, out
    return found


def physical(path: str) -> list[tuple[int, int, int]]:
    return [(lo, ph, n) for lo, ph, n, _ in extents(path)]


def shared(path: str) -> bool:
    return any("shared" in flags for *_, flags in extents(path))


def digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def times(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


DUPLICATES = {"dup/x1": "A", "dup/x2": "A", "deep/er/x3": "A", "y1": "B", "dup/y2": "B"}
OTHERS = ["twin1", "twin2", "unique", "small1", "small2"]   # same size as B but different; unique; below min_size


def make_scope(root: str) -> tuple[str, dict[str, bytes]]:
    """The data set: two groups of identical files, same-size twins that differ, a unique file, two identical
    files below the minimum size, and a symlink to an identical file outside the scope."""
    blobs = {"A": os.urandom(A_SIZE), "B": os.urandom(B_SIZE)}
    scope = os.path.join(root, "scope")
    contents = {rel: blobs[kind] for rel, kind in DUPLICATES.items()}
    contents.update({"twin1": os.urandom(B_SIZE), "twin2": os.urandom(B_SIZE), "unique": os.urandom(2 << 20),
                     "small1": b"s" * 3000, "small2": b"s" * 3000})
    for rel, data in contents.items():
        write(os.path.join(scope, rel), data)
    write(os.path.join(root, "outside", "x"), blobs["A"])
    os.symlink(os.path.join(root, "outside", "x"), os.path.join(scope, "link-to-outside"))
    for rel in contents:
        evict(os.path.join(scope, rel))
    return scope, contents


class Duet(plugin_dist.CliRunner):
    """``duet`` as a subprocess with its own state directory and an empty config (test plugins optional)."""

    def gc(self, *args: str) -> dict:
        proc = self(*args, "--json")
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        return json.loads(proc.stdout)["tasks"]["gc"]


def btrfs_du(path: str) -> tuple[int, int, int]:
    """(total, exclusive, set shared) bytes under ``path`` per ``btrfs filesystem du``."""
    subprocess.run(["btrfs", "filesystem", "sync", path], check=True, capture_output=True)
    out = subprocess.run(["btrfs", "filesystem", "du", "--raw", "-s", path], capture_output=True, text=True,
                         check=True).stdout.splitlines()[-1].split()
    return int(out[0]), int(out[1]), int(out[2])


def snapshot_state(root: str, scope: str, contents) -> dict:
    paths = [os.path.join(scope, rel) for rel in contents] + [os.path.join(root, "outside", "x")]
    return {p: (digest(p), times(p)) for p in paths}


@pytest.fixture(params=["btrfs", "xfs"])
def dedupe_fs(request, require_root):
    with fsimage.loop_fs(request.param) as fs:
        yield fs


def test_identical_files_come_to_share_their_extents_and_nothing_else_changes(dedupe_fs, tmp_path):
    root = dedupe_fs.mnt
    scope, contents = make_scope(root)
    before = snapshot_state(root, scope, contents)
    outside_extents = physical(os.path.join(root, "outside", "x"))
    assert not any(shared(os.path.join(scope, rel)) for rel in contents)
    du_before = btrfs_du(scope) if dedupe_fs.fstype == "btrfs" else None
    duet = Duet(tmp_path)

    rep = duet.gc("run", "gc", "--path", scope)
    c = rep["counters"]
    # Planned: the files with a same-size twin at or above min_size (not "unique", not the small pair).
    assert rep["items_total"] == rep["items_done"] == 7 and rep["items_failed"] == 0
    assert c["deduped_files"] == 3 and c["duplicate_files"] == 3
    # Every file's bytes, inode, mtime and ctime are as they were (dedupe is not a write).
    assert snapshot_state(root, scope, contents) == before
    # The groups share one set of extents each; nothing else is shared.
    for kind in ("A", "B"):
        group = [os.path.join(scope, rel) for rel, k in DUPLICATES.items() if k == kind]
        assert len({tuple(physical(p)) for p in group}) == 1, kind
        assert all(shared(p) for p in group)
    for rel in OTHERS:
        assert not shared(os.path.join(scope, rel)), rel
    assert physical(os.path.join(root, "outside", "x")) == outside_extents
    assert not shared(os.path.join(root, "outside", "x"))
    # What gc reports as reclaimed is what the filesystem says it no longer holds exclusively.
    block = 4096
    expected = 2 * -(-A_SIZE // block) * block + B_SIZE
    assert c["reclaimed_bytes"] == expected
    if du_before is not None:
        total, exclusive, set_shared = btrfs_du(scope)
        assert total == du_before[0]
        assert du_before[1] - (exclusive + set_shared) == expected

    # A second run finds them shared already and reads nothing again to hash (the hashes are shared results).
    again = duet.gc("run", "gc", "--path", scope)["counters"]
    assert again.get("deduped_files", 0) == 0 and again.get("reclaimed_bytes", 0) == 0
    assert again["already_shared_files"] == 3
    assert again["hash_reused_files"] == 7 and "hashed_files" not in again
    assert snapshot_state(root, scope, contents) == before


@excused_by_cache_drops
def test_a_representative_stays_cached_until_its_twin_is_compared(btrfs_fs, tmp_path):
    """The kernel's compare reads both files: the representative, read moments before by the run, is still cached
    when its twin comes (not read a second time from the device), and nothing is left cached after the run."""
    scope = os.path.join(btrfs_fs.mnt, "scope")
    data = os.urandom(8 << 20)
    for rel in ("a", "b"):
        write(os.path.join(scope, rel), data)
        evict(os.path.join(scope, rel))
    proc = Duet(tmp_path)("run", "gc", "--path", scope, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["tasks"]["gc"]["counters"]["deduped_files"] == 1
    # Each file read once: 16 MiB (and some metadata), not 24 MiB.
    assert 2 * len(data) <= summary["device_read_bytes"] < 2.25 * len(data), summary["device_read_bytes"]
    assert [rel for rel in ("a", "b") if resident(os.path.join(scope, rel))] == []


def test_ext4_is_only_reported_on(ext4_fs, tmp_path):
    root = ext4_fs.mnt
    scope, contents = make_scope(root)
    before = snapshot_state(root, scope, contents)
    layout = {rel: physical(os.path.join(scope, rel)) for rel in contents}
    rep = Duet(tmp_path).gc("run", "gc", "--path", scope)
    c = rep["counters"]
    assert c["duplicate_files"] == 3 and c["reclaimable_bytes"] == 2 * A_SIZE + B_SIZE
    assert "deduped_files" not in c and "reclaimed_bytes" not in c
    assert snapshot_state(root, scope, contents) == before
    assert {rel: physical(os.path.join(scope, rel)) for rel in contents} == layout
    assert not any(shared(os.path.join(scope, rel)) for rel in contents)


# Test tasks that run before gc on the same file: "hasher" publishes the whole-file blake3 as any task reading a
# whole file does; "toucher" publishes it too and then rewrites files named "touch*" (same size, new bytes) — a
# write that lands between the moment gc's hash was computed and gc's dedupe.
HELPERS = textwrap.dedent('''
    import os

    import blake3

    from duet_core import TaskSpec, hookimpl


    def publish(ctx):
        h, off = blake3.blake3(), 0
        while chunk := os.pread(ctx.fd, 1 << 20, off):
            h.update(chunk)
            off += len(chunk)
        ctx.shared.put(ctx.file, "blake3", h.hexdigest())


    class Hasher:
        @hookimpl
        def duet_task(self):
            return TaskSpec("hasher", "publishes blake3 of every file")

        @hookimpl
        def duet_process(self, ctx):
            publish(ctx)


    class Toucher:
        @hookimpl
        def duet_task(self):
            return TaskSpec("toucher", "publishes blake3, then rewrites touch* files")

        @hookimpl
        def duet_process(self, ctx):
            publish(ctx)
            if os.path.basename(ctx.file.relpath).startswith("touch"):
                fd = os.open(ctx.path, os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    os.pwrite(fd, os.urandom(ctx.file.size), 0)
                finally:
                    os.close(fd)


    hasher = Hasher()
    toucher = Toucher()
''')


def helpers_dist() -> plugin_dist.Dist:
    return plugin_dist.Dist("duet-test-gc-helpers", "0.1", {"duet_test_gc_helpers": HELPERS},
                            {"hasher": "duet_test_gc_helpers:hasher", "toucher": "duet_test_gc_helpers:toucher"})


def test_gc_reuses_the_hash_another_task_of_the_run_computed(btrfs_fs, tmp_path):
    scope, contents = make_scope(btrfs_fs.mnt)
    proc = Duet(tmp_path, helpers_dist())("run", "hasher", "gc", "--path", scope, "--json")
    assert proc.returncode == 0, proc.stderr
    c = json.loads(proc.stdout)["tasks"]["gc"]["counters"]
    assert c["hash_reused_files"] == 7 and "hashed_files" not in c
    assert c["deduped_files"] == 3


@excused_by_cache_drops
def test_a_file_written_after_it_was_hashed_is_left_alone(btrfs_fs, tmp_path):
    scope = os.path.join(btrfs_fs.mnt, "scope")
    data = os.urandom(A_SIZE)
    write(os.path.join(scope, "a"), data)
    write(os.path.join(scope, "touch-b"), data)
    evict(os.path.join(scope, "touch-b"))
    with open(os.path.join(scope, "a"), "rb") as fh:   # cached: gc takes it first, as the representative
        fh.read()
    proc = Duet(tmp_path, helpers_dist())("run", "toucher", "gc", "--path", scope, "--json")
    assert proc.returncode == 0, proc.stderr
    c = json.loads(proc.stdout)["tasks"]["gc"]["counters"]
    # gc noticed the change itself (re-stat before the ioctl); it did not leave it to the kernel's compare.
    assert c["changed_before_dedupe"] == 1
    assert "deduped_files" not in c and "differed_files" not in c
    assert "touch-b changed since it was hashed" in proc.stderr
    assert digest(os.path.join(scope, "a")) == hashlib.sha256(data).hexdigest()
    assert digest(os.path.join(scope, "touch-b")) != hashlib.sha256(data).hexdigest()
    assert not shared(os.path.join(scope, "a")) and not shared(os.path.join(scope, "touch-b"))


def test_a_representative_changed_since_an_earlier_run_is_not_used(btrfs_fs, tmp_path):
    scope = os.path.join(btrfs_fs.mnt, "scope")
    old = os.urandom(B_SIZE)
    write(os.path.join(scope, "a"), old)
    write(os.path.join(scope, "other"), os.urandom(B_SIZE))      # a same-size twin, so "a" is hashed
    duet = Duet(tmp_path)
    first = duet.gc("run", "gc", "--path", scope)["counters"]
    assert first["hashed_files"] == 2 and "deduped_files" not in first
    # "a" is rewritten with the same size and its mtime put back; only its ctime tells. A new file holds a's old
    # bytes: its hash matches a's recorded one, but "a" is no longer that version.
    st = os.stat(os.path.join(scope, "a"))
    new = os.urandom(B_SIZE)
    with open(os.path.join(scope, "a"), "r+b") as fh:
        fh.write(new)
    os.utime(os.path.join(scope, "a"), ns=(st.st_atime_ns, st.st_mtime_ns))
    write(os.path.join(scope, "b"), old)
    second = duet.gc("run", "gc", "--path", scope)["counters"]
    assert "deduped_files" not in second and "differed_files" not in second
    assert second["stale_representatives"] >= 1
    assert digest(os.path.join(scope, "a")) == hashlib.sha256(new).hexdigest()
    assert digest(os.path.join(scope, "b")) == hashlib.sha256(old).hexdigest()
    assert not shared(os.path.join(scope, "a")) and not shared(os.path.join(scope, "b"))


def test_dedupe_false_leaves_the_scope_alone_and_runs_retention_only(btrfs_fs, tmp_path):
    scope, contents = make_scope(btrfs_fs.mnt)
    target = os.path.join(btrfs_fs.mnt, "target")
    for n in ("2026-11-24T000000Z", "2026-11-25T000000Z"):
        os.makedirs(os.path.join(target, "snapshots", n))
    layout = {rel: physical(os.path.join(scope, rel)) for rel in contents}
    rep = Duet(tmp_path).gc("run", "gc", "--path", scope, "--dedupe", "false", "--target", target,
                            "--keep-last", "1", "--prune")
    assert rep["items_total"] == 0 and rep["counters"] == {}
    assert rep["retention"]["removed"] == ["2026-11-24T000000Z"]
    assert os.listdir(os.path.join(target, "snapshots")) == ["2026-11-25T000000Z"]
    assert {rel: physical(os.path.join(scope, rel)) for rel in contents} == layout


def test_plan_takes_files_with_a_same_size_twin_also_files_that_appear_during_the_run():
    from duet_gc import Gc

    from duet_core.events import FileId
    from duet_core.tasks import FileInfo, RunInfo

    def info(i, size):
        return FileInfo(i, FileId(1, 0, 100 + i), f"f{i}", size, 0, 0)

    scanned = [info(1, 8192), info(2, 8192), info(3, 5000), info(4, 100), info(5, 100), info(6, 0), info(7, 0)]
    gc = Gc()
    run = RunInfo(1, "/scope", "gc", {"dedupe": True, "min_size": 4096}, files=lambda: iter(scanned))
    assert sorted(gc.duet_plan(run=run, files=scanned)) == [1, 2]       # unique sizes and small files are not read
    assert gc.duet_plan(run=run, files=[info(8, 5000)]) == [8]           # a twin of f3 appeared during the run
    assert gc.duet_plan(run=run, files=[info(9, 7777)]) == []
    off = RunInfo(2, "/scope", "gc", {"dedupe": False}, files=lambda: iter(scanned))
    assert gc.duet_plan(run=off, files=scanned) == []
