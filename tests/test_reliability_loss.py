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

import fsimage
import plugin_dist
import pytest
from plugin_dist import log_counts, make_dataset
from prometheus_client.parser import text_string_to_metric_families

from duet_core import metrics, scheduler
from duet_core.engine import Engine
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
        runner = Runner(store, reg, ["slow"], scope, RunOptions(source="bpf", task_options={"slow": {"log": str(log)}}))
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
