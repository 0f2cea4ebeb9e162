"""Scheduler contract details, in-process: duet_plan may refuse a run; file names that are not UTF-8 work."""

from __future__ import annotations

import os

import pytest

from duet_core import TaskOption, TaskSpec, hookimpl
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
