"""``ctx.fresh``: of a file's cached pages, those the run itself read from the device for this item.

A range task handed a file after a file task read it must be able to tell the pages that task just read from the
device from pages that were cached before the run (a scrub trusts the former, not the latter). Real ext4 loop
filesystem, real page cache, in-process run.
"""

from __future__ import annotations

import os

import pytest
from plugin_dist import evict

from duet_core import Event, TaskSpec, hookimpl
from duet_core.plugins import TaskRegistry
from duet_core.scheduler import Runner, RunOptions
from duet_core.state import StateStore

PAGE = 4096


class WholeReader:
    @hookimpl
    def duet_task(self):
        return TaskSpec("whole", "reads every byte")

    @hookimpl
    def duet_process(self, ctx):
        off = 0
        while data := os.pread(ctx.fd, 1 << 20, off):
            off += len(data)


class Recorder:
    def __init__(self):
        self.seen = {}

    @hookimpl
    def duet_task(self):
        return TaskSpec("recorder", "records what it is handed", events=Event.EXISTS | Event.ADDED,
                        granularity="range")

    @hookimpl
    def duet_process(self, ctx):
        self.seen[ctx.file.relpath] = (ctx.cached, ctx.fresh)


@pytest.mark.bpf
def test_fresh_is_what_the_run_read_not_what_was_cached_before(tmp_path, ext4_fs, bpf_required):
    scope = os.path.join(ext4_fs.mnt, "data")
    os.mkdir(scope)
    for name in ("half", "cold"):
        with open(os.path.join(scope, name), "wb") as fh:
            fh.write(os.urandom(64 * PAGE))
        evict(os.path.join(scope, name))
    with open(os.path.join(scope, "half"), "rb") as fh:    # first half cached before the run (no read-ahead)
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fh.fileno(), 32 * PAGE, 0)
    recorder = Recorder()
    reg = TaskRegistry()
    reg.add(WholeReader())
    reg.add(recorder)
    Runner(StateStore(str(tmp_path / "state")), reg, ["whole", "recorder"], scope, RunOptions(source="bpf")).run()
    cached, fresh = recorder.seen["half"]
    assert cached == [(0, 64)] and fresh == [(32, 32)]
    cached, fresh = recorder.seen["cold"]
    assert cached == [(0, 64)] and fresh == [(0, 64)]
