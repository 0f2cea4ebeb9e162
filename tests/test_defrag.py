"""The defrag task, driven as a user drives it: ``duet run defrag`` / ``duet watch defrag`` as real processes over
files fragmented for real on btrfs, ext4 and xfs loop images; ``filefrag`` (e2fsprogs) as the independent judge of
extents, FIEMAP's SHARED flag and physical addresses for sharing, and a hash of every file before and after.

The task is the installed ``duet-defrag`` package (``scripts/dev setup`` installs ``plugins/defrag`` into the venv),
found through its ``duet.tasks`` entry point like any plugin.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time

import fsimage
import plugin_dist
import pytest
from duet_defrag import fiemap
from plugin_dist import evict, pinned, resident

pytestmark = pytest.mark.bpf

CHUNK = 4096
SIZE = 1 << 20          # 256 chunks of 4 KiB per file


# -- helpers -----------------------------------------------------------------------------------------------------------
def write_interleaved(directory: str, names: list[str], size: int = SIZE, seed: int = 0,
                      truncate: bool = True) -> dict[str, str]:
    """Write ``names`` side by side, one fsynced 4 KiB chunk of each in turn, so their blocks interleave on disk
    (``truncate=False``: overwrite existing files in place, which on btrfs gives them new, interleaved blocks too).

    Returns {name: sha256 of what was written}.
    """
    rng = random.Random(seed)
    hashes = {n: hashlib.sha256() for n in names}
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
    fds = {n: os.open(os.path.join(directory, n), flags, 0o644) for n in names}
    try:
        for off in range(0, size, CHUNK):
            for n, fd in fds.items():
                data = rng.randbytes(CHUNK)
                os.pwrite(fd, data, off)
                os.fsync(fd)
                hashes[n].update(data)
    finally:
        for fd in fds.values():
            os.close(fd)
    return {n: h.hexdigest() for n, h in hashes.items()}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def filefrag(path: str) -> int:
    """The number of extents ``filefrag`` reports for ``path``."""
    out = subprocess.run(["filefrag", path], capture_output=True, text=True, check=True).stdout
    return int(re.search(r": (\d+) extents? found", out).group(1))


def records(path: str) -> list[fiemap.Extent]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fiemap.extents(fd, sync=True)
    finally:
        os.close(fd)


def physical(path: str) -> list[tuple[int, int, int]]:
    """(logical, physical, length) of every extent: equal lists mean the same blocks."""
    return [(e.logical, e.physical, e.length) for e in fiemap.merge(records(path))]


class Duet(plugin_dist.CliRunner):
    """``duet`` as a subprocess with its own state directory and an empty config (never /etc/duet/duet.toml)."""

    def defrag(self, scope: str, *options: str) -> tuple[dict, str]:
        """``duet run defrag --path SCOPE --json OPTIONS``: the task's entry of the summary, and stderr."""
        proc = self("run", "defrag", "--path", scope, "--json", *options)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        return json.loads(proc.stdout)["tasks"]["defrag"], proc.stderr


duet = Duet.fixture()


@pytest.fixture(params=["btrfs", "ext4"])
def any_fs(request, require_root):
    """A fresh btrfs, then a fresh ext4 (4 KiB blocks), on a loop device."""
    with fsimage.loop_fs(request.param) as fs:
        yield fs


def by_path(report: dict) -> dict[str, dict]:
    return {f["path"]: f for f in report["files"]}


# -- measuring ---------------------------------------------------------------------------------------------------------
def test_extent_count_agrees_with_filefrag(any_fs):
    scope = os.path.join(any_fs.mnt, "data")
    os.mkdir(scope)
    write_interleaved(scope, ["a", "b"])
    with open(os.path.join(scope, "c"), "wb") as fh:
        fh.write(os.urandom(SIZE))
    os.sync()
    for name in ("a", "b", "c"):
        path = os.path.join(scope, name)
        lay = fiemap.layout(records(path), any_fs.fstype)
        assert lay.extents == filefrag(path), name
        assert lay.ideal == 1 and lay.data_bytes == SIZE, (name, lay)
    assert filefrag(os.path.join(scope, "a")) >= 8, "the interleaved writes did not fragment the file"


def test_compressed_and_inline_extents_are_not_fragmentation(require_root):
    with fsimage.loop_fs("btrfs", mount_opts="compress-force=zstd") as fs:
        big, small = os.path.join(fs.mnt, "text"), os.path.join(fs.mnt, "tiny")
        with open(big, "wb") as fh:
            fh.write(b"duet compresses well " * (SIZE // 21))
        with open(small, "wb") as fh:
            fh.write(b"inline")
        os.sync()
        lay = fiemap.layout(records(big), "btrfs")
        # One extent per 128 KiB of compressed data: as many as there can be, so none in excess.
        assert lay.extents == 8 and lay.ideal == 8 and lay.excess == 0 and not lay.runs, lay
        tiny = fiemap.layout(records(small), "btrfs")
        assert tiny.extents == 1 and tiny.ideal == 1, tiny
        assert records(small)[0].flags & fiemap.FIEMAP_EXTENT_DATA_INLINE


# -- defragmenting -----------------------------------------------------------------------------------------------------
def test_interleaved_files_drop_to_one_extent_and_keep_their_bytes(duet, any_fs):
    scope = os.path.join(any_fs.mnt, "data")
    os.mkdir(scope)
    hashes = write_interleaved(scope, ["a", "b"])
    with open(os.path.join(scope, "c"), "wb") as fh:
        fh.write(os.urandom(SIZE))
        os.fsync(fh.fileno())
    hashes["c"] = sha256(os.path.join(scope, "c"))
    before = {n: filefrag(os.path.join(scope, n)) for n in hashes}
    assert before["a"] >= 8 and before["b"] >= 8 and before["c"] == 1, before
    evict(os.path.join(scope, "b"))             # one from the device, the others from the cache

    report, err = duet.defrag(scope)

    after = {n: filefrag(os.path.join(scope, n)) for n in hashes}
    assert after["a"] <= 2 and after["b"] <= 2 and after["c"] == 1, after
    assert {n: sha256(os.path.join(scope, n)) for n in hashes} == hashes
    assert report["files_checked"] == 3 and report["fragmented"] == 2 and report["defragmented"] == 2, report
    assert report["extents_before"] == before["a"] + before["b"]
    assert report["extents_after"] == after["a"] + after["b"]
    files = by_path(report)
    assert {n: (files[n]["extents_before"], files[n]["extents_after"]) for n in ("a", "b")} == \
        {n: (before[n], after[n]) for n in ("a", "b")}
    assert f"a: {before['a']} → {after['a']} extents" in err

    again, _ = duet.defrag(scope)               # the next round finds nothing left to do
    assert again["fragmented"] == 0 and again["defragmented"] == 0 and again["files_checked"] == 3, again


def test_dry_run_reports_and_changes_nothing(duet, any_fs):
    hashes = write_interleaved(any_fs.mnt, ["a", "b"])
    before = {n: physical(os.path.join(any_fs.mnt, n)) for n in hashes}

    report, err = duet.defrag(any_fs.mnt, "--dry-run", "true")

    assert report["dry_run"] is True and report["fragmented"] == 2 and report["defragmented"] == 0, report
    assert {n: physical(os.path.join(any_fs.mnt, n)) for n in hashes} == before
    assert {n: sha256(os.path.join(any_fs.mnt, n)) for n in hashes} == hashes
    assert by_path(report)["a"]["extents_before"] == filefrag(os.path.join(any_fs.mnt, "a"))
    assert "a: fragmented:" in err


def test_most_cached_file_goes_first(duet, ext4_fs):
    names = ["f1", "f2", "f3"]
    write_interleaved(ext4_fs.mnt, names)
    for n in names[:2]:
        evict(os.path.join(ext4_fs.mnt, n))
    assert resident(os.path.join(ext4_fs.mnt, "f3")) == SIZE // 4096

    report, err = duet.defrag(ext4_fs.mnt)

    order = [line.split(": ")[2] for line in err.splitlines() if line.startswith("duet: defrag: f")]
    assert report["defragmented"] == 3 and order[0] == "f3", err


def test_xfs_through_xfs_fsr(duet, require_root):
    with fsimage.loop_fs("xfs") as fs:
        hashes = write_interleaved(fs.mnt, ["a", "b"])
        before = filefrag(os.path.join(fs.mnt, "a"))
        assert before >= 8
        report, _ = duet.defrag(fs.mnt)
        assert filefrag(os.path.join(fs.mnt, "a")) <= 2 and filefrag(os.path.join(fs.mnt, "b")) <= 2
        assert {n: sha256(os.path.join(fs.mnt, n)) for n in hashes} == hashes
        assert report["defragmented"] == 2 and report["extents_before"] >= 2 * 8, report


# -- sharing -----------------------------------------------------------------------------------------------------------
def test_reflink_copy_stays_shared_unless_allowed(duet, btrfs_fs):
    scope = btrfs_fs.mnt
    hashes = write_interleaved(scope, ["a", "b"])
    subprocess.run(["cp", "--reflink=always", os.path.join(scope, "b"), os.path.join(scope, "copy")], check=True)
    hashes["copy"] = hashes["b"]
    blocks = physical(os.path.join(scope, "b"))
    assert blocks == physical(os.path.join(scope, "copy")) and len(blocks) >= 8

    report, err = duet.defrag(scope)

    assert physical(os.path.join(scope, "b")) == blocks == physical(os.path.join(scope, "copy"))
    assert all(e.shared for e in records(os.path.join(scope, "b")))
    assert filefrag(os.path.join(scope, "a")) <= 2                        # the unshared file was done
    assert report["skipped_shared"] == 2 and report["defragmented"] == 1, report
    assert "--allow-unshare" in err

    report, _ = duet.defrag(scope, "--allow-unshare", "true")

    assert report["defragmented"] == 2, report
    assert filefrag(os.path.join(scope, "b")) <= 2 and filefrag(os.path.join(scope, "copy")) <= 2
    assert not any(e.shared for e in records(os.path.join(scope, "b")))
    assert {n: sha256(os.path.join(scope, n)) for n in hashes} == hashes


def test_snapshot_keeps_its_extents_and_only_the_rewritten_half_is_defragmented(duet, btrfs_fs):
    vol = fsimage.btrfs_subvol(os.path.join(btrfs_fs.mnt, "vol"))
    write_interleaved(vol, ["f", "g"])
    snap = fsimage.btrfs_snapshot(vol, os.path.join(btrfs_fs.mnt, "snap"), readonly=True)
    # Overwrite the second half of f after the snapshot, interleaved again: that half is now f's own, fragmented.
    rng = random.Random(7)
    fds = [os.open(os.path.join(vol, n), os.O_WRONLY | os.O_CLOEXEC) for n in ("f", "g")]
    for off in range(SIZE // 2, SIZE, CHUNK):
        for fd in fds:
            os.pwrite(fd, rng.randbytes(CHUNK), off)
            os.fsync(fd)
    for fd in fds:
        os.close(fd)
    f, fsnap = os.path.join(vol, "f"), os.path.join(snap, "f")
    want, want_snap = sha256(f), sha256(fsnap)
    first_half = [x for x in physical(f) if x[0] < SIZE // 2]
    assert first_half and first_half == [x for x in physical(fsnap) if x[0] < SIZE // 2]
    own_before = [e for e in fiemap.merge(records(f)) if not e.shared]
    assert len(own_before) >= 8

    report, _ = duet.defrag(vol)

    assert [x for x in physical(f) if x[0] < SIZE // 2] == first_half      # still the snapshot's blocks
    assert all(e.shared for e in fiemap.merge(records(f)) if e.logical < SIZE // 2)
    own_after = [e for e in fiemap.merge(records(f)) if not e.shared]
    assert len(own_after) <= 2, own_after
    assert sha256(f) == want and sha256(fsnap) == want_snap
    assert by_path(report)["f"]["outcome"] == "defragmented", report


# -- writes during the run ---------------------------------------------------------------------------------------------
def test_file_written_during_the_run_is_not_corrupted(duet, any_fs):
    scope = os.path.join(any_fs.mnt, "data")
    os.mkdir(scope)
    names = [f"f{i}" for i in range(6)]
    write_interleaved(scope, names)
    for n in names:
        evict(os.path.join(scope, n))
    path = os.path.join(scope, "f0")
    final = bytearray(open(path, "rb").read())
    # Rate-limited, the run takes seconds; f0, first in scan order, is defragmented first, then a writer overwrites
    # it in place, chunk by chunk with fsyncs, while duet goes on (and re-checks f0 because it was written).
    proc = duet.start("run", "defrag", "--path", scope, "--json", "--rate-limit", "2MB/s")
    first = proc.stderr.readline()
    assert first.startswith("duet: defrag: f0:"), first + proc.stderr.read()
    rng = random.Random(3)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for _ in range(200):
            off = rng.randrange(0, SIZE // CHUNK) * CHUNK
            data = rng.randbytes(CHUNK)
            os.pwrite(fd, data, off)
            final[off:off + CHUNK] = data
            os.fsync(fd)
    finally:
        os.close(fd)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    report = json.loads(out)["tasks"]["defrag"]
    assert sha256(path) == hashlib.sha256(final).hexdigest()
    assert report["rechecks"] >= 1, report        # the writes fell inside the run
    assert report["defragmented"] == len(names), json.dumps(report)


def test_a_file_written_all_through_the_run_does_not_keep_it_going(duet, btrfs_fs):
    """A log written every 2 ms: defrag re-checks it while the run has other work (a rate-limited scrub reads the
    rest), and the run ends when that work is done — a cron job finishes although the writes never stop."""
    import threading

    scope = os.path.join(btrfs_fs.mnt, "data")
    os.mkdir(scope)
    for i in range(8):
        with open(os.path.join(scope, f"f{i}"), "wb") as fh:
            fh.write(os.urandom(1 << 20))
    for i in range(8):
        evict(os.path.join(scope, f"f{i}"))
    stop = threading.Event()

    def writer():
        fd = os.open(os.path.join(scope, "f0"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            while not stop.is_set():
                os.pwrite(fd, os.urandom(4096), 0)
                os.fsync(fd)
                time.sleep(0.002)
        finally:
            os.close(fd)

    t = threading.Thread(target=writer)
    t.start()
    try:
        proc = duet.start("run", "defrag", "scrub", "--path", scope, "--json", "--every", "0", "--rate-limit", "8MB/s")
        out, err = proc.communicate(timeout=120)
        still_writing = t.is_alive() and not stop.is_set()
    finally:
        stop.set()
        t.join()
    assert proc.returncode == 0, err
    assert still_writing
    report = json.loads(out)["tasks"]["defrag"]
    assert report["rechecks"] >= 1, report          # the writes were seen, and the file checked again


def test_defrag_reads_only_what_it_rewrites(duet, require_root):
    """defrag needs the data of the files it rewrites only (FIEMAP tells it the rest): the run must not read the
    other files ahead for it (``TaskSpec.reads_data=False``). Device reads are the loop device's own counter."""
    from duet_core.bench.share import loop_read_bytes

    with fsimage.loop_fs("btrfs", direct_io=True) as fs:
        scope = os.path.join(fs.mnt, "data")
        os.mkdir(scope)
        write_interleaved(scope, [f"a{i}" for i in range(4)])            # 4 MiB, fragmented, first in scan order
        for i in range(24):                                             # 96 MiB in one extent per file
            with open(os.path.join(scope, f"b{i:02d}"), "wb") as fh:
                fh.write(os.urandom(4 << 20))
                os.fsync(fh.fileno())
        for name in os.listdir(scope):
            evict(os.path.join(scope, name))
        before = loop_read_bytes(fs.loopdev)
        report, _ = duet.defrag(scope)
        read = loop_read_bytes(fs.loopdev) - before
    assert report["defragmented"] == 4, report
    assert read <= 4 * SIZE * 3 // 2 + (8 << 20), f"{read >> 20} MiB read to defragment 4 MiB of files"


def items_done(duet: Duet, scope: str) -> int | None:
    """The defrag task's files done in the scope's current round, as ``duet status`` shows it (None: no record)."""
    proc = duet("status", "--path", scope, "--json")
    if proc.returncode != 0:
        return None
    scopes = json.loads(proc.stdout).get("scopes") or [{}]
    return scopes[0].get("tasks", {}).get("defrag", {}).get("items_done")


def test_watch_rechecks_files_fragmented_after_they_were_checked(duet, btrfs_fs):
    scope = btrfs_fs.mnt
    paths = [os.path.join(scope, n) for n in ("w", "x")]
    for p in paths:
        with open(p, "wb") as fh:
            fh.write(os.urandom(SIZE))
    # The watch takes a file only when all of it is cached (it reads nothing itself), which is this test's premise:
    # the pages stay locked in memory, or the kernel's own reclaim (DAMON) drops one now and then, mostly under load,
    # and the file waits for the next run instead (seen: 255 of 256 pages, the file left pending).
    with pinned(*paths):
        proc = duet.start("watch", "defrag", "--path", scope, "--json")
        end = time.monotonic() + 30
        while items_done(duet, scope) != 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < end, "the watch never checked the files"
            time.sleep(0.2)
        assert max(filefrag(p) for p in paths) == 1
        hashes = write_interleaved(scope, ["w", "x"], seed=5, truncate=False)    # fragments both after their check
        end = time.monotonic() + 30
        while max(filefrag(p) for p in paths) > 2:
            assert proc.poll() is None, proc.communicate()
            if time.monotonic() > end:
                proc.send_signal(signal.SIGTERM)
                raise AssertionError(f"still {[filefrag(p) for p in paths]} extents, {[resident(p) for p in paths]} "
                                     f"pages cached: {proc.communicate(timeout=30)}")
            time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 5, err
    report = json.loads(out)["tasks"]["defrag"]
    assert report["rechecks"] >= 2 and report["defragmented"] == 2, (report, err)
    assert {n: sha256(os.path.join(scope, n)) for n in hashes} == hashes


# -- bad input ---------------------------------------------------------------------------------------------------------
def test_bad_option_value_is_one_line(duet, btrfs_fs):
    proc = duet("run", "defrag", "--path", btrfs_fs.mnt, "--threshold", "lots")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("duet: error:")]
    assert len(errors) == 1 and "threshold" in errors[0], proc.stderr


def test_running_program_on_ext4_is_left_alone(duet, ext4_fs):
    # A fragmented copy of sleep(1), running: ext4 needs a writable descriptor to move extents, which a running
    # program refuses (ETXTBSY). The file is reported as busy, not as a failure, and still runs unchanged.
    program = os.path.join(ext4_fs.mnt, "sleeper")
    with open("/usr/bin/sleep", "rb") as fh:
        code = fh.read()
    rng = random.Random(11)
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o755) for p in (program, program + ".pad")]
    for off in range(0, len(code), CHUNK):
        for fd in fds:
            os.pwrite(fd, code[off:off + CHUNK] if fd == fds[0] else rng.randbytes(CHUNK), off)
            os.fsync(fd)
    for fd in fds:
        os.close(fd)
    assert filefrag(program) >= 2
    sleeper = subprocess.Popen([program, "60"])
    try:
        report, err = duet.defrag(ext4_fs.mnt)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert by_path(report)["sleeper"]["outcome"] == "busy" and report["busy"] == 1, report
    assert report["items_failed"] == 0 and "sleeper: in use as a running program" in err
    assert sha256(program) == hashlib.sha256(code).hexdigest()


SWAPPER = '''
import os

from duet_core import TaskSpec, hookimpl


class Swapper:
    """Test task: renames a new file over each file it is handed (once: a replacement is left alone), as an editor
    saving by rename does, before the next task of the run gets the file."""

    @hookimpl
    def duet_task(self):
        return TaskSpec("swapper", "test task: renames a new file over each file it is handed", api_version=1)

    @hookimpl
    def duet_process(self, ctx):
        if os.pread(ctx.fd, 12, 0) == b"replacement\\n":
            return None
        new = ctx.path + ".new"
        with open(new, "wb") as fh:
            fh.write(b"replacement\\n")
        os.rename(new, ctx.path)
        return None


swapper = Swapper()
'''


def test_a_file_replaced_while_defrag_checks_it_is_reported_vanished_not_failed(tmp_path, btrfs_fs):
    """The name of a fragmented file leads to another file by the time defrag opens it to rewrite (renamed over by
    the task before it in the run): defrag rewrites nothing, says so, and the run does not fail (exit 0)."""
    runner = Duet(tmp_path, plugin_dist.Dist("duet-test-swapper", "0.1", {"duet_test_swapper": SWAPPER},
                                             {"swapper": "duet_test_swapper:swapper"}))
    write_interleaved(btrfs_fs.mnt, ["a", "b"])
    assert filefrag(os.path.join(btrfs_fs.mnt, "a")) >= 2
    proc = runner("run", "swapper", "defrag", "--path", btrfs_fs.mnt, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)["tasks"]["defrag"]
    assert report["items_failed"] == 0 and report["vanished"] == 2 and report["defragmented"] == 0, report
    assert {by_path(report)[n]["outcome"] for n in ("a", "b")} == {"vanished"}
    assert proc.stderr.count("deleted or replaced while being checked: not rewritten") == 2
    for n in ("a", "b"):
        with open(os.path.join(btrfs_fs.mnt, n), "rb") as fh:
            assert fh.read() == b"replacement\n"        # the new file, untouched
