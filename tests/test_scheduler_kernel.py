"""The scheduler's use of the kernel side: files every task is done with stop producing events at the source."""

from __future__ import annotations

import os
import subprocess

import pytest

from duet_core.hookspecs import hookimpl
from duet_core.plugins import TaskRegistry
from duet_core.scheduler import Runner, RunOptions
from duet_core.state import StateStore
from duet_core.tasks import TaskSpec

pytestmark = pytest.mark.bpf


class ReadsAndPokes:
    """Reads each file; from the third file on, a foreground process re-reads the first (done) file."""

    def __init__(self):
        self.order: list[str] = []

    @hookimpl
    def duet_task(self):
        return TaskSpec("poke", "reads files; a foreground reader re-reads finished ones")

    @hookimpl
    def duet_process(self, ctx):
        os.pread(ctx.fd, ctx.file.size, 0)
        self.order.append(ctx.path)
        if len(self.order) >= 3:
            subprocess.run(["cat", self.order[0]], stdout=subprocess.DEVNULL, check=True)


def test_done_files_are_dropped_in_the_kernel(bpf_required, btrfs_fs, tmp_path):
    for i in range(5):
        path = os.path.join(btrfs_fs.mnt, f"f{i}")
        with open(path, "wb") as fh:
            fh.write(os.urandom(256 * 1024))
            os.fsync(fh.fileno())
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    plugin = ReadsAndPokes()
    reg = TaskRegistry()
    reg.add(plugin)
    summary = Runner(StateStore(str(tmp_path / "state")), reg, ["poke"], btrfs_fs.mnt,
                     RunOptions(source="bpf")).run()
    assert summary["tasks"]["poke"]["items_done"] == 5
    # The foreground re-reads of the first (done, evicted by cache hygiene) file were dropped by the kernel filter.
    assert summary["engine"]["kernel_ignored"] >= 3
