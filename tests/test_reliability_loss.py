"""Forced event loss during a run: the kernel's merge map shrunk to 4 entries (as tests/test_engine.py does for the
engine alone) while another process reads the scope cold, over and over. The loss must be counted and the scope
resynced, and the run's result must be the one a run without loss gives: every file processed once, same bytes.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import time

import fsimage
import plugin_dist
import pytest
from plugin_dist import log_counts, make_dataset
from prometheus_client.parser import text_string_to_metric_families

from duet_core import metrics, scheduler
from duet_core.engine import Engine
from duet_core.events import Event
from duet_core.plugins import TaskRegistry
from duet_core.scheduler import Runner, RunOptions
from duet_core.state import StateStore

pytestmark = pytest.mark.bpf

M = plugin_dist.load_source(plugin_dist.TASKS_MODULE)

# Another process: evict and re-read every file of the scope until killed (page-cache ADDED events, many chunks).
READER = textwrap.dedent('''
    import os, sys
    paths = sys.argv[1:]
    while True:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            while os.read(fd, 1 << 20):
                pass
            os.close(fd)
''')


@pytest.fixture
def fs(require_root, bpf_required):
    with fsimage.loop_fs("btrfs") as f:
        yield f


def run_once(state_dir, scope: str, log) -> dict:
    reg = TaskRegistry()
    reg.add(M.ReaderTask("slow", sleep=0.05))
    store = StateStore(str(state_dir))
    try:
        # idle_io off: the evicting reader is there to make events, not a foreground to wait for (with idle I/O the
        # run works only on what the reader has cached, and waits up to 10 min for it to pause).
        runner = Runner(store, reg, ["slow"], scope, RunOptions(source="bpf", idle_io=False,
                                                               task_options={"slow": {"log": str(log)}}))
        summary = runner.run()
        assert runner.exit_code(summary) == 0, summary
        return summary
    finally:
        store.close()


def test_forced_event_loss_is_counted_resynced_and_changes_no_result(fs, tmp_path, monkeypatch):
    scope, files = make_dataset(fs.mnt, n=16, sizes=(1 << 20, 512 << 10))
    control = run_once(tmp_path / "control-state", scope, tmp_path / "control.log")
    assert control["engine"].get("kernel_lost_map", 0) == 0 and control["engine"]["resyncs"] == 0

    monkeypatch.setattr(scheduler, "Engine", functools.partial(Engine, merge_entries=4))
    reader = subprocess.Popen([sys.executable, "-c", READER, *(os.path.join(scope, rel) for rel in files)])
    try:
        lossy = run_once(tmp_path / "lossy-state", scope, tmp_path / "lossy.log")
    finally:
        reader.kill()
        reader.wait()
    print(f"forced loss: engine counters {lossy['engine']}")
    assert lossy["engine"]["kernel_lost_map"] > 0, lossy["engine"]
    assert lossy["engine"]["resyncs"] >= 1, lossy["engine"]
    # ... and the fleet sees it: the run's Prometheus metrics carry the loss and the resyncs.
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics.render(lossy, "run", exit_code=0)) for s in f.samples}
    lost = {dict(k[1])["where"]: v for k, v in samples.items() if k[0] == "duet_engine_events_lost_total"}
    assert lost["map"] == lossy["engine"]["kernel_lost_map"] > 0
    assert [v for k, v in samples.items() if k[0] == "duet_engine_resyncs_total"] == [lossy["engine"]["resyncs"]]
    # The same result as without loss.
    assert log_counts(tmp_path / "lossy.log") == log_counts(tmp_path / "control.log") == {
        ("slow", rel): 1 for rel in files}
    for key in ("items_done", "items_total", "items_failed", "bytes_processed", "complete"):
        assert lossy["tasks"]["slow"][key] == control["tasks"]["slow"][key], key
    assert lossy["result"] == control["result"] == "complete"


def test_lost_flush_records_leave_no_written_back_page_modified(fs):
    """The flush ring shrunk to one page and hundreds of fsyncs between two drains: flush records are lost (counted),
    the engine resyncs, and MODIFIED ends up as the kernel has it — the files written back are not modified, the
    ones still dirty are — exactly as with a ring that lost nothing."""
    scope = os.path.join(fs.mnt, "scope")
    os.mkdir(scope)
    synced = [os.path.join(scope, f"s{i:03d}") for i in range(300)]
    dirty = [os.path.join(scope, f"d{i}") for i in range(3)]
    for p in synced + dirty:
        with open(p, "wb") as fh:
            fh.write(b"old\n" * 1024)
    os.sync()
    results = {}
    for ring in (0, 4096):          # 0: the ring as compiled (256 KiB), the control
        with Engine(source="bpf", ring_bytes=ring) as engine:
            reg = engine.register("m", Event.EXISTS | Event.MODIFIED, scope)
            engine.pump(force=True)
            engine.fetch(reg)
            for p in synced + dirty:
                fd = os.open(p, os.O_WRONLY)
                try:
                    os.pwrite(fd, f"new {ring}\n".encode() * 1024, 0)
                    if p in synced:
                        os.fsync(fd)            # one writeback episode: one flush record
                finally:
                    os.close(fd)
            time.sleep(0.3)
            engine.pump(force=True)
            batch = engine.fetch(reg)      # what the task is told: nothing was MODIFIED before this fetch
            stats = engine.stats()
            modified = {os.path.basename(engine.path_of(reg, it.fid))
                        for it in batch.items if it.flags & Event.MODIFIED}
            results[ring] = (stats.get("kernel_lost_ring", 0), stats["resyncs"], modified)
    print(f"flush loss: {results[4096][:2]} (lost ring records, resyncs); control {results[0][:2]}")
    assert results[0][:2] == (0, 0)
    assert results[4096][0] > 0 and results[4096][1] >= 1
    assert results[0][2] == results[4096][2] == {os.path.basename(p) for p in dirty}
