"""The event engine on the real kernel: real BPF programs, real btrfs and ext4 images, real I/O.

Every count is checked against what the test did to the page cache (or against the kernel's own trace), never
against the engine's own idea of it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from fsimage import btrfs_snapshot, btrfs_subvol

from duet_core import residency
from duet_core.engine import Engine
from duet_core.events import EVENTS, PAGE_SIZE, Event, FileId
from duet_core.identity import file_id, inode_generation
from duet_core.testing import cached_pages, evict_file

pytestmark = pytest.mark.bpf


def write_file(path: str, size: int, sync: bool = True) -> None:
    with open(path, "wb") as fh:
        fh.write(os.urandom(size))
        if sync:
            fh.flush()
            os.fsync(fh.fileno())


evict = evict_file   # every page, tried again briefly while one is left


def cold_read(path: str, length: int | None = None) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, length if length is not None else os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def pages_by(batch_items, flag: Event) -> dict[FileId, set[int]]:
    out: dict[FileId, set[int]] = {}
    for it in batch_items:
        if it.flags & flag:
            out.setdefault(it.fid, set()).update(range(it.index, it.index + it.count))
    return out


def settle(engine: Engine, reg, seconds: float = 0.3):
    """Let in-flight events land, then fetch everything."""
    time.sleep(seconds)
    engine.pump(force=True)
    return engine.fetch(reg)


@pytest.fixture
def engine(bpf_required):
    with Engine(source="bpf") as eng:
        yield eng


@pytest.mark.parametrize("fs", ["btrfs_fs", "ext4_fs"])
def test_cold_read_adds_every_page_and_evict_removes_them(request, fs, engine):
    mnt = request.getfixturevalue(fs).mnt
    path = os.path.join(mnt, "data.bin")
    size = 8 << 20
    write_file(path, size)
    evict(path)
    reg = engine.register("t", Event.ADDED | Event.REMOVED, mnt)
    settle(engine, reg)  # drop whatever the set-up left behind
    cold_read(path)
    batch = settle(engine, reg)
    fid = file_id(path)
    assert pages_by(batch.items, Event.ADDED) == {fid: set(range(size // PAGE_SIZE))}
    assert not batch.resync
    # The kernel may reclaim a page or two on its own before the eviction (DAMON's pageout runs on these
    # machines): those are REMOVED already, in the batch above. Every page is removed exactly once.
    early = pages_by(batch.items, Event.REMOVED).get(fid, set())
    evict(path)
    batch = settle(engine, reg)
    late = pages_by(batch.items, Event.REMOVED).get(fid, set())
    assert early | late == set(range(size // PAGE_SIZE)) and not early & late, \
        (sorted(early), len(late), sorted(cached_pages(path)))
    assert len(early) < 64, sorted(early)     # reclaim took a few pages, not the eviction's work
    assert engine.path_of(reg, fid) == path


@pytest.mark.parametrize("fs", ["btrfs_fs", "ext4_fs"])
def test_write_is_dirtied_then_flushed_on_fsync(request, fs, engine):
    """The kernel dirties whole folios: exactly the written pages on btrfs (no large folios for data here), the
    folios around them on ext4. Either way, what was dirtied is what fsync flushes."""
    mnt = request.getfixturevalue(fs).mnt
    path = os.path.join(mnt, "w.bin")
    write_file(path, 1 << 20)
    reg = engine.register("t", Event.DIRTIED | Event.FLUSHED, mnt)
    settle(engine, reg)
    written = set(range(32, 48))
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * (16 * PAGE_SIZE), 32 * PAGE_SIZE)
        batch = settle(engine, reg)
        fid = file_id(path)
        dirtied = pages_by(batch.items, Event.DIRTIED)
        assert set(dirtied) == {fid} and dirtied[fid] >= written
        if fs == "btrfs_fs":
            assert dirtied[fid] == written
        assert pages_by(batch.items, Event.FLUSHED) == {}
        os.fsync(fd)
    finally:
        os.close(fd)
    batch = settle(engine, reg)
    assert pages_by(batch.items, Event.FLUSHED) == dirtied


def test_reads_of_this_process_and_of_the_run_s_other_process_are_not_added(btrfs_fs, bpf_required):
    # duet run skips its own reads; with --jobs 2 each of its two processes also skips the other's.
    mnt = btrfs_fs.mnt
    paths = {n: os.path.join(mnt, n) for n in ("own", "other", "stranger")}
    for p in paths.values():
        write_file(p, 64 * PAGE_SIZE)
        evict(p)
    reader = "import os, sys\nsys.stdin.readline()\nfd = os.open(sys.argv[1], os.O_RDONLY)\nos.pread(fd, 1 << 20, 0)\n"
    other = subprocess.Popen([sys.executable, "-c", reader, paths["other"]], stdin=subprocess.PIPE)
    try:
        with Engine(source="bpf", skip_own_reads=True, skip_reads_of=other.pid) as eng:
            reg = eng.register("t", Event.ADDED, mnt)
            settle(eng, reg)
            cold_read(paths["own"])
            other.communicate(b"go\n", timeout=30)
            subprocess.run(["cat", paths["stranger"]], stdout=subprocess.DEVNULL, check=True, timeout=30)
            added = pages_by(settle(eng, reg).items, Event.ADDED)
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    assert cached_pages(paths["own"]) and cached_pages(paths["other"])     # all three were read ...
    assert set(added) == {file_id(paths["stranger"])}                      # ... only a stranger's reads are told
    assert len(added[file_id(paths["stranger"])]) >= 60


def test_exists_and_modified_states_cancel(btrfs_fs, engine):
    mnt = btrfs_fs.mnt
    a, b = os.path.join(mnt, "a"), os.path.join(mnt, "b")
    write_file(a, 256 * 1024)
    write_file(b, 256 * 1024)
    evict(a)
    evict(b)
    reg = engine.register("t", Event.EXISTS | Event.MODIFIED, mnt)
    settle(engine, reg)
    fa, fb = file_id(a), file_id(b)
    cold_read(a)
    batch = settle(engine, reg)
    # What the kernel has cached of a: all 64 pages read, unless it reclaimed one meanwhile (DAMON's pageout runs on
    # these machines; a fresh run once saw page 27 go).
    cached = cached_pages(a)
    assert pages_by(batch.items, Event.EXISTS) == {fa: cached} and len(cached) >= 60
    # b: added then removed between two fetches -> nothing to report.
    cold_read(b)
    time.sleep(0.25)
    engine.pump(force=True)
    evict(b)
    batch = settle(engine, reg)
    assert [it for it in batch.items if it.fid == fb] == []
    # a: dirtied and flushed between fetches -> MODIFIED cancels out.
    fd = os.open(a, os.O_RDWR)
    try:
        os.pwrite(fd, b"y" * PAGE_SIZE, 0)
        time.sleep(0.25)
        engine.pump(force=True)
        os.fsync(fd)
        batch = settle(engine, reg)
        assert pages_by(batch.items, Event.MODIFIED) == {}
        # Dirtied and not flushed: MODIFIED holds, and ends (a clear bit) after fsync.
        os.pwrite(fd, b"z" * PAGE_SIZE, 5 * PAGE_SIZE)
        batch = settle(engine, reg)
        assert pages_by(batch.items, Event.MODIFIED) == {fa: {5}}
        os.fsync(fd)
    finally:
        os.close(fd)
    batch = settle(engine, reg)
    # MODIFIED ended on page 5, which still exists, as the item says. A page the kernel reclaimed meanwhile (DAMON
    # pages out cold memory here) shows as existing no more: checked against the kernel, not counted as an end of
    # MODIFIED.
    ended = [it for it in batch.items if not it.flags & Event.MODIFIED and it.flags & Event.EXISTS]
    assert [(it.fid, it.index, it.count) for it in ended] == [(fa, 5, 1)]
    gone = {i for it in batch.items if not it.flags & (Event.MODIFIED | Event.EXISTS)
            for i in range(it.index, it.index + it.count)}
    assert all(it.fid == fa for it in batch.items) and not gone & ({5} | cached_pages(a)), batch.items


def test_startup_snapshot_reports_cached_files_as_exists(ext4_fs, engine):
    path = os.path.join(ext4_fs.mnt, "hot")
    write_file(path, 1 << 20)
    evict(path)
    cold_read(path, 64 * PAGE_SIZE)   # readahead may bring more: compare with mincore's truth
    fd = os.open(path, os.O_RDONLY)
    truth = set(residency.resident_pages(fd, 1 << 20))
    os.close(fd)
    assert truth, "the read left nothing cached"
    reg = engine.register("t", Event.EXISTS, ext4_fs.mnt)
    batch = engine.fetch(reg)
    assert pages_by(batch.items, Event.EXISTS) == {file_id(path): truth}


def test_subvolumes_and_snapshot_sharing_an_inode_number_stay_apart(btrfs_fs, engine):
    mnt = btrfs_fs.mnt
    btrfs_subvol(os.path.join(mnt, "sv1"))
    btrfs_subvol(os.path.join(mnt, "sv1", "nested"))
    for d in ("sv1", "sv1/nested"):
        write_file(os.path.join(mnt, d, "f"), 256 * 1024)
    btrfs_snapshot(os.path.join(mnt, "sv1"), os.path.join(mnt, "snap"))
    paths = [os.path.join(mnt, p) for p in ("sv1/f", "sv1/nested/f", "snap/f")]
    fids = [file_id(p) for p in paths]
    assert len({f.ino for f in fids}) == 1 and len(set(fids)) == 3
    for p in paths:
        evict(p)
    reg = engine.register("t", EVENTS, mnt)
    settle(engine, reg)
    cold_read(paths[2])   # only the snapshot's copy
    batch = settle(engine, reg)
    assert pages_by(batch.items, Event.ADDED) == {fids[2]: set(range(64))}
    assert engine.path_of(reg, fids[2]) == paths[2]
    cold_read(paths[1])
    batch = settle(engine, reg)
    assert pages_by(batch.items, Event.ADDED) == {fids[1]: set(range(64))}
    assert engine.path_of(reg, fids[1]) == paths[1]


def test_files_outside_the_scope_produce_nothing(btrfs_fs, ext4_fs, engine):
    inside = os.path.join(btrfs_fs.mnt, "in")
    os.mkdir(inside)
    paths = {"in": os.path.join(inside, "f"), "sibling": os.path.join(btrfs_fs.mnt, "out"),
             "otherfs": os.path.join(ext4_fs.mnt, "f")}
    for p in paths.values():
        write_file(p, 128 * 1024)
        evict(p)
    reg = engine.register("t", EVENTS, inside)
    settle(engine, reg)
    for p in paths.values():
        cold_read(p)
    batch = settle(engine, reg)
    assert set(pages_by(batch.items, Event.ADDED)) == {file_id(paths["in"])}
    # The sibling was seen once in the kernel (same subvolume), found outside the scope and ignored there.
    time.sleep(1.1)
    engine.pump(force=True)
    before = engine.stats()["kernel_ignored"]
    evict(paths["sibling"])
    cold_read(paths["sibling"])
    batch = settle(engine, reg)
    # Nothing of the sibling. (The file in scope may lose a page meanwhile: DAMON's pageout runs on these
    # machines, and a fresh run once saw one REMOVED of it here. Its REMOVED is in scope; an ADDED would not be.)
    assert [i for i in batch.items if i.fid != file_id(paths["in"]) or i.flags & Event.ADDED] == []
    assert engine.stats()["kernel_ignored"] > before


def test_new_file_in_scope_is_picked_up(btrfs_fs, engine):
    reg = engine.register("t", Event.ADDED, btrfs_fs.mnt)
    path = os.path.join(btrfs_fs.mnt, "late")
    write_file(path, 64 * 1024)
    evict(path)
    settle(engine, reg)
    cold_read(path)
    time.sleep(1.2)    # a rescan may wait up to a second after an unknown file shows up
    engine.pump(force=True)
    batch = settle(engine, reg)
    assert pages_by(batch.items, Event.ADDED) == {file_id(path): set(range(16))}


def test_new_file_written_and_fsynced_is_dirtied_and_flushed(btrfs_fs, engine):
    """A new file's DIRTIED and FLUSHED arrive before the engine knows the file; neither may be lost."""
    reg = engine.register("t", Event.DIRTIED | Event.FLUSHED | Event.MODIFIED, btrfs_fs.mnt)
    path = os.path.join(btrfs_fs.mnt, "new")
    write_file(path, 40 * PAGE_SIZE, sync=True)
    time.sleep(1.2)
    engine.pump(force=True)
    batch = settle(engine, reg)
    fid = file_id(path)
    assert pages_by(batch.items, Event.DIRTIED) == {fid: set(range(40))}
    assert pages_by(batch.items, Event.FLUSHED) == {fid: set(range(40))}
    assert pages_by(batch.items, Event.MODIFIED) == {}


def test_overflow_is_counted_and_turned_into_a_resync(bpf_required, btrfs_fs):
    path = os.path.join(btrfs_fs.mnt, "big")
    write_file(path, 16 << 20)   # 4096 pages = 8 chunks of 512, into a merge map of 4 entries
    evict(path)
    with Engine(source="bpf", merge_entries=4) as engine:
        reg = engine.register("t", Event.ADDED | Event.EXISTS, btrfs_fs.mnt)
        engine.fetch(reg)
        cold_read(path)
        batch = settle(engine, reg)
        assert batch.resync
        stats = engine.stats()
        assert stats["kernel_lost_map"] > 0
        # Delivered + lost add up to what the kernel generated: nothing went missing silently. (Removals count
        # too: the kernel may reclaim a page meanwhile — DAMON's pageout runs on these machines.)
        added = sum(len(p) for p in pages_by(batch.items, Event.ADDED).values())
        removed = engine.counters["pages_removed"]
        assert added + removed + stats["kernel_lost_map"] == stats["kernel_pages"] >= 4096
        # After the resync, EXISTS is the truth again: what the kernel has cached of the file.
        cached = cached_pages(path)
        assert pages_by(batch.items, Event.EXISTS)[file_id(path)] == cached
        # The read added every page at least once (A >= 4096 of the kernel's A + R pages); a page not cached now
        # was removed, and its REMOVED is in the kernel's count even when the full map lost it (it failed once with
        # 4,095 cached and no removal delivered): cached = A - R, so cached >= 2 * 4096 - (A + R).
        assert len(cached) >= 2 * 4096 - stats["kernel_pages"]


def test_chunks_whose_table_slot_is_taken_go_to_the_hash_map(bpf_required, btrfs_fs):
    """The kernel merges in a direct-mapped table of chunk slots first and in the hash map when a chunk's slot
    holds another chunk. A table of 16 slots and a file of 32 chunks: half the chunks collide, and every page
    still arrives, none lost, no resync."""
    path = os.path.join(btrfs_fs.mnt, "wide")
    write_file(path, 64 << 20)   # 16,384 pages = 32 chunks of 512
    evict(path)
    with Engine(source="bpf", merge_entries=64) as engine:
        assert engine.source.bpf.slots == 16
        reg = engine.register("t", Event.ADDED, btrfs_fs.mnt)
        engine.fetch(reg)
        cold_read(path)
        batch = settle(engine, reg)
        stats = engine.stats()
        assert stats["kernel_collisions"] > 0
        assert stats["kernel_lost_map"] == 0 and not batch.resync
        cached = cached_pages(path)
        assert len(cached) >= 16384 - 64      # the kernel may reclaim a page meanwhile (DAMON)
        assert pages_by(batch.items, Event.ADDED)[file_id(path)] >= cached


def test_page_counts_equal_the_kernels_own_trace(ext4_fs, engine, tracefs):
    """ext4 uses large folios: one event can stand for up to 512 pages; both sides must weigh them the same."""
    path = os.path.join(ext4_fs.mnt, "traced")
    write_file(path, 16 << 20)
    evict(path)
    fid = file_id(path)
    reg = engine.register("t", Event.ADDED, ext4_fs.mnt)
    settle(engine, reg)
    with tracefs.event("filemap/mm_filemap_add_to_page_cache", f"i_ino == {fid.ino}") as trace:
        cold_read(path)
        batch = settle(engine, reg)
    traced = trace.pages(fid)
    ours = pages_by(batch.items, Event.ADDED).get(fid, set())
    assert trace.overrun == 0
    assert traced == ours == set(range(4096))
    assert trace.events < 4096, "expected large folios on ext4"


def test_reused_inode_number_is_not_ignored_with_the_file_that_had_it(ext4_fs, engine):
    """ext4 hands a deleted file's inode number to the next new file. The kernel ignores an out-of-scope file by
    (inode, generation), so a new file in scope that reuses the number is still reported."""
    inside, outside = os.path.join(ext4_fs.mnt, "in"), os.path.join(ext4_fs.mnt, "out")
    os.mkdir(inside)
    os.mkdir(outside)
    reg = engine.register("t", Event.ADDED, inside)
    old = os.path.join(outside, "tmp")
    write_file(old, 16 * PAGE_SIZE)
    evict(old)
    cold_read(old)
    time.sleep(1.2)
    engine.pump(force=True)        # unknown -> rescan -> outside the scope -> ignored in the kernel
    engine.pump(force=True)
    assert engine.stats()["unknown_ignored"] >= 1
    ino = os.stat(old).st_ino
    os.unlink(old)
    new = os.path.join(inside, "new")
    write_file(new, 16 * PAGE_SIZE)
    if os.stat(new).st_ino != ino:
        pytest.skip("ext4 did not reuse the inode number this time")
    evict(new)
    settle(engine, reg)
    cold_read(new)
    time.sleep(1.2)
    engine.pump(force=True)
    batch = settle(engine, reg)
    assert pages_by(batch.items, Event.ADDED) == {file_id(new): set(range(16))}


def test_registrations_share_one_program_but_each_sees_its_scope_and_mask(btrfs_fs, engine):
    a_dir = os.path.join(btrfs_fs.mnt, "a")
    os.mkdir(a_dir)
    fa, fb = os.path.join(a_dir, "f"), os.path.join(btrfs_fs.mnt, "g")
    for p in (fa, fb):
        write_file(p, 32 * PAGE_SIZE)
        evict(p)
    only_a = engine.register("a", Event.ADDED, a_dir)
    everything = engine.register("all", Event.REMOVED, btrfs_fs.mnt)
    assert only_a.scope is not everything.scope
    settle(engine, only_a)
    engine.fetch(everything)
    cold_read(fa)
    cold_read(fb)
    batch_a = settle(engine, only_a)
    assert pages_by(batch_a.items, Event.ADDED) == {file_id(fa): set(range(32))}
    # The reads are not "all"'s to see (its mask is REMOVED). A page the kernel reclaims meanwhile is (DAMON pages
    # out cold memory here): it then counts with the evictions below, where it is not removed a second time.
    early = engine.fetch(everything).items
    assert all(it.flags == Event.REMOVED for it in early), early
    evict(fa)
    evict(fb)
    time.sleep(0.3)
    engine.pump(force=True)
    assert engine.fetch(only_a).items == []
    removed = pages_by(early + engine.fetch(everything).items, Event.REMOVED)
    assert removed == {file_id(fa): set(range(32)), file_id(fb): set(range(32))}
    engine.unregister(only_a)
    engine.unregister(everything)
    assert engine.scopes == {} and engine.files == {}


def test_a_load_interrupted_by_signals_is_tried_again(bpf_required, ext4_fs, caplog):
    """The verifier gives up with EAGAIN when a signal arrives while it checks a program (a profiler sampling the
    process, a burst of signals a handler catches), and libbpf's own retries come within the same burst: a burst of
    signals during the load must not leave duet on the polling source."""
    path = os.path.join(ext4_fs.mnt, "after")
    write_file(path, 64 << 10)
    evict(path)
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    quiet = threading.Event()

    def burst():
        end = time.monotonic() + 0.15
        while time.monotonic() < end and not quiet.wait(0.0005):
            os.kill(os.getpid(), signal.SIGUSR1)

    storm = threading.Thread(target=burst)
    caplog.set_level(logging.INFO, logger="duet.bpf")
    storm.start()
    try:
        time.sleep(0.005)
        with Engine(source="bpf") as eng:
            assert eng.source_name == "bpf"
            reg = eng.register("t", Event.ADDED, ext4_fs.mnt)
            cold_read(path)
            assert pages_by(settle(eng, reg).items, Event.ADDED)[file_id(path)] == set(range(16))
    finally:
        quiet.set()
        storm.join()
        signal.signal(signal.SIGUSR1, previous)
    assert "interrupted by a signal: trying again" in caplog.text   # the burst did hit the load


def test_a_dropped_file_is_dropped_on_the_cpu_that_just_let_its_events_through(ext4_fs, engine):
    """Each program keeps, per CPU, the filter's answer for the last file it saw (a run of events of one file looks
    the maps up once). A change of the filter must end that answer: pages of a file read on the same CPU right after
    ``drop`` — nothing else read in between — are dropped in the kernel, not reported."""
    sub = os.path.join(ext4_fs.mnt, "sub")
    os.mkdir(sub)
    path = os.path.join(sub, "f")
    write_file(path, 16 * PAGE_SIZE)
    evict(path)
    fid = file_id(path)
    reg = engine.register("t", Event.ADDED, sub)      # a part of the filesystem: the kernel consults `ignore`
    settle(engine, reg)
    was = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(was)})               # both reads on one CPU: the answer kept there is the one asked
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)   # no read-ahead: each read adds its own page
        gen = inode_generation(fd)
        for page in range(8):
            os.pread(fd, PAGE_SIZE, page * PAGE_SIZE)
        engine.drop(fid, gen)
        for page in range(8, 16):
            os.pread(fd, PAGE_SIZE, page * PAGE_SIZE)
    finally:
        os.close(fd)
        os.sched_setaffinity(0, was)
    assert pages_by(settle(engine, reg).items, Event.ADDED) == {fid: set(range(8))}
    assert engine.stats()["kernel_ignored"] >= 8
