"""``duet run --jobs 2``: the first task in the run's process, the others in a second one fed each file while it is
cached — as real processes, with test plugins installed as distributions (and the built-in backup and scrub), on
btrfs over a direct-I/O loop device, so the bytes each process reads from the device are what the kernel counts."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import sqlite3
import subprocess
import time

import fsimage
import plugin_dist
import pytest
from plugin_dist import evict_tree, excused_by_cache_drops, log_counts, make_dataset, read_log, resident, still_cached

from duet_core.scope import Scope
from duet_core.state import StateStore

pytestmark = pytest.mark.bpf

TASKS = {
    "reader": "ReaderTask('reader')",
    "r2": "ReaderTask('r2')",
    "r3": "ReaderTask('r3')",
    "slow": "ReaderTask('slow', sleep=0.1)",
    "slow2": "ReaderTask('slow2', sleep=0.1)",
}


class Duet(plugin_dist.CliRunner):
    config_for = ("run", "status")

    def __init__(self, tmp_path):
        self.log = tmp_path / "log"
        super().__init__(tmp_path, plugin_dist.tasks_dist(TASKS), log=str(self.log))


duet = Duet.fixture()


@pytest.fixture
def direct_fs(require_root):
    with fsimage.loop_fs("btrfs", direct_io=True) as fs:
        yield fs


def summary_of(proc) -> dict:
    assert proc.stdout.count("\n") == 1, proc.stdout
    return json.loads(proc.stdout)


def followers(state_dir) -> list[int]:
    """Follower processes (python -m duet_core.jobs) of runs on this state directory still alive."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if b"duet_core.jobs" in argv and os.fsencode(str(state_dir)) in argv:
            pids.append(int(pid))
    return pids


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


@excused_by_cache_drops
def test_the_second_process_reads_nothing_and_the_run_reads_the_data_set_once(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=24)
    dataset = sum(files.values())
    hot_rel = sorted(files)[5]
    hot = os.path.join(scope, hot_rel)
    subprocess.run(["cat", hot], stdout=subprocess.DEVNULL, check=True)   # cached before the run: stays cached
    proc = duet("run", "reader", "r2", "r3", "--path", scope, "--json", "--jobs", "2")
    assert proc.returncode == 0, proc.stderr
    summary = summary_of(proc)
    assert summary["result"] == "complete" and list(summary["tasks"]) == ["reader", "r2", "r3"]
    follower = summary["jobs"]["follower"]
    assert follower["tasks"] == ["r2", "r3"] and follower["result"] == "complete"
    for rep in summary["tasks"].values():
        assert (rep["items_done"], rep["items_total"], rep["items_failed"]) == (len(files), len(files), 0)
        assert rep["bytes_processed"] == dataset
    # The reads are charged once, to the task that caused them, as in one process.
    assert summary["tasks"]["reader"]["bytes_from_device"] == dataset - files[hot_rel], summary
    assert summary["tasks"]["r2"]["bytes_from_device"] == summary["tasks"]["r3"]["bytes_from_device"] == 0, summary
    assert log_counts(duet.log) == {(t, rel): 1 for t in ("reader", "r2", "r3") for rel in files}
    # One device read, by the leading process; the second one took every file from the cache.
    assert 0.9 * (dataset - files[hot_rel]) < summary["device_read_bytes"] < 1.2 * dataset, summary
    assert follower["device_read_bytes"] <= 0.02 * dataset, summary
    # Cache hygiene across both processes: what the run read is gone, what was cached before is still there.
    assert still_cached(hot, files[hot_rel])
    assert [rel for rel in files if rel != hot_rel and resident(os.path.join(scope, rel))] == []
    assert followers(duet.state) == []


@excused_by_cache_drops
def test_builtin_scrub_beside_backup_counts_the_backup_s_reads_as_verified(duet, direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=16)
    dataset = sum(files.values())
    target = tmp_path / "target"
    target.mkdir()
    proc = duet("run", "backup", "scrub", "--path", scope, "--target", str(target), "--every", "0", "--json",
                "--jobs", "2")
    assert proc.returncode == 0, proc.stderr
    summary = summary_of(proc)
    scrub = summary["tasks"]["scrub"]
    assert scrub["items_done"] == len(files) and scrub["corrupt"] == [], scrub
    # The scrub, in the second process, read nothing itself: the backup's reads were checked by btrfs.
    assert summary["jobs"]["follower"]["device_read_bytes"] <= 0.02 * dataset, summary
    assert summary["device_read_bytes"] < 1.2 * dataset, summary
    (snap,) = os.listdir(target / "snapshots")
    for rel in files:
        with open(os.path.join(scope, rel), "rb") as a, open(target / "snapshots" / snap / rel, "rb") as b:
            assert a.read() == b.read()


@excused_by_cache_drops
def test_sigterm_stops_both_processes_and_the_next_run_resumes(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=16, sizes=(64 << 10,))
    proc = duet.start("run", "slow", "slow2", "--path", scope, "--json", "--jobs", "2")
    wait_for(lambda: len(read_log(duet.log)) >= 4, what="some files done")
    assert followers(duet.state), "no second process"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 5, err
    assert "Traceback" not in err, err
    summary = json.loads(out)
    assert summary["result"] not in ("complete", "budget")
    assert followers(duet.state) == []
    done = {t: summary["tasks"][t]["items_done"] for t in ("slow", "slow2")}
    counts = log_counts(duet.log)
    assert all(done[t] == sum(1 for (task, _) in counts if task == t) for t in done), (done, counts)
    again = duet("run", "slow", "slow2", "--path", scope, "--json", "--jobs", "2")
    assert again.returncode == 0, again.stderr
    counts = log_counts(duet.log)
    assert set(counts) == {(t, rel) for t in ("slow", "slow2") for rel in files} and set(counts.values()) == {1}


@excused_by_cache_drops
def test_kill_9_of_the_run_ends_its_second_process_and_a_rerun_completes(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=16, sizes=(64 << 10,))
    proc = duet.start("run", "slow", "slow2", "--path", scope, "--quiet", "--jobs", "2")
    wait_for(lambda: sum(1 for line in read_log(duet.log) if line.task == "slow2") >= 2, what="the follower working")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    wait_for(lambda: followers(duet.state) == [], timeout=15, what="the second process to end")
    db = sqlite3.connect(duet.state / "state.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()
    StateStore(str(duet.state)).close()
    evict_tree(scope)
    again = duet("run", "slow", "slow2", "--path", scope, "--json", "--jobs", "2")
    assert again.returncode == 0, again.stderr
    summary = summary_of(again)
    counts = log_counts(duet.log)
    for task in ("slow", "slow2"):
        assert {rel for t, rel in counts if t == task} == set(files)
        assert max(n for (t, _), n in counts.items() if t == task) <= 2
        assert summary["tasks"][task]["items_done"] == summary["tasks"][task]["items_total"] == len(files)


def test_jobs_other_than_1_or_2_is_one_line_and_exit_2(duet, direct_fs):
    proc = duet("run", "reader", "r2", "--path", direct_fs.mnt, "--jobs", "3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("duet: error:")]
    assert len(lines) == 1 and "--jobs 3" in lines[0], proc.stderr


def test_one_task_with_jobs_2_runs_in_one_process(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=4)
    proc = duet("run", "reader", "--path", scope, "--json", "--jobs", "2")
    assert proc.returncode == 0, proc.stderr
    summary = summary_of(proc)
    assert "jobs" not in summary and summary["tasks"]["reader"]["items_done"] == len(files)
    assert [f.relpath for f in Scope(scope).scan()]   # the scope is intact


def test_on_a_terminal_both_processes_tasks_have_bars(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=5)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(duet.argv("run", "reader", "r2", "--path", scope, "--jobs", "2"),
                                stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                                env={**duet.env, "COLUMNS": "120"})
    finally:
        os.close(follower)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:     # EIO: the run (and its second process) have exited
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=60) == 0, out
    finally:
        os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))    # without the colours
    assert "0:00:0" in text, text       # the bars
    for task in ("reader", "r2"):        # r2 ran in the second process: its bar ends full too
        assert re.search(rf"{task}\s+━+\s+{len(files)}/{len(files)}", text), text
