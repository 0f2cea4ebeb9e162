"""A run's start-up (issue #3): the start-up snapshot taken during a scope's first walk, the snapshot of a resumed
round limited to the files still pending, and the first scan written straight into the state store.

Everything on real loop filesystems with the real BPF programs; cached pages are checked against mincore's truth.
"""

from __future__ import annotations

import os

import pytest
from fsimage import btrfs_subvol
from plugin_dist import evict_tree, make_dataset, read_log
from test_engine import cold_read, evict, write_file
from test_framework import M, direct_fs, registry, run_tasks, scan_order  # noqa: F401 - direct_fs is a fixture

from duet_core import residency
from duet_core.engine import Engine
from duet_core.events import Event, FileId
from duet_core.identity import file_id
from duet_core.scheduler import EXIT_OK, EXIT_STOPPED
from duet_core.scope import Scope
from duet_core.state import StateStore

pytestmark = pytest.mark.bpf


def truth(path: str) -> set[int]:
    """The pages of ``path`` in the page cache now (mincore/cachestat)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return set(residency.resident_pages(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


class Recorder:
    """A probe that records what :meth:`Scope.scan` tells it, and what it was handed."""

    def __init__(self):
        self.calls: list[tuple] = []

    def pair(self, key):
        self.calls.append(("pair", key))

    def file(self, fid, fd):
        st = os.fstat(fd)
        self.calls.append(("file", fid, st.st_ino, os.readlink(f"/proc/self/fd/{fd}")))


def test_a_probed_walk_hands_over_each_regular_file_once_after_its_pair(btrfs_fs):
    m = btrfs_fs.mnt
    root = f"{m}/root"
    os.makedirs(root)
    write_file(f"{root}/a", 4096)
    btrfs_subvol(f"{root}/sub")
    write_file(f"{root}/sub/b", 4096)
    os.link(f"{root}/a", f"{root}/a-link")          # one file, two names: handed over once
    os.makedirs(f"{m}/outside")
    write_file(f"{m}/outside/secret", 4096)
    os.symlink(f"{m}/outside/secret", f"{root}/to-secret")
    os.symlink(f"{m}/outside", f"{root}/to-outside")
    os.mkfifo(f"{root}/fifo")

    probe = Recorder()
    scanned = list(Scope(root).scan(probe))
    files = [c for c in probe.calls if c[0] == "file"]
    got = {c[1] for c in files}
    assert got == {f.fid for f in scanned} == {file_id(f"{root}/a"), file_id(f"{root}/sub/b")}
    # Each was handed over open on the right inode, at a path inside the scope, and after its pair was announced.
    for _, fid, ino, where in files:
        assert ino == fid.ino and where.startswith(root + "/")
        first_file = probe.calls.index(next(c for c in files if c[1] == fid))
        assert ("pair", (fid.dev, fid.subvol)) in probe.calls[:first_file]
    assert not any("outside" in c[3] for c in files)   # symlinks out of the scope are never opened


def test_the_walk_s_snapshot_misses_no_page_cached_before_or_while_it_ran(ext4_fs, bpf_required):
    root = os.path.join(ext4_fs.mnt, "data")
    os.makedirs(root)
    paths = [os.path.join(root, f"f{i}") for i in range(6)]
    for p in paths:
        write_file(p, 256 << 10)
        evict(p)
    cold_read(paths[0])                        # cached before the run
    with Engine(source="bpf") as engine:
        scope = Scope(root)
        walked = [found.relpath for found in engine.scan(scope, Event.EXISTS)]
        later = os.path.join(root, next(r for r in walked if os.path.join(root, r) != paths[0]))
        cold_read(later)                       # after the walk read its residency, before the registration
        reg = engine.register("t", Event.EXISTS, root, scope=scope, snapshot=())
        engine.pump(force=True)
        batch = engine.fetch(reg)
    exists: dict[FileId, set[int]] = {}
    for it in batch.items:
        if it.flags & Event.EXISTS:
            exists.setdefault(it.fid, set()).update(range(it.index, it.index + it.count))
    expect = {file_id(p): truth(p) for p in {paths[0], later}}
    assert all(expect.values()), "the reads left nothing cached"
    assert exists == expect


@pytest.mark.usefixtures("bpf_required")
def test_a_resumed_round_takes_the_pending_file_cached_since_first_and_from_the_cache(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=8, sizes=(64 << 10,))
    reg = registry(M.ReaderTask("slow", sleep=0.2))
    log = tmp_path / "log"
    first, code = run_tasks(tmp_path / "state", reg, ["slow"], scope, log=log, budget_s=0.5)
    assert code == EXIT_STOPPED and 0 < first["tasks"]["slow"]["items_done"] < len(files)
    done = {e.relpath for e in read_log(log)}
    evict_tree(scope)
    hot = [rel for rel in scan_order(scope) if rel not in done][-1]   # the last pending one in scan order
    cold_read(os.path.join(scope, hot))
    second, code = run_tasks(tmp_path / "state", reg, ["slow"], scope, log=log)
    assert code == EXIT_OK
    resumed = [e.relpath for e in read_log(log)][len(done):]
    assert resumed[0] == hot and sorted(resumed) == sorted(set(files) - done)
    assert second["tasks"]["slow"]["bytes_from_cache"] == files[hot]


def test_the_first_scan_is_stored_in_scan_order_and_later_scans_keep_the_ids(ext4_fs, tmp_path):
    root = os.path.join(ext4_fs.mnt, "data")
    for d in ("d0", "d1"):
        os.makedirs(os.path.join(root, d))
    for i in range(5):
        write_file(os.path.join(root, f"d{i % 2}", f"f{i}"), 100 + i, sync=False)
    store = StateStore(str(tmp_path / "state"))
    sid = store.scope_id(root)
    first = list(Scope(root).scan())
    store.sync_files(sid, first)
    ids = {f.relpath: f.id for f in store.files(sid)}
    assert list(ids) == [f.relpath for f in first] and list(ids.values()) == list(range(5))
    assert list(store.all_ids(sid)) == list(range(5))
    stored = {f.relpath: (f.fid, f.size) for f in store.files(sid)}
    assert stored == {f.relpath: (f.fid, f.size) for f in first}

    gone = first[1].relpath
    write_file(os.path.join(root, "d0", "new"), 7, sync=False)   # before the unlink: not the same inode number
    os.unlink(os.path.join(root, gone))
    store.sync_files(sid, Scope(root).scan())
    again = {f.relpath: f.id for f in store.files(sid)}
    assert again == {**{r: i for r, i in ids.items() if r != gone}, "d0/new": 5}
    assert list(store.all_ids(sid)) == sorted(again.values())   # no longer one run of ids
    store.close()
