"""The task framework in-process: plugins registered at runtime (never the built-ins), real runs over real loop
filesystems, the real page cache and the real state database.

Device accounting is checked where it is honest: btrfs on a loop device with direct I/O (the loop does not cache a
second time), files fsynced and evicted before a run, foreground reads done by another process (so they do not
count in this process's /proc/self/io).
"""

from __future__ import annotations

import collections
import hashlib
import os
import subprocess
import sys
import threading
import time

import fsimage
import pluggy
import plugin_dist
import pytest
from plugin_dist import (
    evict_tree,
    excused_by_cache_drops,
    log_counts,
    make_dataset,
    pages,
    read_log,
    resident,
    still_cached,
    void_on_cache_drops,
)

from duet_core import Event, ItemResult, TaskOption, TaskSpec, hookimpl
from duet_core.bench.share import loop_read_bytes
from duet_core.cli.status import collect
from duet_core.errors import DuetError
from duet_core.events import PAGE_SIZE
from duet_core.lock import ScopeBusy, ScopeLock
from duet_core.plugins import TaskRegistry, load_plugins
from duet_core.scheduler import EXIT_ITEM_ERRORS, EXIT_OK, EXIT_STOPPED, Runner, RunOptions
from duet_core.scope import Scope
from duet_core.state import StateStore

M = plugin_dist.load_source(plugin_dist.TASKS_MODULE)   # ReaderTask, the same code the installed plugins run


# -- fixtures and helpers ----------------------------------------------------------------------------------------------
@pytest.fixture
def direct_fs(require_root, bpf_required):
    """btrfs on a loop device with direct I/O: what this process reads from it is what /proc/self/io counts."""
    with fsimage.loop_fs("btrfs", direct_io=True) as fs:
        yield fs


def registry(*plugins) -> TaskRegistry:
    reg = TaskRegistry()
    for p in plugins:
        reg.add(p)
    return reg


def run_tasks(state_dir, reg: TaskRegistry, names: list[str], scope: str, log=None, **opts):
    """One run in this process; returns (summary, exit code). ``log`` goes to every task with a ``log`` option."""
    task_options = opts.pop("task_options", {})
    for n in names:
        if log is not None and any(o.name == "log" for o in reg.get(n).spec.options):
            task_options.setdefault(n, {}).setdefault("log", str(log))
    opts.setdefault("source", "bpf")
    store = StateStore(str(state_dir))
    try:
        runner = Runner(store, reg, names, scope, RunOptions(task_options=task_options, **opts))
        summary = runner.run()
        return summary, runner.exit_code(summary)
    finally:
        store.close()


def scan_order(scope: str) -> list[str]:
    """The relpaths in the order duet gives them ids (and reads uncached files)."""
    return [f.relpath for f in Scope(scope).scan()]


def foreground_read(path: str, length: int | None = None) -> None:
    """Read ``path`` (or its first ``length`` bytes, without readahead) in another process, like an application."""
    code = ("import os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "n = int(sys.argv[2]) if len(sys.argv) > 2 else os.fstat(fd).st_size\n"
            "if len(sys.argv) > 2: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)\n"
            "got = 0\n"
            "while got < n:\n"
            "    data = os.pread(fd, n - got, got)\n"
            "    if not data: break\n"
            "    got += len(data)\n")
    subprocess.run([sys.executable, "-c", code, path, *([str(length)] if length is not None else [])], check=True,
                   timeout=30)


def foreground_append(path: str, nbytes: int, fsync: bool = False) -> None:
    """Append ``nbytes`` to ``path`` in another process (a run ignores page-cache events of its own process);
    ``fsync``: written through (O_DSYNC), so the pages are dirtied and flushed within the one write call."""
    code = ("import os, sys\n"
            "sync = os.O_DSYNC if sys.argv[3] == '1' else 0\n"
            "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | sync)\n"
            "os.write(fd, os.urandom(int(sys.argv[2])))\n")
    subprocess.run([sys.executable, "-c", code, path, str(nbytes), "1" if fsync else "0"], check=True, timeout=30)


class Background(threading.Thread):
    """Runs ``fn`` next to a run in this (main) thread; ``join()`` re-raises what it raised."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.error = fn, None

    def run(self):
        try:
            self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc

    def join(self, timeout=30):
        super().join(timeout)
        if self.error is not None:
            raise self.error


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- loading plugins ---------------------------------------------------------------------------------------------------
def test_a_runtime_plugin_is_a_task():
    reg = TaskRegistry()
    task = reg.add(M.ReaderTask("reader"))
    assert task.name == "reader" and task.package == "(runtime)" and task.source == "(runtime)"
    assert reg.get("reader") is task
    assert [o.name for o in task.spec.options][:3] == ["log", "sleep", "fail"]
    with pytest.raises(DuetError, match="already provided by"):
        reg.add(M.ReaderTask("reader"))
    with pytest.raises(DuetError, match="did you mean 'reader'"):
        reg.get("reder")
    with pytest.raises(DuetError, match="installed tasks: reader"):
        reg.get("zzz")


def test_plugin_api_version_mismatch_is_refused_with_a_clear_line():
    with pytest.raises(DuetError) as err:
        TaskRegistry().add(M.ReaderTask("future", api_version=99))
    line = str(err.value)
    assert "\n" not in line
    assert "'future'" in line and "plugin API 99" in line and "API 1" in line


def test_a_plugin_that_leaves_out_its_api_version_is_refused_once_the_api_changes(monkeypatch):
    from duet_core import hookspecs

    TaskRegistry().add(M.ReaderTask("old"))          # built for API 1 without saying so: fine while duet has API 1
    monkeypatch.setattr(hookspecs, "API_VERSION", 2)
    with pytest.raises(DuetError) as err:
        TaskRegistry().add(M.ReaderTask("old"))
    assert "'old' was built for duet plugin API 1, this duet has API 2" in str(err.value)


def test_a_misspelled_hook_is_rejected():
    class Typo:
        @hookimpl
        def duet_task(self):
            return TaskSpec("typo", "misspells a hook")

        @hookimpl
        def duet_proces(self, ctx):   # sic
            return None

    reg = TaskRegistry()
    with pytest.raises(pluggy.PluginValidationError, match="duet_proces"):
        reg.add(Typo())
    assert "typo" not in reg.tasks


@pytest.mark.parametrize("spec, needle", [
    (None, "not a TaskSpec"),
    (TaskSpec("bad name!", "x"), "bad task name"),
    (TaskSpec("g", "x", granularity="block"), "granularity"),
    (TaskSpec("r", "x", reads_data="some"), "reads_data must be True or False"),
    (TaskSpec("o", "x", options=(TaskOption("n", "complex"),)), "unknown type 'complex'"),
])
def test_a_bad_declaration_is_refused(spec, needle):
    class Plugin:
        @hookimpl
        def duet_task(self):
            return spec

        @hookimpl
        def duet_process(self, ctx):
            return None

    with pytest.raises(DuetError, match=needle):
        TaskRegistry().add(Plugin())


def test_load_plugins_reports_broken_entry_points_and_keeps_the_rest(tmp_path, monkeypatch):
    """Installed distributions (entry points), in this process: each broken one is named with its package."""
    env = plugin_dist.install(tmp_path, plugin_dist.tasks_dist(), plugin_dist.broken_import_dist(),
                              plugin_dist.raising_task_dist(), plugin_dist.api_mismatch_dist(),
                              plugin_dist.misspelled_hook_dist())
    monkeypatch.syspath_prepend(plugin_dist.site_dir(env))
    for mod in ("duet_test_tasks", "duet_test_broken", "duet_test_raiser", "duet_test_future", "duet_test_typo"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    try:
        reg = load_plugins()
    finally:
        for mod in ("duet_test_tasks", "duet_test_raiser", "duet_test_future", "duet_test_typo"):
            sys.modules.pop(mod, None)
    assert {"reader", "slow"} <= set(reg.tasks)
    assert reg.get("reader").package == "duet-test-tasks" and reg.get("reader").version == "1.2.3"
    assert reg.get("slow").source == "duet_test_tasks:task_slow"
    broken = {b.name: b for b in reg.broken}
    assert set(broken) >= {"broken", "raiser", "future", "typo"}
    assert broken["broken"].package == "duet-test-broken" and "duet_test_no_such_module" in broken["broken"].error
    assert "raiser cannot declare itself" in broken["raiser"].error
    assert "plugin API 99" in broken["future"].error
    assert "duet_proces" in broken["typo"].error
    with pytest.raises(DuetError, match="installed but broken"):
        reg.get("future")


def test_task_options_are_parsed_by_type(tmp_path):
    reg = registry(M.ReaderTask("reader"))
    given = {"log": "/tmp/x/../log", "sleep": "2m", "chunk": "64KiB", "verbose": "yes", "limit": "7", "ratio": "0.5",
             "fail": 12}
    runner = Runner(StateStore(str(tmp_path / "state")), reg, ["reader"], str(tmp_path),
                    RunOptions(task_options={"reader": given}))
    assert runner.options["reader"] == {"log": "/tmp/log", "sleep": 120.0, "chunk": 65536, "verbose": True,
                                        "limit": 7, "ratio": 0.5, "fail": "12"}
    # Defaults for what is not given; values already typed (from TOML) are kept.
    runner = Runner(StateStore(str(tmp_path / "state")), reg, ["reader"], str(tmp_path),
                    RunOptions(task_options={"reader": {"verbose": False, "chunk": 4096}}))
    assert runner.options["reader"]["sleep"] == 0.0 and runner.options["reader"]["chunk"] == 4096
    assert runner.options["reader"]["verbose"] is False


@pytest.mark.parametrize("given, needle", [
    ({"nope": "1"}, "has no option 'nope'"),
    ({"verbose": "maybe"}, "not a boolean"),
    ({"log": "relative/log"}, "not an absolute path"),
    ({"limit": "many"}, "option 'limit'"),
    ({"chunk": "12 parsecs"}, "option 'chunk'"),
    ({"sleep": "soon"}, "option 'sleep'"),
])
def test_bad_task_options_name_the_task_and_option(tmp_path, given, needle):
    reg = registry(M.ReaderTask("reader"))
    with pytest.raises(DuetError, match=needle) as err:
        Runner(StateStore(str(tmp_path / "state")), reg, ["reader"], str(tmp_path),
               RunOptions(task_options={"reader": given}))
    assert "'reader'" in str(err.value)


def test_a_required_option_must_be_given(tmp_path):
    class Needs:
        @hookimpl
        def duet_task(self):
            return TaskSpec("needs", "needs a target", options=(TaskOption("target", "path", required=True),))

        @hookimpl
        def duet_process(self, ctx):
            return None

    with pytest.raises(DuetError, match="needs option 'target'"):
        Runner(StateStore(str(tmp_path / "state")), registry(Needs()), ["needs"], str(tmp_path))


def test_runner_refuses_bad_input(tmp_path):
    reg = registry(M.ReaderTask("reader"))
    store = StateStore(str(tmp_path / "state"))
    with pytest.raises(DuetError, match="no task given"):
        Runner(store, reg, [], str(tmp_path))
    with pytest.raises(DuetError, match="named twice"):
        Runner(store, reg, ["reader", "reader"], str(tmp_path))
    with pytest.raises(DuetError, match="not a directory"):
        Runner(store, reg, ["reader"], str(tmp_path / "missing"))
    with pytest.raises(DuetError, match="unknown task 'writer'"):
        Runner(store, reg, ["writer"], str(tmp_path))


# -- one read for N tasks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fstype", ["btrfs-direct", "ext4"])
@excused_by_cache_drops
def test_three_tasks_over_one_data_set_read_it_once(request, tmp_path, fstype):
    fs = request.getfixturevalue("direct_fs" if fstype == "btrfs-direct" else "ext4_fs")
    if fstype == "ext4":
        request.getfixturevalue("bpf_required")
    scope, files = make_dataset(fs.mnt)
    dataset = sum(files.values())
    names = ["r1", "r2", "r3"]
    log = tmp_path / "log"
    summary, code = run_tasks(tmp_path / "state", registry(*(M.ReaderTask(n) for n in names)), names, scope, log=log)
    assert code == EXIT_OK and summary["result"] == "complete"
    assert log_counts(log) == {(t, rel): 1 for t in names for rel in files}
    assert summary["dataset_bytes"] == dataset
    for t in names:
        rep = summary["tasks"][t]
        assert (rep["items_done"], rep["items_total"], rep["items_failed"]) == (len(files), len(files), 0)
        assert rep["bytes_processed"] == dataset
        assert rep["bytes_from_cache"] + rep["bytes_from_device"] == dataset
    from_device = sum(summary["tasks"][t]["bytes_from_device"] for t in names)
    assert abs(from_device - dataset) <= 0.05 * dataset, summary
    assert summary["device_read_bytes"] < 1.3 * dataset, summary
    assert summary["device_read_bytes"] > 0.9 * dataset, summary   # the accounting sees the one read


# -- resuming ----------------------------------------------------------------------------------------------------------
@excused_by_cache_drops
def test_stopped_by_budget_resumes_without_repeating_done_files(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=12, sizes=(64 << 10,))
    log = tmp_path / "log"
    reg = registry(M.ReaderTask("slow", sleep=0.15), M.ReaderTask("fast"))
    first, code = run_tasks(tmp_path / "state", reg, ["slow", "fast"], scope, log=log, budget_s=0.6)
    assert code == EXIT_STOPPED and first["result"] == "budget"
    slow = first["tasks"]["slow"]
    assert 0 < slow["items_done"] < len(files)
    assert slow["complete"] is False and slow["finished_complete"] is False   # duet_finish ran, knowing
    done_first = {rel for t, rel in log_counts(log) if t == "slow"}
    assert len(done_first) == slow["items_done"]
    evict_tree(scope)

    second, code = run_tasks(tmp_path / "state", reg, ["slow", "fast"], scope, log=log)
    assert code == EXIT_OK and second["result"] == "complete"
    assert second["tasks"]["slow"]["items_done"] == len(files)
    assert second["tasks"]["slow"]["finished_complete"] is True
    counts = log_counts(log)
    assert {rel for t, rel in counts if t == "slow"} == set(files)
    assert max(counts.values()) == 1, counts         # no file was processed twice by a task
    assert second["tasks"]["slow"]["bytes_processed"] == sum(files[r] for r in files if r not in done_first)


@void_on_cache_drops
def test_an_early_stop_leaves_nothing_the_run_read_in_the_cache(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=8, sizes=(64 << 10,))
    summary, code = run_tasks(tmp_path / "state", registry(M.ReaderTask("slow", sleep=0.15)), ["slow"], scope,
                              log=tmp_path / "log", budget_s=0.6)
    assert code == EXIT_STOPPED and 0 < summary["tasks"]["slow"]["items_done"] < len(files)
    assert [rel for rel in files if resident(os.path.join(scope, rel))] == []


def test_a_completed_round_starts_a_new_one(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=4)
    log = tmp_path / "log"

    class Rounds(M.ReaderTask):
        rounds: list[int] = []

        @hookimpl
        def duet_finish(self, run, report):
            self.rounds.append(run.round)

    reg = registry(Rounds("reader"))
    for _ in range(2):
        summary, code = run_tasks(tmp_path / "state", reg, ["reader"], scope, log=log)
        assert code == EXIT_OK
    assert Rounds.rounds == [1, 2]
    assert set(log_counts(log).values()) == {2}


# -- the lock ----------------------------------------------------------------------------------------------------------
def test_a_held_scope_is_busy_at_once(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=2)
    state = tmp_path / "state"
    reg = registry(M.ReaderTask("reader"))
    with ScopeLock(str(state), scope):
        t0 = time.monotonic()
        with pytest.raises(ScopeBusy) as err:
            run_tasks(state, reg, ["reader"], scope, log=tmp_path / "log")
        assert time.monotonic() - t0 < 1.0
    assert err.value.exit_code == 4
    assert f"another duet run (pid {os.getpid()}) is working on {os.path.realpath(scope)}" in str(err.value)
    assert not (tmp_path / "log").exists()
    # Released: the run goes ahead.
    summary, code = run_tasks(state, reg, ["reader"], scope, log=tmp_path / "log")
    assert code == EXIT_OK


# -- cache hygiene -----------------------------------------------------------------------------------------------------
@excused_by_cache_drops
def test_cache_hygiene_keeps_what_was_cached_and_drops_what_the_run_read(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=8)
    order = scan_order(scope)
    a, b = order[2], order[3]
    pa, pb = os.path.join(scope, a), os.path.join(scope, b)
    foreground_read(pa)
    assert resident(pa) == pages(files[a]) and resident(pb) == 0
    summary, code = run_tasks(tmp_path / "state", registry(M.ReaderTask("reader"), M.ReaderTask("other")),
                              ["reader", "other"], scope, log=tmp_path / "log")
    assert code == EXIT_OK
    assert still_cached(pa, files[a])           # cached before the run: kept
    assert resident(pb) == 0
    assert {rel: resident(os.path.join(scope, rel)) for rel in files if rel != a} == {rel: 0 for rel in files
                                                                                       if rel != a}
    # a came from the cache for both tasks; everything else from the device, once.
    assert summary["tasks"]["reader"]["bytes_from_cache"] == files[a]
    assert summary["tasks"]["reader"]["bytes_from_device"] == sum(files.values()) - files[a]
    assert summary["tasks"]["other"]["bytes_from_device"] == 0
    # And it went first: cached files before uncached ones.
    assert read_log(tmp_path / "log")[0].relpath == a


class KeepingTask(M.ReaderTask):
    """Reads every file and asks to keep it cached; releases the first file it kept once it reaches the last."""

    def __init__(self, name="keeper", release_at=None):
        super().__init__(name)
        self.release_at, self.kept, self.resident_at_release = release_at, [], None

    @hookimpl
    def duet_process(self, ctx):
        super().duet_process(ctx)
        if ctx.file.relpath == self.release_at:
            self.resident_at_release = resident(os.path.join(ctx.run.root, self.kept[0][1]))
            ctx.run.release_cached(self.kept[0][0])
            return None
        self.kept.append((ctx.file.id, ctx.file.relpath))
        return ItemResult(keep_cached=True)


@excused_by_cache_drops
def test_pages_kept_for_a_task_stay_until_released_and_go_at_the_end(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=6, sizes=(256 << 10,))
    order = scan_order(scope)
    task = KeepingTask(release_at=order[-1])
    probe = []

    class Probe(M.ReaderTask):   # after the keeper on each file: how much of the first file is still cached
        @hookimpl
        def duet_process(self, ctx):
            probe.append(resident(os.path.join(scope, order[0])))

    summary, code = run_tasks(tmp_path / "state", registry(task, Probe("probe")), ["keeper", "probe"], scope)
    assert code == EXIT_OK
    first = pages(files[order[0]])
    assert probe == [first] * (len(order) - 1) + [0]     # kept while the others came, gone once released
    assert task.resident_at_release == pages(files[order[0]])
    # Released early (the first), or at the end of the run (the rest): nothing the run read is left cached.
    assert {rel: resident(os.path.join(scope, rel)) for rel in files} == {rel: 0 for rel in files}
    assert summary["tasks"]["keeper"]["bytes_from_device"] == sum(files.values())


@excused_by_cache_drops
def test_cache_hygiene_off_leaves_the_run_s_reads_cached(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=3)
    summary, code = run_tasks(tmp_path / "state", registry(M.ReaderTask("reader")), ["reader"], scope,
                              log=tmp_path / "log", cache_hygiene=False)
    assert code == EXIT_OK
    assert all(still_cached(os.path.join(scope, rel), size) for rel, size in files.items())


# -- a broken plugin is isolated ---------------------------------------------------------------------------------------
def test_a_task_failing_on_one_file_fails_that_item_only(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=6)
    bad = scan_order(scope)[1]
    log = tmp_path / "log"
    reg = registry(M.ReaderTask("reader"), M.ReaderTask("picky", fail=bad))
    summary, code = run_tasks(tmp_path / "state", reg, ["reader", "picky"], scope, log=log, budget_s=2)
    assert summary["result"] != "budget", "the run did not finish: the failed item kept it busy"
    picky = summary["tasks"]["picky"]
    assert picky["items_failed"] == 1 and picky["items_done"] == len(files) - 1
    assert picky["errors"] == [f"{bad}: RuntimeError: picky refuses {bad}"]
    assert summary["tasks"]["reader"]["items_done"] == len(files)
    assert code == EXIT_ITEM_ERRORS
    assert log_counts(log) == {**{("reader", r): 1 for r in files}, **{("picky", r): 1 for r in files if r != bad}}


def test_a_task_failing_on_every_file_does_not_hold_up_the_others(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=6)
    log = tmp_path / "log"
    reg = registry(M.ReaderTask("reader"), M.ReaderTask("crasher", fail="/"))
    summary, code = run_tasks(tmp_path / "state", reg, ["crasher", "reader"], scope, log=log, budget_s=2)
    assert summary["result"] != "budget", "the run did not finish: failed items kept it busy"
    assert summary["tasks"]["crasher"]["items_failed"] == len(files)
    assert summary["tasks"]["reader"]["items_done"] == len(files)
    assert code == EXIT_ITEM_ERRORS


class FinishRaises(M.ReaderTask):
    @hookimpl
    def duet_finish(self, run, report):
        raise RuntimeError("finish blew up")


class PlanRaises(M.ReaderTask):
    @hookimpl
    def duet_plan(self, run, files):
        raise RuntimeError("plan blew up")


def test_a_task_raising_in_duet_finish_is_isolated(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=3)
    reg = registry(FinishRaises("bad"), M.ReaderTask("good"))
    summary, code = run_tasks(tmp_path / "state", reg, ["bad", "good"], scope, log=tmp_path / "log")
    assert summary["tasks"]["good"]["finished_complete"] is True
    assert any("finish blew up" in e for e in summary["tasks"]["bad"]["errors"])
    assert summary["tasks"]["bad"]["items_done"] == len(files)
    assert code == EXIT_ITEM_ERRORS
    store = StateStore(str(tmp_path / "state"))
    try:
        (sc,) = collect(store, scope)
    finally:
        store.close()
    assert sc["tasks"]["good"]["last_result"] == "complete"     # the run was recorded as ended


def test_a_task_raising_in_duet_plan_is_isolated(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=3)
    log = tmp_path / "log"
    reg = registry(PlanRaises("bad"), M.ReaderTask("good"))
    summary, code = run_tasks(tmp_path / "state", reg, ["bad", "good"], scope, log=log)
    assert summary["tasks"]["good"]["items_done"] == len(files)
    assert {rel for t, rel in log_counts(log) if t == "good"} == set(files)
    assert any("plan blew up" in e for e in summary["tasks"]["bad"]["errors"])
    assert summary["tasks"]["bad"]["items_done"] == 0 and code == EXIT_ITEM_ERRORS


# -- foreground reads during a run -------------------------------------------------------------------------------------
@excused_by_cache_drops
def test_foreground_reads_during_a_run_are_used(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=10, sizes=(256 << 10,))
    order = scan_order(scope)
    target = order[-1]                      # the file the run would read last
    log = tmp_path / "log"

    def app():
        wait_for(lambda: len(read_log(log)) >= 2, what="two files done")
        foreground_read(os.path.join(scope, target))

    bg = Background(app)
    bg.start()
    summary, code = run_tasks(tmp_path / "state", registry(M.ReaderTask("slow", sleep=0.15)), ["slow"], scope,
                              log=log)
    bg.join()
    assert code == EXIT_OK
    entries = read_log(log)
    assert [e.relpath for e in entries].count(target) == 1
    pos = [e.relpath for e in entries].index(target)
    assert entries[pos].cached == entries[pos].pages, "handed over before the foreground read had cached it"
    assert pos < len(order) - 1, "processed last, as if nobody had read it"
    rep = summary["tasks"]["slow"]
    assert rep["bytes_from_cache"] >= files[target]
    assert rep["bytes_from_device"] <= sum(files.values()) - files[target]
    # The application's pages stay cached (they are not the run's to drop).
    assert still_cached(os.path.join(scope, target), files[target])


# -- MODIFIED ----------------------------------------------------------------------------------------------------------
def _modified_run(direct_fs, tmp_path, fsync: bool):
    scope, files = make_dataset(direct_fs.mnt, n=6, sizes=(64 << 10,))
    victim = scan_order(scope)[0]
    path = os.path.join(scope, victim)
    log = tmp_path / "log"
    reg = registry(M.ReaderTask("watcher", sleep=0.2, events=Event.EXISTS | Event.MODIFIED),
                   M.ReaderTask("plain", sleep=0.0))

    def writer():
        wait_for(lambda: {("watcher", victim), ("plain", victim)} <= set(log_counts(log)), what="victim done")
        foreground_append(path, 8192, fsync=fsync)
        if not fsync:   # written back a little later, as an application's fsync or the kernel's write-back would
            time.sleep(0.8)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    bg = Background(writer)
    bg.start()
    summary, code = run_tasks(tmp_path / "state", reg, ["watcher", "plain"], scope, log=log)
    bg.join()
    os.sync()
    return summary, code, log_counts(log), files, victim


@excused_by_cache_drops
def test_a_file_written_during_the_run_is_processed_again_by_tasks_that_asked(direct_fs, tmp_path):
    summary, code, counts, files, victim = _modified_run(direct_fs, tmp_path, fsync=False)
    assert code == EXIT_OK
    assert counts[("watcher", victim)] >= 2
    assert counts[("plain", victim)] == 1
    assert all(counts[(t, rel)] == 1 for t in ("watcher", "plain") for rel in files if rel != victim)
    assert summary["tasks"]["plain"]["items_done"] == len(files)


@void_on_cache_drops   # drop_caches syncs: the dirty pages would be written back early
def test_a_file_written_once_is_processed_again_once(direct_fs, tmp_path):
    summary, code, counts, files, victim = _modified_run(direct_fs, tmp_path, fsync=False)
    assert counts[("watcher", victim)] == 2


@excused_by_cache_drops
def test_a_file_processed_again_is_counted_once_in_the_report(direct_fs, tmp_path):
    summary, code, counts, files, victim = _modified_run(direct_fs, tmp_path, fsync=False)
    assert counts[("watcher", victim)] >= 2
    rep = summary["tasks"]["watcher"]
    assert (rep["items_done"], rep["items_total"]) == (len(files), len(files))


@excused_by_cache_drops
def test_a_file_written_and_fsynced_during_the_run_is_processed_again(direct_fs, tmp_path):
    summary, code, counts, files, victim = _modified_run(direct_fs, tmp_path, fsync=True)
    assert code == EXIT_OK
    assert counts[("watcher", victim)] == 2
    assert counts[("plain", victim)] == 1


# -- range tasks: duet_observe -----------------------------------------------------------------------------------------
class RangeTask:
    """A range task (a scrub): foreground reads of pages it still needs count as done, through duet_observe."""

    def __init__(self, name="ranger", sleep=0.0):
        self.name, self.sleep = name, sleep
        self.processed: dict[str, list[tuple[int, int]]] = {}
        self.observed: dict[str, list[tuple[int, int]]] = {}
        self.items = 0

    @hookimpl
    def duet_task(self):
        return TaskSpec(self.name, "range test task", events=Event.EXISTS | Event.ADDED, granularity="range")

    @hookimpl
    def duet_observe(self, run, file, added):
        self.observed.setdefault(file.relpath, []).extend(added)
        return added

    @hookimpl
    def duet_process(self, ctx):
        for first, count in ctx.ranges:
            ctx.pread(count * PAGE_SIZE, first * PAGE_SIZE)
        self.processed.setdefault(ctx.file.relpath, []).extend(ctx.ranges)
        time.sleep(self.sleep)
        self.items += 1


def _covered(ranges) -> set[int]:
    return {p for first, count in ranges for p in range(first, first + count)}


def _ranger_with_a_reader(fs, evict_after: bool = False):
    """A data set, a RangeTask, and an application that reads pages 0-31 of the last file (no readahead) once the
    task has done two files — then evicts the data set again if ``evict_after``. Returns (scope, files, target,
    task, the running application thread)."""
    scope, files = make_dataset(fs.mnt, n=8, sizes=(256 << 10,))
    target = scan_order(scope)[-1]
    task = RangeTask(sleep=0.15)

    def app():
        wait_for(lambda: task.items >= 2, what="two files done")
        foreground_read(os.path.join(scope, target), length=32 * PAGE_SIZE)
        if evict_after:
            evict_tree(scope)

    bg = Background(app)
    bg.start()
    return scope, files, target, task, bg


def _every_page_done_once(task, files) -> None:
    """Every page of every file is done: by processing or by observation."""
    for rel, size in files.items():
        assert _covered(task.processed.get(rel, [])) | _covered(task.observed.get(rel, [])) == set(range(pages(size)))


@excused_by_cache_drops
def test_a_range_task_counts_pages_foreground_reads_brought_in_as_done(direct_fs, tmp_path):
    scope, files, target, task, bg = _ranger_with_a_reader(direct_fs)
    summary, code = run_tasks(tmp_path / "state", registry(task), ["ranger"], scope)
    bg.join()
    assert code == EXIT_OK
    assert _covered(task.observed[target]) >= set(range(32))
    assert task.processed[target] == [(32, 32)], "pages the application read were processed again"
    rep = summary["tasks"]["ranger"]
    assert rep["items_done"] == len(files)
    assert rep["counters"]["pages_observed"] >= 32
    assert rep["bytes_from_cache"] >= 32 * PAGE_SIZE
    _every_page_done_once(task, files)


@excused_by_cache_drops
def test_pages_observed_before_a_stop_are_not_read_by_the_next_run(direct_fs, tmp_path):
    """A run stopped before it reached a file keeps the pages others read of it: the next run reads only the rest."""
    # Read and gone again: the run is told of the read, but has no cached file to take now.
    scope, files, target, task, bg = _ranger_with_a_reader(direct_fs, evict_after=True)
    first, code = run_tasks(tmp_path / "state", registry(task), ["ranger"], scope, budget_s=0.6)
    bg.join()
    assert code == EXIT_STOPPED
    assert _covered(task.observed[target]) >= set(range(32))
    evict_tree(scope)

    second, code = run_tasks(tmp_path / "state", registry(task), ["ranger"], scope)
    assert code == EXIT_OK
    assert task.processed[target] == [(32, 32)], "pages read before the stop were read again"
    _every_page_done_once(task, files)     # over the two runs


@excused_by_cache_drops
def test_a_range_task_is_not_told_of_the_run_s_own_reads(direct_fs, tmp_path):
    """duet_observe is for pages *someone else* brought in; the run's own reads (and read-ahead) are not."""
    scope, files = make_dataset(direct_fs.mnt, n=6, sizes=(128 << 10,))
    task = RangeTask(sleep=0.05)
    summary, code = run_tasks(tmp_path / "state", registry(task), ["ranger"], scope)
    assert code == EXIT_OK
    assert task.observed == {}
    assert {rel: _covered(r) for rel, r in task.processed.items()} == {rel: set(range(pages(s)))
                                                                      for rel, s in files.items()}
    assert summary["tasks"]["ranger"]["bytes_from_device"] == sum(files.values())
    assert [rel for rel in files if resident(os.path.join(scope, rel))] == []


def trickle_read(paths: list[str], pause: float) -> subprocess.Popen:
    """An application reading ``paths`` in another process, a page at a time (no readahead), ``pause`` s apart, a
    page of each file in turn (so it is still reading the others when one is taken from it)."""
    code = ("import os, sys, time\n"
            "fds = [os.open(p, os.O_RDONLY) for p in sys.argv[2:]]\n"
            "for fd in fds: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)\n"
            "for off in range(0, max(os.fstat(fd).st_size for fd in fds), 4096):\n"
            "    for fd in fds:\n"
            "        os.pread(fd, 4096, off)\n"
            "        time.sleep(float(sys.argv[1]))\n")
    return subprocess.Popen([sys.executable, "-c", code, str(pause), *paths])


@excused_by_cache_drops
def test_a_run_leaves_the_device_to_an_application_reading_the_scope(direct_fs, tmp_path):
    """Idle I/O where ioprio does nothing (a loop device has no I/O scheduler): while another process reads files
    of the scope, the run reads nothing that is not cached; it takes what that process cached, and reads the rest
    once it has stopped — so each page comes from the device once, for both."""
    scope, files = make_dataset(direct_fs.mnt, n=8, sizes=(128 << 10,))
    order = scan_order(scope)
    theirs = order[4:]      # the files the run, in scan order, would come to last
    device_before = loop_read_bytes(direct_fs.loopdev)
    app = trickle_read([os.path.join(scope, rel) for rel in theirs], pause=0.02)   # ~2.6 s for its 128 pages
    try:
        wait_for(lambda: resident(os.path.join(scope, theirs[0])), what="the application reading")
        # A slow task (0.1 s a file), so the run hears of the application before it has read everything.
        summary, code = run_tasks(tmp_path / "state", registry(M.ReaderTask("reader", sleep=0.1)), ["reader"], scope)
        assert app.wait(timeout=30) == 0
    finally:
        app.kill()
        app.wait()
    assert code == EXIT_OK and summary["tasks"]["reader"]["items_done"] == len(files)
    assert summary["phases"]["foreground_wait_s"] > 0.5
    mine = sum(files[rel] for rel in order[:4])
    # Its own half, and at most one of the application's files (taken before the run had heard of the application).
    assert mine <= summary["tasks"]["reader"]["bytes_from_device"] <= mine + (128 << 10)
    assert loop_read_bytes(direct_fs.loopdev) - device_before <= sum(files.values()) + (1 << 20)   # + metadata


@excused_by_cache_drops
def test_a_task_that_needs_more_than_is_cached_waits_for_it_within_the_run(require_root, bpf_required, tmp_path):
    """While the run waits for an application, items hold cached pages only (``ctx.cached_only``). A scrub of ext4
    hashes whole files: it declines a partly cached one (``done=False``), which then stays pending in this run —
    it is hashed once, when it can be, not once per cached page nor left for the next run."""
    with fsimage.loop_fs("ext4", direct_io=True) as fs:
        scope, files = make_dataset(fs.mnt, n=8, sizes=(128 << 10,))
        theirs = scan_order(scope)[4:]
        app = trickle_read([os.path.join(scope, rel) for rel in theirs], pause=0.02)
        try:
            wait_for(lambda: resident(os.path.join(scope, theirs[0])), what="the application reading")
            reg = load_plugins()
            reg.add(M.ReaderTask("reader", sleep=0.1))    # a slow companion: the run hears of the application
            summary, code = run_tasks(tmp_path / "state", reg, ["scrub", "reader"], scope,
                                      task_options={"scrub": {"every": "0"}})
            assert app.wait(timeout=30) == 0
        finally:
            app.kill()
            app.wait()
    assert code == EXIT_OK and summary["phases"]["foreground_wait_s"] > 0.5
    scrub = summary["tasks"]["scrub"]
    assert scrub["items_done"] == len(files) and "deferred" not in scrub["counters"]
    assert scrub["bytes_processed"] == sum(files.values())    # every file hashed once


@excused_by_cache_drops
def test_duet_observe_is_only_for_range_tasks_that_ask_for_added(direct_fs, tmp_path):
    class FileObserver(M.ReaderTask):
        calls = 0

        @hookimpl
        def duet_observe(self, run, file, added):
            FileObserver.calls += 1

    scope, files = make_dataset(direct_fs.mnt, n=4)
    order = scan_order(scope)
    log = tmp_path / "log"

    def app():
        wait_for(lambda: len(read_log(log)) >= 1, what="one file done")
        foreground_read(os.path.join(scope, order[-1]))

    bg = Background(app)
    bg.start()
    summary, code = run_tasks(tmp_path / "state", registry(FileObserver("fileobs", sleep=0.15)), ["fileobs"], scope,
                              log=log)
    bg.join()
    assert code == EXIT_OK and FileObserver.calls == 0


# -- shared results, a task's own state --------------------------------------------------------------------------------
class Hasher:
    name = "hasher"

    @hookimpl
    def duet_task(self):
        return TaskSpec(self.name, "hashes files and shares the hash")

    @hookimpl
    def duet_process(self, ctx):
        digest = hashlib.sha256(ctx.pread(ctx.file.size, 0)).hexdigest()
        ctx.shared.put(ctx.file, "sha256", digest)


class HashUser:
    name = "hashuser"

    @hookimpl
    def duet_task(self):
        return TaskSpec(self.name, "uses the shared hash, or computes it")

    @hookimpl
    def duet_process(self, ctx):
        digest = ctx.shared.get(ctx.file, "sha256")
        if digest is not None:
            ctx.state.put(ctx.file.relpath, digest)
            return ItemResult(counters={"reused": 1})
        digest = hashlib.sha256(ctx.pread(ctx.file.size, 0)).hexdigest()
        ctx.state.put(ctx.file.relpath, digest)
        return ItemResult(counters={"computed": 1})


@excused_by_cache_drops
def test_shared_results_are_reused_for_the_same_file_version_only(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=5)
    reg = registry(Hasher(), HashUser())
    state = tmp_path / "state"
    summary, code = run_tasks(state, reg, ["hasher"], scope)
    assert code == EXIT_OK
    summary, code = run_tasks(state, reg, ["hashuser"], scope)
    assert code == EXIT_OK
    assert summary["tasks"]["hashuser"]["counters"] == {"reused": len(files)}
    changed = scan_order(scope)[0]
    with open(os.path.join(scope, changed), "ab") as fh:
        fh.write(b"more")
    evict_tree(scope)
    summary, code = run_tasks(state, reg, ["hashuser"], scope)      # a new round, still without the hasher
    assert code == EXIT_OK
    assert summary["tasks"]["hashuser"]["counters"] == {"reused": len(files) - 1, "computed": 1}
    store = StateStore(str(state))
    try:
        want = {}
        for rel in files:
            with open(os.path.join(scope, rel), "rb") as fh:
                want[rel] = hashlib.sha256(fh.read()).hexdigest()
            assert store.kv_get("hashuser", rel) == want[rel]
        # Many keys at once (more than one query's worth), unset ones left out; a batch's puts and deletes count.
        keys = [*files, *(f"nope{i}" for i in range(1200))]
        assert store.kv_get_many("hashuser", keys) == want
        store.begin_batch()
        gone, rel0 = sorted(files)[:2]
        store.kv_put("hashuser", rel0, "new")
        store.kv_delete("hashuser", gone)
        expect = {**want, rel0: "new"}
        del expect[gone]
        assert store.kv_get_many("hashuser", keys) == expect
        store.commit_batch(again=False)
        # The shared value of the changed file belongs to its old version: not handed out for the new one.
        sid = store.scope_id(os.path.realpath(scope))
        info = {f.relpath: f for f in store.files(sid)}[changed]
        assert store.shared_get(info, "sha256") is None
    finally:
        store.close()


@excused_by_cache_drops
def test_a_task_that_reads_nothing_costs_no_device_reads(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=10, sizes=(256 << 10,))
    reg = registry(Hasher(), HashUser())
    run_tasks(tmp_path / "state", reg, ["hasher"], scope)
    evict_tree(scope)
    summary, code = run_tasks(tmp_path / "state", reg, ["hashuser"], scope)
    assert code == EXIT_OK
    assert summary["tasks"]["hashuser"]["counters"] == {"reused": len(files)}
    assert summary["tasks"]["hashuser"]["bytes_from_device"] == 0
    assert summary["device_read_bytes"] < 0.25 * sum(files.values()), summary


def test_a_shared_result_is_reused_by_another_task_of_the_same_run(direct_fs, tmp_path):
    """The hookspec: a file is handed to every task that needs it one after the other, so what the first task
    shares is there for the next."""
    scope, files = make_dataset(direct_fs.mnt, n=5)
    summary, code = run_tasks(tmp_path / "state", registry(Hasher(), HashUser()), ["hasher", "hashuser"], scope)
    assert code == EXIT_OK
    assert summary["tasks"]["hashuser"]["counters"] == {"reused": len(files)}


def test_a_task_s_state_persists_between_runs(direct_fs, tmp_path):
    class Counter(M.ReaderTask):
        @hookimpl
        def duet_process(self, ctx):
            seen = ctx.state.get("seen", [])
            ctx.state.put("seen", seen + [ctx.file.relpath])

        @hookimpl
        def duet_finish(self, run, report):
            run.state.put("runs", run.state.get("runs", 0) + 1)
            return {"runs": run.state.get("runs"), "seen": len(run.state.get("seen", []))}

    scope, files = make_dataset(direct_fs.mnt, n=3)
    reg = registry(Counter("counter"))
    first, _ = run_tasks(tmp_path / "state", reg, ["counter"], scope)
    second, _ = run_tasks(tmp_path / "state", reg, ["counter"], scope)
    assert (first["tasks"]["counter"]["runs"], first["tasks"]["counter"]["seen"]) == (1, 3)
    assert (second["tasks"]["counter"]["runs"], second["tasks"]["counter"]["seen"]) == (2, 6)


# -- planning ----------------------------------------------------------------------------------------------------------
class Planner(M.ReaderTask):
    """Wants only files under a/; records every batch duet_plan is given."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.batches: list[list[str]] = []

    @hookimpl
    def duet_plan(self, run, files):
        self.batches.append([f.relpath for f in files])
        assert run.task == self.name and run.state is not None and run.shared is not None
        return [f.id for f in files if f.relpath.startswith("a/")]


@excused_by_cache_drops
def test_duet_plan_chooses_the_files_and_a_resumed_round_plans_only_new_ones(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=10, sizes=(64 << 10,))
    wanted = sorted(rel for rel in files if rel.startswith("a/"))
    log = tmp_path / "log"
    task = Planner("planner", sleep=0.15)
    reg = registry(task)
    first, code = run_tasks(tmp_path / "state", reg, ["planner"], scope, log=log, budget_s=0.4)
    assert code == EXIT_STOPPED
    assert [sorted(b) for b in task.batches] == [sorted(files)]
    assert first["tasks"]["planner"]["items_total"] == len(wanted)
    for rel in ("a/new", "b/new"):
        with open(os.path.join(scope, rel), "wb") as fh:
            fh.write(os.urandom(8192))
    evict_tree(scope)
    task.batches.clear()
    second, code = run_tasks(tmp_path / "state", reg, ["planner"], scope, log=log)
    assert code == EXIT_OK
    assert [sorted(b) for b in task.batches] == [["a/new", "b/new"]]
    assert second["tasks"]["planner"]["items_total"] == len(wanted) + 1
    assert second["tasks"]["planner"]["items_done"] == len(wanted) + 1
    assert log_counts(log) == {("planner", rel): 1 for rel in wanted + ["a/new"]}


# -- watch -------------------------------------------------------------------------------------------------------------
@excused_by_cache_drops
def test_watch_processes_only_what_is_cached(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=6, sizes=(128 << 10,))
    order = scan_order(scope)
    early, late, half = order[1], order[4], order[2]
    foreground_read(os.path.join(scope, early))            # cached before the watch starts
    log = tmp_path / "log"

    def app():
        wait_for(lambda: log_counts(log).get(("reader", early)), what="the cached file")
        foreground_read(os.path.join(scope, half), length=8 * PAGE_SIZE)   # partly cached: not for a file task
        foreground_read(os.path.join(scope, late))

    bg = Background(app)
    bg.start()
    summary, code = run_tasks(tmp_path / "state", registry(M.ReaderTask("reader")), ["reader"], scope, log=log,
                              mode="watch", budget_s=2.5, watch_interval=0.1, cache_hygiene=False)
    bg.join()
    assert code == EXIT_STOPPED and summary["result"] == "budget"
    assert log_counts(log) == {("reader", early): 1, ("reader", late): 1}
    assert summary["tasks"]["reader"]["bytes_from_device"] == 0
    assert summary["tasks"]["reader"]["items_done"] == 2
    # Zero extra device reads: no file of the scope came into the cache but those the application read (with cache
    # hygiene off, whatever duet read would still be there). device_read_bytes is only bounded: it also counts code
    # pages of this process faulted back in after another process dropped the caches.
    assert {rel: resident(os.path.join(scope, rel)) for rel in files if rel not in (early, late, half)} == {
        rel: 0 for rel in files if rel not in (early, late, half)}
    assert resident(os.path.join(scope, half)) < pages(files[half])
    assert summary["device_read_bytes"] < 1 << 20, summary


def test_watch_takes_again_a_file_rewritten_shorter(direct_fs, tmp_path):
    """A file rewritten (truncated, then written shorter) after the watch processed it is processed again once its
    new, smaller content is cached: readiness is judged against the file's size now, not at the scan."""
    scope, files = make_dataset(direct_fs.mnt, n=2, sizes=(256 << 10,))
    target = scan_order(scope)[0]
    path = os.path.join(scope, target)
    foreground_read(path)
    log = tmp_path / "log"

    def app():
        wait_for(lambda: log_counts(log).get(("reader", target)), what="the first pass")
        subprocess.run([sys.executable, "-c",     # another process: O_TRUNC, then a quarter of the old size
                        "import os, sys\nwith open(sys.argv[1], 'wb') as fh:\n    fh.write(os.urandom(64 << 10))\n"
                        "    fh.flush()\n    os.fsync(fh.fileno())\n", path], check=True, timeout=30)

    bg = Background(app)
    bg.start()
    task = M.ReaderTask("reader", events=Event.EXISTS | Event.MODIFIED)
    summary, code = run_tasks(tmp_path / "state", registry(task), ["reader"], scope, log=log, mode="watch",
                              budget_s=3, watch_interval=0.1,
                              cache_hygiene=False)
    bg.join()
    assert code == EXIT_STOPPED
    assert log_counts(log)[("reader", target)] == 2


# -- status ------------------------------------------------------------------------------------------------------------
def test_status_reports_each_task_s_round(direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=6, sizes=(64 << 10,))
    state = tmp_path / "state"
    reg = registry(M.ReaderTask("slow", sleep=0.15), M.ReaderTask("fast"))
    summary, code = run_tasks(state, reg, ["slow", "fast"], scope, log=tmp_path / "log", budget_s=0.4)
    store = StateStore(str(state))
    try:
        (sc,) = collect(store, scope)
    finally:
        store.close()
    assert sc["scope"] == os.path.realpath(scope)
    slow, fast = sc["tasks"]["slow"], sc["tasks"]["fast"]
    assert slow["items_total"] == fast["items_total"] == len(files)
    assert slow["items_done"] == summary["tasks"]["slow"]["items_done"] < len(files)
    assert slow["complete"] is False and slow["round"] == 1
    assert slow["last_result"] == "budget" and slow["last_run"] > time.time() - 60
    for key in ("bytes_processed", "bytes_from_cache", "bytes_from_device"):
        assert slow[key] == summary["tasks"]["slow"][key]
    assert fast["bytes_processed"] == summary["tasks"]["fast"]["bytes_processed"]


class DefersOnce(M.ReaderTask):
    """Says "not done, try again in a later round" the first time it sees each file."""

    def __init__(self, name):
        super().__init__(name)
        self.seen: collections.Counter = collections.Counter()

    @hookimpl
    def duet_process(self, ctx):
        self.seen[ctx.file.relpath] += 1
        if self.seen[ctx.file.relpath] == 1:
            return ItemResult(done=False, message="busy, later")
        return None


def test_an_item_not_done_waits_for_a_later_round(direct_fs, tmp_path):
    """ItemResult(done=False): the file leaves this run (no retry loop), is not a failure, and the next run does it."""
    scope, files = make_dataset(direct_fs.mnt, n=3)
    task = DefersOnce("later")
    summary, code = run_tasks(tmp_path / "state", registry(task), ["later"], scope, budget_s=20)
    assert summary["result"] == "complete" and code == EXIT_OK
    rep = summary["tasks"]["later"]
    assert rep["items_done"] == 0 and rep["items_failed"] == 0 and rep["counters"]["deferred"] == len(files)
    assert set(task.seen.values()) == {1}
    summary, code = run_tasks(tmp_path / "state", registry(task), ["later"], scope)
    assert summary["tasks"]["later"]["items_done"] == len(files) and code == EXIT_OK
    assert set(task.seen.values()) == {2}
