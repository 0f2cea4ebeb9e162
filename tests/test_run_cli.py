"""``duet run / watch / status / plugins`` as real processes, with task plugins installed as distributions.

The tasks come from :mod:`plugin_dist`: a site directory on PYTHONPATH holding test modules and their
``*.dist-info`` (entry points in ``duet.tasks``), found by duet exactly as it finds any installed plugin. The data
sets live on btrfs over a direct-I/O loop device, so the device bytes a run reports are the ones it read.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import sqlite3
import subprocess
import time

import fsimage
import plugin_dist
import pytest
from plugin_dist import (
    evict_tree,
    excused_by_cache_drops,
    log_counts,
    make_dataset,
    pinned,
    read_log,
    resident,
    still_cached,
)

from duet_core.lock import ScopeLock
from duet_core.scope import Scope
from duet_core.state import StateStore

pytestmark = pytest.mark.bpf

TASKS = {
    "reader": "ReaderTask('reader')",
    "r2": "ReaderTask('r2')",
    "r3": "ReaderTask('r3')",
    "slow": "ReaderTask('slow', sleep=0.15)",
    "slow2": "ReaderTask('slow2', sleep=0.15)",
    "picky": "ReaderTask('picky', fail='f03')",
}


class Duet(plugin_dist.CliRunner):
    """Runs ``duet`` with the test plugins installed; ``log`` is where their ReaderTasks write."""

    config_for = ("run", "watch", "status")

    def __init__(self, tmp_path):
        self.log = tmp_path / "log"
        super().__init__(tmp_path, plugin_dist.tasks_dist(TASKS), plugin_dist.broken_import_dist(),
                         plugin_dist.raising_task_dist(), plugin_dist.api_mismatch_dist(),
                         plugin_dist.misspelled_hook_dist(), log=str(self.log))

    def __call__(self, *args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
        return super().__call__(*args, timeout=timeout, env=env)


duet = Duet.fixture()


@pytest.fixture
def direct_fs(require_root):
    with fsimage.loop_fs("btrfs", direct_io=True) as fs:
        yield fs


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("duet: error:")]


def one_error(proc, code: int, needle: str) -> str:
    """The process failed with ``code`` and exactly one error line containing ``needle``, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = errors(proc)
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    return lines[0]


def summary_of(proc) -> dict:
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def wait_for(predicate, timeout: float = 15.0, what: str = "condition", proc=None, poll: float = 0.02) -> None:
    """Wait until ``predicate()``; fail after ``timeout``, or as soon as ``proc`` (a duet process) has exited."""
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"duet exited ({proc.returncode}) while waiting for {what}: {proc.stderr.read()}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def foreground_read(path: str) -> None:
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True, timeout=30)


def scan_order(scope: str) -> list[str]:
    return [f.relpath for f in Scope(scope).scan()]


# -- duet plugins ------------------------------------------------------------------------------------------------------
def test_plugins_lists_installed_tasks_and_the_broken_ones(duet):
    proc = duet("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    tasks = {t["name"]: t for t in out["tasks"]}
    assert set(TASKS) <= set(tasks)
    reader = tasks["reader"]
    assert (reader["version"], reader["package"]) == ("1.2.3", "duet-test-tasks")
    assert reader["description"] == "test task reader: reads every byte and logs each file"
    assert reader["granularity"] == "file" and "log" in reader["options"]
    broken = {b["name"]: b for b in out["broken"]}
    assert set(broken) >= {"broken", "raiser", "future", "typo"}
    assert broken["broken"]["package"] == "duet-test-broken"
    assert "No module named 'duet_test_no_such_module'" in broken["broken"]["error"]
    assert "raiser cannot declare itself" in broken["raiser"]["error"]
    assert "built for duet plugin API 99, this duet has API 1" in broken["future"]["error"]
    assert "unknown hook 'duet_proces'" in broken["typo"]["error"]
    assert not set(broken) & set(tasks)
    text = duet("plugins")
    assert text.returncode == 0
    for word in ("reader", "1.2.3", "duet-test-tasks", "broken", "duet-test-broken"):
        assert word in text.stdout


def test_plugins_trace_logs_hook_calls(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=2)
    env = dict(duet.env, DUET_TRACE_PLUGINS="1")
    proc = duet("run", "reader", "--path", scope, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    trace = [line for line in proc.stderr.splitlines() if line.startswith("duet: trace:")]
    assert any("duet_task" in line for line in trace) and any("duet_process" in line for line in trace)


# -- duet run ----------------------------------------------------------------------------------------------------------
@excused_by_cache_drops
def test_three_tasks_read_the_data_set_once_and_broken_plugins_do_not_matter(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt)
    dataset = sum(files.values())
    proc = duet("run", "reader", "r2", "r3", "--path", scope, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = summary_of(proc)
    # The broken plugins are named on stderr, once each, and skipped.
    for name in ("broken", "raiser", "future", "typo"):
        assert sum(f"plugin {name} " in line for line in proc.stderr.splitlines()) == 1, proc.stderr
    assert summary["scope"] == os.path.realpath(scope) and summary["result"] == "complete"
    assert summary["dataset_bytes"] == dataset
    assert set(summary["tasks"]) == {"reader", "r2", "r3"}
    for rep in summary["tasks"].values():
        assert (rep["items_done"], rep["items_total"], rep["items_failed"]) == (len(files), len(files), 0)
        assert rep["bytes_processed"] == dataset
        assert rep["bytes_from_cache"] + rep["bytes_from_device"] == dataset
    from_device = sum(rep["bytes_from_device"] for rep in summary["tasks"].values())
    assert abs(from_device - dataset) <= 0.05 * dataset, summary
    assert 0.9 * dataset < summary["device_read_bytes"] < 1.3 * dataset, summary
    assert log_counts(duet.log) == {(t, rel): 1 for t in ("reader", "r2", "r3") for rel in files}
    # Cache hygiene: what the run read is gone again.
    assert [rel for rel in files if resident(os.path.join(scope, rel))] == []


def test_run_without_json_prints_a_table_and_the_device_line(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=3)
    proc = duet("run", "reader", "--path", scope)
    assert proc.returncode == 0, proc.stderr
    assert "reader" in proc.stdout and "3/3" in proc.stdout
    assert "read from the device by this run" in proc.stdout


def test_run_on_a_terminal_draws_progress_bars(duet, direct_fs):
    """On a terminal (a pseudo-terminal here) the run shows a bar per task, then the same table."""
    scope, files = make_dataset(direct_fs.mnt, n=3)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(duet.argv("run", "reader", "--path", scope), stdin=subprocess.DEVNULL,
                                stdout=follower, stderr=follower, env={**duet.env, "COLUMNS": "120"})
    finally:
        os.close(follower)      # the run holds its own copy: reading ends when the run exits
    try:
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:     # EIO: the terminal's other side is closed, the run has exited
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=60) == 0, out
    finally:
        os.close(leader)
    text = out.decode(errors="replace")
    assert "0:00:0" in text, text      # the bars' elapsed-time column: only the bars print it
    assert "reader" in text and "3/3" in text and "read from the device by this run" in text, text


@excused_by_cache_drops
def test_cache_hygiene_over_the_command_line(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=6)
    order = scan_order(scope)
    hot, cold = os.path.join(scope, order[3]), os.path.join(scope, order[4])
    foreground_read(hot)
    proc = duet("run", "reader", "--path", scope, "--json")
    assert proc.returncode == 0, proc.stderr
    assert still_cached(hot, files[order[3]])
    assert resident(cold) == 0
    summary = summary_of(proc)
    assert summary["tasks"]["reader"]["bytes_from_cache"] == files[order[3]]
    # --no-cache-hygiene keeps what the run read.
    evict_tree(scope)
    proc = duet("run", "reader", "--path", scope, "--json", "--no-cache-hygiene")
    assert proc.returncode == 0, proc.stderr
    assert all(still_cached(os.path.join(scope, rel), size) for rel, size in files.items())


# -- resuming ----------------------------------------------------------------------------------------------------------
@excused_by_cache_drops
def test_kill_9_then_resume_redoes_at_most_one_file_per_task(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=8, sizes=(64 << 10, 128 << 10))
    proc = duet.start("run", "slow", "slow2", "--path", scope, "--quiet")
    wait_for(lambda: len(read_log(duet.log)) >= 5, what="some files done", proc=proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = log_counts(duet.log)
    assert len(before) < 2 * len(files), "the run finished before it was killed"
    # The state database opens cleanly and is consistent.
    db = sqlite3.connect(duet.state / "state.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()
    StateStore(str(duet.state)).close()
    status = duet("status", "--path", scope, "--json")
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("\n") == 1
    # Resume.
    again = duet("run", "slow", "slow2", "--path", scope, "--json")
    assert again.returncode == 0, again.stderr
    summary = summary_of(again)
    counts = log_counts(duet.log)
    for task in ("slow", "slow2"):
        assert {rel for t, rel in counts if t == task} == set(files)
        twice = [rel for (t, rel), n in counts.items() if t == task and n > 1]
        assert len(twice) <= 1, (task, twice)
        assert max(n for (t, _), n in counts.items() if t == task) <= 2
        assert summary["tasks"][task]["items_done"] == summary["tasks"][task]["items_total"] == len(files)
    status = json.loads(duet("status", "--path", scope, "--json").stdout)
    (sc,) = status["scopes"]
    assert all(t["complete"] and t["items_done"] == len(files) for t in sc["tasks"].values())


@excused_by_cache_drops
def test_for_budget_stops_with_exit_5_and_the_next_run_completes_the_rest(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=12, sizes=(64 << 10,))
    proc = duet("run", "slow", "--path", scope, "--for", "1s", "--json")
    assert proc.returncode == 5, proc.stderr
    first = summary_of(proc)
    assert first["result"] == "budget"
    done = first["tasks"]["slow"]["items_done"]
    assert 0 < done < len(files)
    assert first["tasks"]["slow"]["complete"] is False
    assert first["wall_s"] < 3
    status = json.loads(duet("status", "--path", scope, "--json").stdout)
    slow = status["scopes"][0]["tasks"]["slow"]
    assert (slow["items_done"], slow["items_total"], slow["complete"]) == (done, len(files), False)
    assert slow["last_result"] == "budget"
    proc = duet("run", "slow", "--path", scope, "--json")
    assert proc.returncode == 0, proc.stderr
    second = summary_of(proc)
    assert second["result"] == "complete"
    assert second["tasks"]["slow"]["bytes_processed"] == (len(files) - done) * (64 << 10)
    counts = log_counts(duet.log)
    assert set(counts) == {("slow", rel) for rel in files} and set(counts.values()) == {1}


def test_sigterm_stops_cleanly_with_exit_5_and_progress_saved(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=10, sizes=(64 << 10,))
    proc = duet.start("run", "slow", "--path", scope, "--json")
    wait_for(lambda: len(read_log(duet.log)) >= 2, what="two files done", proc=proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 1
    assert proc.returncode == 5, err
    assert "Traceback" not in err, err
    summary = json.loads(out)
    assert summary["result"] not in ("complete", "budget") and summary["tasks"]["slow"]["complete"] is False
    done = summary["tasks"]["slow"]["items_done"]
    assert done == len(read_log(duet.log)) < len(files)
    again = duet("run", "slow", "--path", scope, "--json")
    assert again.returncode == 0, again.stderr
    counts = log_counts(duet.log)
    assert set(counts) == {("slow", rel) for rel in files} and set(counts.values()) == {1}


# -- the lock ----------------------------------------------------------------------------------------------------------
def test_a_second_run_on_a_held_scope_exits_4_at_once(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=2)
    with ScopeLock(str(duet.state), scope):
        t0 = time.monotonic()
        proc = duet("run", "reader", "--path", scope, "--json")
        elapsed = time.monotonic() - t0
    line = one_error(proc, 4, "another duet run")
    assert f"(pid {os.getpid()}) is working on {os.path.realpath(scope)}" in line
    assert elapsed < 5
    assert proc.stdout == "" and not duet.log.exists()




def test_a_second_run_while_a_run_is_working_exits_4_at_once(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=20, sizes=(64 << 10,))
    first = duet.start("run", "slow", "--path", scope, "--json")
    wait_for(lambda: len(read_log(duet.log)) >= 1, what="the first run working", proc=first)
    proc = duet("run", "reader", "--path", scope, "--json", timeout=60)
    assert first.poll() is None, "the second run waited for the first to finish"
    line = one_error(proc, 4, "another duet run")
    assert f"(pid {first.pid})" in line
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=30)


def test_status_while_a_run_is_working_answers_at_once(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=20, sizes=(64 << 10,))
    first = duet.start("run", "slow", "--path", scope, "--json")
    wait_for(lambda: len(read_log(duet.log)) >= 2, what="the first run working", proc=first)
    proc = duet("status", "--path", scope, "--json", timeout=60)
    assert first.poll() is None, "status waited for the run to finish"
    assert proc.returncode == 0, proc.stderr
    (sc,) = json.loads(proc.stdout)["scopes"]
    assert 2 <= sc["tasks"]["slow"]["items_done"] < len(files)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=30)


# -- foreground reads --------------------------------------------------------------------------------------------------
@excused_by_cache_drops
def test_foreground_reads_during_a_run_are_used(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=10, sizes=(256 << 10,))
    target = scan_order(scope)[-1]
    proc = duet.start("run", "slow", "--path", scope, "--json")
    wait_for(lambda: len(read_log(duet.log)) >= 2, what="two files done", proc=proc)
    foreground_read(os.path.join(scope, target))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    entries = read_log(duet.log)
    mine = [e for e in entries if e.relpath == target]
    assert len(mine) == 1 and mine[0].cached == mine[0].pages
    rep = summary["tasks"]["slow"]
    assert rep["bytes_from_cache"] >= files[target]
    assert rep["bytes_from_device"] <= sum(files.values()) - files[target]
    assert summary["device_read_bytes"] < sum(files.values()) - files[target] + (1 << 20)


# -- duet watch --------------------------------------------------------------------------------------------------------
@excused_by_cache_drops
def test_watch_processes_only_what_is_already_cached_and_stops_on_sigterm(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=8, sizes=(128 << 10, 256 << 10))
    order = scan_order(scope)
    early, late = order[2], order[5]
    foreground_read(os.path.join(scope, early))
    # The watch takes a file only when all of it is cached: the pages are locked in memory until it has, or the
    # kernel's own reclaim (DAMON) may take one first (plugin_dist.pinned; seen failing once, most likely so).
    with pinned(os.path.join(scope, early)):
        proc = duet.start("watch", "reader", "--path", scope, "--json")
        wait_for(lambda: ("reader", early) in log_counts(duet.log), what="the cached file", proc=proc)
    foreground_read(os.path.join(scope, late))
    with pinned(os.path.join(scope, late)):
        wait_for(lambda: ("reader", late) in log_counts(duet.log), what="the file read meanwhile", proc=proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 5, err
    summary = json.loads(out)
    assert log_counts(duet.log) == {("reader", early): 1, ("reader", late): 1}
    rep = summary["tasks"]["reader"]
    assert rep["items_done"] == 2 and rep["bytes_from_device"] == 0
    assert rep["bytes_processed"] == files[early] + files[late]
    # Zero extra device reads. The exact check: with cache hygiene off in watch mode, any page of the scope duet
    # read would still be cached, and none is. device_read_bytes is only bounded: it also counts this process's own
    # code pages faulted back in when another process dropped the caches (benchmarks on this machine do).
    assert summary["device_read_bytes"] < 1 << 20, summary
    others = [rel for rel in files if rel not in (early, late)]
    assert {rel: resident(os.path.join(scope, rel)) for rel in others} == dict.fromkeys(others, 0)
    # The watch kept its progress: the round goes on from there.
    status = json.loads(duet("status", "--path", scope, "--json").stdout)
    assert status["scopes"][0]["tasks"]["reader"]["items_done"] == 2


# -- status ------------------------------------------------------------------------------------------------------------
def test_status_per_scope_and_task(duet, direct_fs, tmp_path):
    missing = duet("status", "--json")
    one_error(missing, 2, "nothing has run yet")
    scope, files = make_dataset(direct_fs.mnt, n=4)
    other = os.path.join(direct_fs.mnt, "other")
    os.mkdir(other)
    assert duet("run", "reader", "r2", "--path", scope, "--json").returncode == 0
    assert duet("run", "reader", "--path", other, "--json").returncode == 0
    everything = json.loads(duet("status", "--json").stdout)
    assert everything["state_dir"] == str(duet.state)
    assert {sc["scope"] for sc in everything["scopes"]} == {os.path.realpath(scope), os.path.realpath(other)}
    proc = duet("status", "--path", scope, "--json")
    assert proc.returncode == 0, proc.stderr
    (sc,) = json.loads(proc.stdout)["scopes"]
    assert set(sc["tasks"]) == {"reader", "r2"}
    for t in sc["tasks"].values():
        assert (t["items_done"], t["items_total"], t["complete"], t["round"]) == (len(files), len(files), True, 1)
        assert t["bytes_processed"] == sum(files.values())
        assert t["bytes_from_cache"] + t["bytes_from_device"] == t["bytes_processed"]
        assert t["last_result"] == "complete" and time.time() - 60 < t["last_run"] <= time.time()
    text = duet("status", "--path", scope)
    assert text.returncode == 0 and "reader" in text.stdout and "4/4" in text.stdout
    one_error(duet("status", "--path", str(tmp_path)), 2, "no duet run has covered")
    # --state-dir wins over $DUET_STATE_DIR.
    one_error(duet("status", "--state-dir", str(tmp_path / "elsewhere")), 2, "nothing has run yet")


# -- exit codes and bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["run", "nope", "--path", "{scope}"], "unknown task 'nope'"),
    (["run", "reder", "--path", "{scope}"], "did you mean 'reader'"),
    (["run", "broken", "--path", "{scope}"], "installed but broken"),
    (["run", "future", "--path", "{scope}"], "plugin API 99"),
    (["run", "reader", "--path", "{scope}/missing"], "not a directory"),
    (["run", "reader"], "no --path given and no scope in the config"),
    (["run", "--path", "{scope}"], "no task given"),
    (["run", "reader", "--path", "{scope}", "-o", "reader.verbose=maybe"], "not a boolean"),
    (["run", "reader", "--path", "{scope}", "-o", "reader.limit=lots"], "option 'limit'"),
    (["run", "reader", "--path", "{scope}", "-o", "reader.log=relative"], "not an absolute path"),
    (["run", "reader", "--path", "{scope}", "-o", "reader.nope=1"], "has no option 'nope'"),
    (["run", "reader", "--path", "{scope}", "-o", "readerlimit=1"], "bad -o"),
    (["run", "reader", "--path", "{scope}", "-o", "r2.limit=1"], "not part of this run"),
    (["run", "reader", "--path", "{scope}", "--nosuch", "1"], "no such option: --nosuch"),
    (["run", "reader", "--path", "{scope}", "--for", "soon"], "bad duration"),
    (["run", "reader", "--path", "{scope}", "--rate-limit", "fast"], "rate"),
    (["run", "reader", "--path", "{scope}", "--config", "{scope}/none.toml"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(duet, tmp_path, args, needle):
    scope = tmp_path / "scope"
    scope.mkdir()
    proc = duet(*(a.replace("{scope}", str(scope)) for a in args))
    one_error(proc, 2, needle)
    assert not duet.log.exists()


def test_some_items_failed_is_exit_1(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=6)
    proc = duet("run", "reader", "picky", "--path", scope, "--json", "--for", "2s")
    summary = summary_of(proc)
    assert proc.returncode == 1, (summary["result"], summary["tasks"]["picky"]["items_failed"])
    assert summary["tasks"]["picky"]["items_failed"] == 1
    assert summary["tasks"]["reader"]["items_done"] == len(files)
    assert any("picky" in line and "f03" in line for line in proc.stderr.splitlines())
    table = duet("run", "picky", "--path", scope, "--for", "2s")     # the failed file is tried again, and fails
    assert table.returncode == 1
    title = " ".join(table.stdout.split())           # (rich wraps a title longer than the table)
    assert f"— {scope} — complete, 1 failed" in title, table.stdout   # not a bare "complete"


# -- options and the config --------------------------------------------------------------------------------------------
def test_task_options_from_the_command_line_have_their_types(duet, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=2)
    log2 = duet.log.with_name("log2")
    proc = duet("run", "reader", "r2", "--path", scope, "--json", "-o", "reader.limit=5", "-o", "reader.ratio=0.5",
                "--chunk", "64KiB", "--verbose=yes", "-o", f"r2.log={log2}", "--sleep", "0")
    assert proc.returncode == 0, proc.stderr
    summary = summary_of(proc)
    reader, r2 = summary["tasks"]["reader"]["options"], summary["tasks"]["r2"]["options"]
    assert (reader["limit"], reader["ratio"], reader["chunk"], reader["verbose"]) == (5, 0.5, 65536, True)
    assert (r2["limit"], r2["chunk"], r2["verbose"], r2["sleep"]) == (0, 65536, True, 0.0)   # --KEY: every task
    assert r2["log"] == str(log2) and reader["log"] is None
    assert {e.task for e in read_log(log2)} == {"r2"}
    assert {e.task for e in read_log(duet.log)} == {"reader"}


def test_a_config_file_gives_scopes_tasks_and_options(duet, direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=4)
    other = os.path.join(direct_fs.mnt, "other")
    os.mkdir(other)
    state = tmp_path / "config-state"
    config = tmp_path / "duet.toml"
    config.write_text(f"""
state_dir = "{state}"

[defaults]
cache_hygiene = true

[[scope]]
path = "{scope}"
tasks = ["reader", "r2"]

[[scope]]
path = "{other}"
tasks = ["r3"]

[task.reader]
limit = 3
verbose = true
chunk = "8KiB"

[task.r2]
ratio = 0.25
""")
    env = {k: v for k, v in duet.env.items() if k != "DUET_STATE_DIR"}
    proc = duet("run", "--config", str(config), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    summaries = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [s["scope"] for s in summaries] == [os.path.realpath(scope), os.path.realpath(other)]
    first = summaries[0]["tasks"]
    assert set(first) == {"reader", "r2"} and set(summaries[1]["tasks"]) == {"r3"}
    assert (first["reader"]["options"]["limit"], first["reader"]["options"]["verbose"]) == (3, True)
    assert first["reader"]["options"]["chunk"] == 8192 and first["r2"]["options"]["ratio"] == 0.25
    assert log_counts(duet.log) == {(t, rel): 1 for t in ("reader", "r2") for rel in files}
    assert (state / "state.db").exists() and not duet.state.exists()
    status = duet("status", "--config", str(config), "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert {sc["scope"] for sc in json.loads(status.stdout)["scopes"]} == {os.path.realpath(scope),
                                                                          os.path.realpath(other)}
    # Naming a task runs only the scopes (and tasks) of the config that have it; -o beats [task.NAME].
    proc = duet("run", "reader", "--config", str(config), "--json", "-o", "reader.limit=4", env=env)
    assert proc.returncode == 0, proc.stderr
    (only,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert set(only["tasks"]) == {"reader"} and only["tasks"]["reader"]["options"]["limit"] == 4
    # A config budget stops a slow task with exit 5.
    config.write_text(f'state_dir = "{state}"\n[defaults]\nbudget = "1s"\n[[scope]]\npath = "{scope}"\n'
                      f'tasks = ["slow"]\n[task.slow]\nsleep = "0.5s"\n')
    proc = duet("run", "--config", str(config), "--json", env=env)
    assert proc.returncode == 5, proc.stderr
    assert summary_of(proc)["result"] == "budget"
    # A bad config is one line, exit 2.
    config.write_text(f'[[scope]]\npath = "{scope}"\ntasks = ["reader"]\nbudgt = "1h"\n')
    one_error(duet("run", "--config", str(config), env=env), 2, "unknown key")


def test_an_option_for_a_task_of_one_config_scope_is_not_an_error_for_the_others(duet, direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=2)
    other = os.path.join(direct_fs.mnt, "other")
    os.mkdir(other)
    config = tmp_path / "duet.toml"
    config.write_text(f'[[scope]]\npath = "{scope}"\ntasks = ["reader"]\n'
                      f'[[scope]]\npath = "{other}"\ntasks = ["r3"]\n')
    proc = duet("run", "--config", str(config), "--json", "-o", "reader.limit=4")
    assert proc.returncode == 0, proc.stderr
    summaries = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [set(s["tasks"]) for s in summaries] == [{"reader"}, {"r3"}]
    assert summaries[0]["tasks"]["reader"]["options"]["limit"] == 4
