"""A run's start-up (issue #3): the start-up snapshot limited to the files some task still needs, and a scope's
first scan written straight into the state store. On real loop filesystems with the real BPF programs."""

from __future__ import annotations

import os

import pytest
from plugin_dist import evict_tree, make_dataset, read_log
from test_engine import cold_read, evict, write_file
from test_framework import M, direct_fs, registry, run_tasks, scan_order  # noqa: F401 - direct_fs is a fixture

from duet_core.engine import Engine
from duet_core.events import PAGE_SIZE, Event
from duet_core.identity import file_id
from duet_core.scheduler import EXIT_OK, EXIT_STOPPED
from duet_core.scope import Scope
from duet_core.state import StateStore
from duet_core.testing import cached_pages

pytestmark = pytest.mark.bpf


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


def exists_pages(batch) -> dict:
    out: dict = {}
    for it in batch.items:
        if it.flags & Event.EXISTS:
            out.setdefault(it.fid, set()).update(range(it.index, it.index + it.count))
    return out


def test_a_registration_reads_the_files_it_names_and_reports_all_it_knows(ext4_fs, bpf_required):
    root = os.path.join(ext4_fs.mnt, "data")
    os.makedirs(root)
    a, b = os.path.join(root, "a"), os.path.join(root, "b")
    for p in (a, b):
        write_file(p, 1 << 20)
        evict(p)
        cold_read(p, 64 * PAGE_SIZE)
    assert cached_pages(a) and cached_pages(b), "the reads left nothing cached"
    with Engine(source="bpf") as engine:
        scope = Scope(root)
        for _ in scope.scan():
            pass
        first = engine.register("t", Event.EXISTS, root, scope=scope, snapshot=[(file_id(a), "a")])
        assert exists_pages(engine.fetch(first)) == {file_id(a): cached_pages(a)}   # b was not named: not read
        # A second state registration that reads nothing is still told of what the engine knows is cached.
        second = engine.register("u", Event.EXISTS, root, scope=scope, snapshot=())
        assert exists_pages(engine.fetch(second)) == {file_id(a): cached_pages(a)}


def test_the_whole_scope_pass_opens_only_the_regular_files_the_walk_saw(ext4_fs):
    m = ext4_fs.mnt
    root = os.path.join(m, "scope")
    for d in ("d", "e"):
        os.makedirs(os.path.join(root, d))
    names = ["d/a", "d/b", "d/c", "e/f", "e/g"]
    for rel in names:
        write_file(os.path.join(root, rel), 4096, sync=False)
    write_file(os.path.join(m, "secret"), 4096, sync=False)
    scope = Scope(root)
    walked = {f.relpath: f.fid for f in scope.scan()}
    # Between the walk and the pass: b becomes a symlink out of the scope, c a fifo, f another file, g is gone.
    os.unlink(os.path.join(root, "d/b"))
    os.symlink(os.path.join(m, "secret"), os.path.join(root, "d/b"))
    os.unlink(os.path.join(root, "d/c"))
    os.mkfifo(os.path.join(root, "d/c"))
    write_file(os.path.join(root, "e/f.new"), 4096, sync=False)
    os.rename(os.path.join(root, "e/f.new"), os.path.join(root, "e/f"))
    os.unlink(os.path.join(root, "e/g"))
    opened = []
    for fid, fd in scope.open_all():
        st = os.fstat(fd)
        opened.append((fid, st.st_ino, os.readlink(f"/proc/self/fd/{fd}")))
    assert opened == [(walked["d/a"], walked["d/a"].ino, os.path.join(root, "d/a"))]
