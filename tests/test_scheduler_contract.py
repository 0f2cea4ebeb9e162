"""Scheduler contract details, in-process: duet_plan may refuse a run; file names that are not UTF-8 work;
duet_device_pass is offered when one task alone needs files from the device."""

from __future__ import annotations

import os

import pytest
from plugin_dist import evict_tree

from duet_core import PassResult, TaskOption, TaskSpec, hookimpl
from duet_core.errors import DuetError
from duet_core.plugins import TaskRegistry
from duet_core.scheduler import Runner, RunOptions
from duet_core.state import StateStore


class Picky:
    """Refuses any run whose option ``ok`` is false; counts plan calls and processed files."""

    def __init__(self):
        self.plans, self.processed = [], []

    @hookimpl
    def duet_task(self):
        return TaskSpec("picky", "refuses bad options", options=(TaskOption("ok", "bool", default=True),))

    @hookimpl
    def duet_plan(self, run, files):
        self.plans.append(len(files))
        if not run.options["ok"]:
            raise DuetError("picky: not ok")

    @hookimpl
    def duet_process(self, ctx):
        self.processed.append(ctx.file.relpath)


def test_duet_plan_is_called_every_run_and_a_duet_error_refuses_it(tmp_path, require_root, bpf_required):
    scope = tmp_path / "scope"
    scope.mkdir()
    (scope / "f").write_bytes(b"x" * 5000)
    task = Picky()
    reg = TaskRegistry()
    reg.add(task)
    store = StateStore(str(tmp_path / "state"))

    def run(ok: bool) -> dict:
        return Runner(store, reg, ["picky"], str(scope), RunOptions(task_options={"picky": {"ok": ok}})).run()

    assert run(True)["result"] == "complete" and task.processed == ["f"] and task.plans == [1]
    with pytest.raises(DuetError, match="picky: not ok"):
        run(False)
    assert task.processed == ["f"]
    # A scope with no file at all: duet_plan is still asked (an empty batch), so the refusal holds there too.
    os.unlink(scope / "f")
    with pytest.raises(DuetError, match="picky: not ok"):
        run(False)
    assert task.plans[-1] == 0
    assert run(True)["result"] == "complete" and task.processed == ["f"]


def test_file_names_that_are_not_utf8_run_like_any_other(tmp_path, require_root, bpf_required):
    """A name with bytes that are not UTF-8 (and one with a newline) is stored, handed over and found again."""
    scope = tmp_path / "scope"
    scope.mkdir()
    names = [b"latin1-\xe9t\xe9", b"new\nline", b"plain"]
    for n in names:
        with open(os.path.join(os.fsencode(scope), n), "wb") as fh:
            fh.write(b"y" * 100)
    seen = []

    class Lister:
        @hookimpl
        def duet_task(self):
            return TaskSpec("lister", "lists relpaths")

        @hookimpl
        def duet_process(self, ctx):
            seen.append(os.fsencode(ctx.file.relpath))
            assert os.fstat(ctx.fd).st_size == 100

    reg = TaskRegistry()
    reg.add(Lister())
    summary = Runner(StateStore(str(tmp_path / "state")), reg, ["lister"], str(scope)).run()
    assert summary["result"] == "complete" and sorted(seen) == sorted(names)


class Sweeper:
    """A task with a pass of its own: ``duet_device_pass`` does the files whose name starts with ``pass``, the rest
    go through ``duet_process``. ``fail`` makes the pass raise."""

    def __init__(self, name: str = "sweeper", fail: bool = False):
        self.name, self.fail = name, fail
        self.passes, self.processed = [], []

    @hookimpl
    def duet_task(self):
        return TaskSpec(self.name, "sweeps in one pass")

    @hookimpl
    def duet_device_pass(self, run, pending, give_way, progress):
        files = list(pending())
        self.passes.append(sorted(f.relpath for f in files))
        progress(123)
        assert give_way() is False and not run.stopping()
        if self.fail:
            raise RuntimeError("the pass broke")
        done = [f.id for f in files if f.relpath.startswith("pass")]
        return PassResult(done=done, from_device=4096 * len(done), counters={"swept": len(done)},
                          message=f"swept {len(done)}")

    @hookimpl
    def duet_process(self, ctx):
        self.processed.append(ctx.file.relpath)


@pytest.fixture
def cold_scope(tmp_path):
    """Four files, evicted from the page cache (a pass is offered before the first uncached file is read)."""
    scope = tmp_path / "scope"
    scope.mkdir()
    for name in ("pass1", "pass2", "read1", "read2"):
        (scope / name).write_bytes(os.urandom(20000))
    evict_tree(str(scope))
    return scope


def _run(tmp_path, scope, tasks, names, **opts) -> dict:
    reg = TaskRegistry()
    for t in tasks:
        reg.add(t)
    store = StateStore(str(tmp_path / "state"))
    try:
        return Runner(store, reg, names, str(scope), RunOptions(**opts)).run()
    finally:
        store.close()


def test_device_pass_does_what_it_returns_and_the_rest_goes_file_by_file(tmp_path, cold_scope, require_root,
                                                                         bpf_required):
    task = Sweeper()
    summary = _run(tmp_path, cold_scope, [task], ["sweeper"])
    rep = summary["tasks"]["sweeper"]
    assert task.passes == [["pass1", "pass2", "read1", "read2"]]     # offered once, with every pending file
    assert sorted(task.processed) == ["read1", "read2"]               # what it did not do, item by item
    assert summary["result"] == "complete" and rep["items_done"] == 4 and rep["counters"]["swept"] == 2
    assert rep["bytes_processed"] == 4 * 20000 and rep["bytes_from_device"] >= 2 * 4096


def test_device_pass_is_not_offered_when_tasks_share_reads_or_the_rate_is_limited(tmp_path, cold_scope,
                                                                                   require_root, bpf_required):
    a, b = Sweeper("a"), Sweeper("b")
    _run(tmp_path, cold_scope, [a, b], ["a", "b"])      # two tasks need every file: one read serves both
    assert a.passes == b.passes == [] and len(a.processed) == len(b.processed) == 4
    evict_tree(str(cold_scope))
    c = Sweeper("c")
    _run(tmp_path, cold_scope, [c], ["c"], rate_limit=50e6)   # a pass of its own could not be paced
    assert c.passes == [] and len(c.processed) == 4


class Picker:
    """Needs only one file of the scope (its plan says so): the first in the run's order, or the last."""

    def __init__(self, which: int = 0):
        self.which = which
        self.processed, self.picked = [], []

    @hookimpl
    def duet_task(self):
        return TaskSpec("picker", "needs one file")

    @hookimpl
    def duet_plan(self, run, files):
        if files and not self.picked:       # one batch: the scope has four files
            self.picked.append(files[self.which].relpath)
            return [files[self.which].id]
        return []

    @hookimpl
    def duet_process(self, ctx):
        self.processed.append(ctx.file.relpath)


@pytest.mark.parametrize("which", [0, -1], ids=["first", "last"])
def test_device_pass_is_offered_once_the_other_tasks_are_done(tmp_path, cold_scope, require_root, bpf_required,
                                                              which):
    """A nightly ``backup scrub``: the backup needs a few files, the scrub all. The files the backup needs are read
    first — even the last in scan order — once for both; then the scrub alone needs the device, and its pass is
    offered with everything else."""
    sweeper, picker = Sweeper(), Picker(which)
    summary = _run(tmp_path, cold_scope, [sweeper, picker], ["sweeper", "picker"])
    (first,) = picker.picked
    assert picker.processed == [first] and sweeper.processed[0] == first       # read once, for both
    everything = ["pass1", "pass2", "read1", "read2"]
    assert sweeper.passes == [sorted(set(everything) - {first})]               # offered after it, not before
    passed_done = [p for p in sweeper.passes[0] if p.startswith("pass")]
    assert sorted(sweeper.processed + passed_done) == everything
    assert summary["result"] == "complete" and summary["tasks"]["sweeper"]["items_done"] == 4


def test_a_device_pass_that_raises_leaves_every_file_to_duet_process(tmp_path, cold_scope, require_root,
                                                                      bpf_required):
    task = Sweeper(fail=True)
    summary = _run(tmp_path, cold_scope, [task], ["sweeper"])
    assert len(task.passes) == 1 and sorted(task.processed) == ["pass1", "pass2", "read1", "read2"]
    rep = summary["tasks"]["sweeper"]
    assert summary["result"] == "complete" and rep["items_done"] == 4 and rep["items_failed"] == 0
    assert rep["bytes_processed"] == 4 * 20000        # the pass's progress() was taken back
