"""The two framework capabilities the gc task needed, tested on their own (they are general, not gc's):

* boolean task options given as bare flags on the command line (``duet run gc ... --prune``);
* ``RunInfo.files()``: every file of the scope, also on a resumed round where ``duet_plan`` sees only new files.
"""

from __future__ import annotations

import os

import pytest
from plugin_dist import make_dataset

from duet_core import TaskOption, TaskSpec, hookimpl
from duet_core.cli.run import parse_task_args, split_args
from duet_core.config import Config
from duet_core.errors import DuetError
from duet_core.plugins import TaskRegistry
from duet_core.scheduler import EXIT_ITEM_ERRORS, EXIT_OK, Runner, RunOptions
from duet_core.state import StateStore


class Flagged:
    """A task with one option of each kind that matters for flags."""

    def __init__(self, name: str):
        self.name = name

    @hookimpl
    def duet_task(self):
        return TaskSpec(self.name, "flags", options=(TaskOption("prune", "bool", default=False),
                                                     TaskOption("target", "path"), TaskOption("keep", "int")))

    @hookimpl
    def duet_process(self, ctx):
        return None


def parsed(*argv: str, tasks=("one",)) -> dict:
    reg = TaskRegistry()
    for t in tasks:
        reg.add(Flagged(t))
    names, extra = split_args(list(tasks) + list(argv))
    assert names == list(tasks)
    return parse_task_args(extra, [], list(tasks), reg, Config())


def test_a_bare_boolean_flag_means_true_anywhere_on_the_line():
    assert parsed("--target", "/b", "--prune")["one"] == {"target": "/b", "prune": "true"}
    assert parsed("--prune", "--keep", "3")["one"] == {"prune": "true", "keep": "3"}
    assert parsed("--prune", "false", "--keep=3")["one"] == {"prune": "false", "keep": "3"}
    # Two tasks declaring the same option both get it.
    both = parsed("--target", "/b", "--prune", tasks=("one", "two"))
    assert both["one"] == both["two"] == {"target": "/b", "prune": "true"}


@pytest.mark.parametrize("argv", [("--keep",), ("--keep", "--prune"), ("--target", "--keep", "2")])
def test_a_non_boolean_option_still_needs_a_value(argv):
    with pytest.raises(DuetError, match="needs a value"):
        parsed(*argv)


class FilesPlanner:
    """Records, on every duet_plan call, the batch and what ``run.files()`` lists; fails on ``fail`` files."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.whole: list[list[str]] = []

    @hookimpl
    def duet_task(self):
        return TaskSpec("files", "lists the scope")

    @hookimpl
    def duet_plan(self, run, files):
        self.batches.append(sorted(f.relpath for f in files))
        self.whole.append(sorted(f.relpath for f in run.files()))

    @hookimpl
    def duet_process(self, ctx):
        if "fail" in ctx.file.relpath:
            raise RuntimeError("not this one")


def run_once(state, reg, scope) -> int:
    store = StateStore(str(state))
    try:
        runner = Runner(store, reg, ["files"], scope, RunOptions(source="poll"))
        return runner.exit_code(runner.run())
    finally:
        store.close()


def test_run_files_lists_the_whole_scope_also_on_a_resumed_round(btrfs_fs, tmp_path):
    scope, files = make_dataset(btrfs_fs.mnt, n=4, sizes=(8192,))
    with open(os.path.join(scope, "fail"), "wb") as fh:   # a failed item keeps the round open
        fh.write(b"x")
    task = FilesPlanner()
    reg = TaskRegistry()
    reg.add(task)
    assert run_once(tmp_path / "state", reg, scope) == EXIT_ITEM_ERRORS
    everything = sorted([*files, "fail"])
    assert task.batches == [everything] and task.whole == [everything]
    with open(os.path.join(scope, "a", "new"), "wb") as fh:
        fh.write(b"y")
    task.batches.clear()
    task.whole.clear()
    assert run_once(tmp_path / "state", reg, scope) == EXIT_ITEM_ERRORS
    assert task.batches == [["a/new"]]                       # the resumed round plans only the new file...
    assert task.whole == [sorted([*everything, "a/new"])]   # ...but the task can still see the whole scope
    os.unlink(os.path.join(scope, "fail"))
    assert run_once(tmp_path / "state", reg, scope) == EXIT_OK
