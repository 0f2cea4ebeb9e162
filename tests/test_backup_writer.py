"""The backup's writer process (duet_backup.writer): the run reads, the writer hashes and writes the copies.

Whatever happens to one of the two processes, nothing is lost: the writer killed under a run — the run says so in
one line, copies the rest itself, and the snapshot is exact; the run killed — its writer ends too, and the next
run publishes an exact snapshot. That the copies it makes are exact (bytes, holes, owners, modes, xattrs, times,
the blake3 in the manifest) is what every other backup test checks: every copy of a run goes through it.
"""

from __future__ import annotations

import json
import os
import signal
import time

import backup_helpers as bh
import fsimage
import pytest
from test_backup import Duet, duet, source  # noqa: F401 - duet, source: shared fixtures

from duet_core.bench.stop import journal_lines

pytestmark = pytest.mark.bpf


def start_mid_run(duet, scope: str, target: str):
    """A run copying 24 MiB at 2 MB/s, once it has started its writer and made some copies durable."""
    for i in range(24):
        bh.write(os.path.join(scope, "more", f"m{i:02d}"), os.urandom(1 << 20))
    bh.evict_regular(scope)
    proc = duet.start("run", "backup", "--path", scope, "--target", target, "--rate-limit", "2MB/s", "--json")
    end = time.monotonic() + 60
    while not (journal_lines(target) and bh.writer_processes(proc.pid)):
        assert proc.poll() is None and time.monotonic() < end, ("no copy made", proc.communicate())
        time.sleep(0.02)
    return proc


def test_the_writer_killed_under_a_run_the_run_copies_the_rest_itself(duet, source):
    scope = bh.make_tree(source.mnt)
    with fsimage.loop_fs("ext4") as target:
        duet.backup(scope, target.mnt)
        proc = start_mid_run(duet, scope, target.mnt)
        [writer] = bh.writer_processes(proc.pid)
        os.kill(writer, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if "writer process" in line]
        assert len(lines) == 1 and "was killed by signal 9: the run copies the rest itself" in lines[0], err
        rep = json.loads(out)["tasks"]["backup"]
        assert rep["snapshot"] and rep["counters"]["copied"] == 24, rep
        bh.assert_same_tree(scope, os.path.join(target.mnt, "snapshots", rep["snapshot"]))


def test_a_run_killed_takes_its_writer_with_it_and_the_next_run_is_exact(duet, source):
    scope = bh.make_tree(source.mnt)
    with fsimage.loop_fs("btrfs") as target:
        first = duet.backup(scope, target.mnt)
        proc = start_mid_run(duet, scope, target.mnt)
        writers = bh.writer_processes(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        end = time.monotonic() + 10
        while any(bh.alive(w) for w in writers):
            assert time.monotonic() < end, f"the writer {writers} outlived its run by 10 s"
            time.sleep(0.05)
        assert bh.snapshot_names(target.mnt) == [first["snapshot"]]
        again = duet.backup(scope, target.mnt)
        assert bh.snapshot_names(target.mnt) == [first["snapshot"], again["snapshot"]]
        bh.assert_same_tree(scope, os.path.join(target.mnt, "snapshots", again["snapshot"]))
