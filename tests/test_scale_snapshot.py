"""The start-up snapshot read in a child process (duet_core/snapshotter.py), on the real kernel and real filesystems.

What a user relies on: every page cached when the run starts is known, whether it was cached before the child
looked or after; nothing outside the scope and nothing but regular files is ever opened; a child that dies or fails
leaves neither a hung run nor a zombie, and the run still knows what is cached.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from fsimage import btrfs_subvol

from duet_core.engine import Engine
from duet_core.events import PAGE_SIZE, Event, FileId
from duet_core.exclude import Exclusions
from duet_core.identity import file_id
from duet_core.scope import Scope
from duet_core.snapshotter import SnapshotChild
from duet_core.testing import cached_pages, evict_file

pytestmark = pytest.mark.bpf

MASK = Event.EXISTS | Event.MODIFIED


def write_file(path: str, size: int) -> None:
    with open(path, "wb") as fh:
        fh.write(os.urandom(size))
        fh.flush()
        os.fsync(fh.fileno())


def read_pages(path: str, pages: int) -> set[int]:
    """Read the first ``pages`` pages; return what mincore says is cached afterwards (readahead may add more)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, pages * PAGE_SIZE, 0)
    finally:
        os.close(fd)
    return cached_pages(path)


def exists_pages(engine: Engine, reg) -> dict[FileId, set[int]]:
    """What the engine reports as cached, after letting in-flight events land."""
    time.sleep(0.3)
    engine.pump(force=True)
    out: dict[FileId, set[int]] = {}
    for it in engine.fetch(reg).items:
        if it.flags & Event.EXISTS:
            out.setdefault(it.fid, set()).update(range(it.index, it.index + it.count))
    return out


def scanned(root: str) -> Scope:
    scope = Scope(root)
    for _ in scope.scan():
        pass
    return scope


def no_child_left(pid: int) -> bool:
    """The child is reaped: waiting for it again finds no such child (a zombie would still be waitable)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.fixture
def engine(bpf_required):
    with Engine(source="bpf") as eng:
        yield eng


def test_pages_cached_before_and_after_the_child_read_are_both_known(ext4_fs, engine):
    root = os.path.join(ext4_fs.mnt, "scope")
    os.makedirs(os.path.join(root, "sub"))
    paths = {name: os.path.join(root, rel) for name, rel in
             (("before", "a"), ("evicted", "sub/b"), ("after", "sub/c"), ("cold", "d"))}
    for p in paths.values():
        write_file(p, 256 * 1024)
        evict_file(p)
    truth_before = read_pages(paths["before"], 16)
    read_pages(paths["evicted"], 64)
    child = engine.start_snapshot(root, MASK)
    assert child is not None
    pid = child.proc.pid
    assert child.proc.wait(timeout=60) == 0     # the child has read every file: what follows is after it
    evict_file(paths["evicted"])
    truth_after = read_pages(paths["after"], 8)
    reg = engine.register("t", MASK, root, scope=scanned(root), snapshot=child)
    assert child.complete and child.files_read == 4
    exists = exists_pages(engine, reg)
    # What the kernel has cached now: the pages read before and after the child, less any it reclaimed meanwhile
    # (DAMON's pageout runs on these machines, at moments no test controls).
    now = {}
    for p in paths.values():
        if pages := cached_pages(p):
            now[file_id(p)] = pages
    assert now.keys() <= {file_id(paths["before"]), file_id(paths["after"])}
    assert now.get(file_id(paths["before"]), set()) <= truth_before
    assert now.get(file_id(paths["after"]), set()) <= truth_after
    assert exists == now
    assert no_child_left(pid)


def test_the_child_opens_only_regular_files_of_the_scope(ext4_fs, engine):
    root = os.path.join(ext4_fs.mnt, "scope")
    os.mkdir(root)
    outside = os.path.join(ext4_fs.mnt, "secret")
    inside = os.path.join(root, "f")
    for p in (outside, inside):
        write_file(p, 64 * 1024)
        evict_file(p)
    read_pages(outside, 16)
    truth = read_pages(inside, 4)
    os.symlink(outside, os.path.join(root, "link-out"))
    os.symlink(ext4_fs.mnt, os.path.join(root, "dir-link-out"))
    os.mkfifo(os.path.join(root, "fifo"))   # opening it for reading would block the child forever
    child = engine.start_snapshot(root, MASK)
    found = {fid: set(pages) for fid, pages in child.results(timeout=60)}
    child.close()
    assert child.complete, child.error
    assert found == {file_id(inside): truth}
    assert (child.files_read, child.files_cached) == (1, 1)


def test_the_child_leaves_out_what_the_scope_excludes(ext4_fs, engine):
    """The child is given the scope's exclusions (a failure to take them would only show as the parent reading
    residency itself): excluded files and directories are neither opened nor reported."""
    root = os.path.join(ext4_fs.mnt, "scope")
    paths = {rel: os.path.join(root, rel) for rel in ("keep", "x.tmp", "d/.cache/in", "state/duet.db")}
    for p in paths.values():
        os.makedirs(os.path.dirname(p), exist_ok=True)
        write_file(p, 64 * 1024)
        evict_file(p)
    truth = {rel: read_pages(p, 4) for rel, p in paths.items()}
    child = engine.start_snapshot(root, MASK, exclude=Exclusions(["*.tmp", ".cache/"], own=["state"]))
    found = {fid: set(pages) for fid, pages in child.results(timeout=60)}
    child.close()
    assert child.complete, child.error
    assert found == {file_id(paths["keep"]): truth["keep"]}
    assert (child.files_read, child.files_cached) == (1, 1)


def test_a_killed_child_is_reaped_and_the_engine_reads_residency_itself(ext4_fs, engine):
    root = ext4_fs.mnt
    path = os.path.join(root, "hot")
    write_file(path, 128 * 1024)
    evict_file(path)
    truth = read_pages(path, 8)
    child = engine.start_snapshot(root, MASK)
    pid = child.proc.pid
    os.kill(pid, signal.SIGKILL)
    reg = engine.register("t", MASK, root, scope=scanned(root), snapshot=child)
    assert not child.complete and "SIGKILL" in child.error
    assert no_child_left(pid)
    assert exists_pages(engine, reg) == {file_id(path): truth}


def test_a_failing_child_says_why_and_close_reaps_it(ext4_fs, bpf_required):
    child = SnapshotChild(os.path.join(ext4_fs.mnt, "no-such-dir"), set())
    pid = child.proc.pid
    assert list(child.results(timeout=60)) == []
    assert not child.complete and child.error.startswith("exit 1") and "no-such-dir" in child.error
    child.close()
    child.close()   # idempotent
    assert no_child_left(pid)


def test_nested_subvolumes_are_read_by_the_parent(btrfs_fs, engine):
    root = btrfs_fs.mnt
    btrfs_subvol(os.path.join(root, "home"))
    top, nested = os.path.join(root, "top"), os.path.join(root, "home", "f")
    for p in (top, nested):
        write_file(p, 128 * 1024)
        evict_file(p)
    truth = {file_id(top): read_pages(top, 4), file_id(nested): read_pages(nested, 8)}
    child = engine.start_snapshot(root, MASK)
    reg = engine.register("t", MASK, root, scope=scanned(root), snapshot=child)
    assert child.complete and child.files_read == 1   # only the top level's file: its pair is the one filtered
    assert exists_pages(engine, reg) == truth


def children() -> set[int]:
    """Live child processes of this process (zombies included: they are not reaped yet)."""
    me, out = str(os.getpid()), set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            out.add(int(pid))
    return out


def test_runs_leave_no_child_and_a_run_with_nothing_to_do_stops_it(ext4_fs, bpf_required, tmp_path):
    from duet_core.bench.scale import TASKS, registry
    from duet_core.scheduler import Runner, RunOptions
    from duet_core.state import StateStore

    root = os.path.join(ext4_fs.mnt, "scope")
    os.mkdir(root)
    for i in range(50):
        write_file(os.path.join(root, f"f{i}"), 4096)
    store = StateStore(str(tmp_path / "state"))
    before = children()
    first = Runner(store, registry(), list(TASKS), root, RunOptions(source="bpf")).run()
    assert first["source"] == "bpf" and first["result"] == "complete"
    assert all(t["items_done"] == 50 for t in first["tasks"].values())
    assert children() == before
    noop = Runner(store, registry(), list(TASKS), root, RunOptions(source="bpf")).run()
    assert noop["source"] == "none" and noop["result"] == "complete"
    assert all(t["items_total"] == 0 for t in noop["tasks"].values())
    assert children() == before


def test_the_child_never_imports_code_from_the_current_directory(ext4_fs, bpf_required, tmp_path, monkeypatch):
    planted = tmp_path / "duet_core"
    planted.mkdir()
    marker = tmp_path / "ran"
    (planted / "__init__.py").write_text("")
    (planted / "snapshotter.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)   # duet runs as root from wherever its user stands
    child = SnapshotChild(ext4_fs.mnt, set())
    assert list(child.results(timeout=60)) == [] and child.complete, child.error
    child.close()
    assert not marker.exists()
